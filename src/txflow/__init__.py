"""txflow: reliable event-driven flows on RabbitMQ and PostgreSQL.

Handlers run in one database transaction with the events they emit (transactional outbox),
deduplicate deliveries by message id (inbox), and retry on a policy into dead-letter queues.
"""

from txflow import dlq
from txflow._app import TxFlow
from txflow._config import open_transport
from txflow._dead_letters import DeadLetterInfo
from txflow._messages import Envelope, Event, EventRegistry
from txflow._metrics import MetricsConfig
from txflow._outbox import OutboxRelay, RelayConfig
from txflow.errors import (
    AppNotFoundError,
    BrokerUnavailableError,
    ConfigurationError,
    ConnectionFailedError,
    DatabaseUnavailableError,
    DeadLetter,
    EventValidationError,
    MalformedMessageError,
    MessageTooLargeError,
    PoisonMessageError,
    PublishError,
    Retry,
    TransactionEndedError,
    TransportClosedError,
    TxflowError,
    UnknownEventTypeError,
    UnroutableError,
    UnsupportedURLError,
)
from txflow.flows import Flow, FlowInfo, FlowLogEntry, FlowStatus, Step
from txflow.hop import Context, RetryPolicy
from txflow.store import OutboxStatus, Store, metadata, open_store
from txflow.transport import Delivery, Message, QueueSpec, Topology, Transport

__version__ = "0.1.0"

__all__ = [
    "AppNotFoundError",
    "BrokerUnavailableError",
    "ConfigurationError",
    "ConnectionFailedError",
    "Context",
    "DatabaseUnavailableError",
    "DeadLetter",
    "DeadLetterInfo",
    "Delivery",
    "Envelope",
    "Event",
    "EventRegistry",
    "EventValidationError",
    "Flow",
    "FlowInfo",
    "FlowLogEntry",
    "FlowStatus",
    "MalformedMessageError",
    "Message",
    "MessageTooLargeError",
    "MetricsConfig",
    "OutboxRelay",
    "OutboxStatus",
    "PoisonMessageError",
    "PublishError",
    "QueueSpec",
    "RelayConfig",
    "Retry",
    "RetryPolicy",
    "Step",
    "Store",
    "Topology",
    "TransactionEndedError",
    "Transport",
    "TransportClosedError",
    "TxFlow",
    "TxflowError",
    "UnknownEventTypeError",
    "UnroutableError",
    "UnsupportedURLError",
    "__version__",
    "dlq",
    "metadata",
    "open_store",
    "open_transport",
]
