"""The RabbitMQ transport (aio-pika). The only part of txflow that imports aio-pika."""

from txflow.rabbit._transport import RabbitTransport

__all__ = ["RabbitTransport"]
