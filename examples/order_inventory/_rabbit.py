"""RabbitMQ chores of the demo that txflow's transport does not offer: readiness and cleanup.

Talks to RabbitMQ through aio-pika directly (imported lazily: the in-memory demo needs none).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from txflow import Topology


async def _connect(urls: str) -> Any:
    """A plain aio-pika connection to the first node of `urls` (comma-separated) that answers."""
    import aio_pika

    nodes = [url.strip() for url in urls.split(",") if url.strip()]
    for node in nodes[:-1]:
        try:
            return await aio_pika.connect(node, timeout=5)
        except (OSError, TimeoutError, aio_pika.exceptions.AMQPError):
            continue  # that node is down; the next may be up
    return await aio_pika.connect(nodes[-1], timeout=5)


def retry_queue_names(topology: Topology) -> list[str]:
    # Mirrors txflow's naming of retry tiers (`<queue>.retry.<ms>ms`).
    return [
        f"{spec.name}.retry.{round(delay * 1000)}ms"
        for spec in topology.queues
        for delay in spec.retry_delays
    ]


def queue_names(topology: Topology) -> list[str]:
    """Every queue `topology` declares: handler queues, dead-letter queues, retry tiers."""
    names = [spec.name for spec in topology.queues]
    names += [spec.dead_letter_queue for spec in topology.queues]
    return names + retry_queue_names(topology)


async def consumer_counts(url: str, queues: Iterable[str]) -> dict[str, int]:
    """Consumers attached to each queue (0 for a missing queue)."""
    import aiormq

    counts: dict[str, int] = {}
    connection = await _connect(url)
    try:
        for name in queues:
            channel = await connection.channel()
            try:
                queue = await channel.declare_queue(name, passive=True)
                counts[name] = int(queue.declaration_result.consumer_count or 0)
            except aiormq.exceptions.ChannelNotFoundEntity:
                counts[name] = 0
            finally:
                if not channel.is_closed:
                    await channel.close()
    finally:
        await connection.close()
    return counts


async def delete_topology(url: str, topologies: Iterable[Topology]) -> None:
    """Delete the queues and exchanges of `topologies` (messages in them are lost)."""
    connection = await _connect(url)
    try:
        channel = await connection.channel()
        exchanges = set()
        for topology in topologies:
            exchanges.add(topology.exchange)
            for name in queue_names(topology):
                await channel.queue_delete(name)
        for exchange in exchanges:
            await channel.exchange_delete(exchange)
    finally:
        await connection.close()
