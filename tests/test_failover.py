"""Broker failover across the nodes of a cluster: node lists, masking, and a node killed.

The cluster tests run on a private 3-node cluster (tests/servers.py `PrivateCluster`,
started and stopped through scripts/rabbit_cluster.py), never on the machine's RabbitMQ.
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from collections.abc import Callable, Iterator

import pytest

from tests.servers import PrivateCluster, free_port, rigged_cluster
from txflow import Message, QueueSpec, Topology
from txflow.cli._common import add_urls
from txflow.errors import (
    BrokerUnavailableError,
    TransportClosedError,
    UnsupportedURLError,
    mask_url,
)
from txflow.rabbit import RabbitTransport
from txflow.transport import Delivery

# Seconds a failed-over consumer may take to see what it waits for (a failure, not a pace).
WAIT_TIMEOUT = 120


def test_node_lists_are_masked_url_by_url() -> None:
    urls = "amqp://u:secret@a:5672/, amqps://v:hidden,too@b:5671/x"
    assert mask_url(urls) == "amqp://u:***@a:5672/,amqps://v:***@b:5671/x"


def test_transport_takes_a_list_in_a_shuffled_order() -> None:
    urls = [f"amqp://u:p@h{i}:5672/" for i in range(8)]
    transport = RabbitTransport(",".join(urls))
    assert sorted(transport.nodes) == sorted(urls)
    assert "p@" not in transport.masked_url
    orders = {tuple(RabbitTransport(urls).nodes) for _ in range(20)}
    assert len(orders) > 1, "every process starting on the first node would not spread"


def test_a_node_list_must_be_all_amqp() -> None:
    with pytest.raises(UnsupportedURLError, match=r"memory://x"):
        RabbitTransport("amqp://h/,memory://x")


def test_repeated_broker_options_make_one_list() -> None:
    parser = argparse.ArgumentParser()
    add_urls(parser)
    args = parser.parse_args(["--broker", "amqp://a/", "--broker", "amqp://b/,amqp://c/"])
    assert args.broker == "amqp://a/,amqp://b/,amqp://c/"
    assert parser.parse_args(["--broker", "amqp://a/"]).broker == "amqp://a/"


async def test_rounds_of_failed_nodes_wait_half_a_second_doubling_to_five() -> None:
    from txflow.rabbit._failover import FailoverConnection

    conn = FailoverConnection([f"amqp://u:p@h{i}:5672/" for i in range(3)])
    waits = []
    for _ in range(6 * 3):  # six full rounds of three failed nodes
        conn._move_on(lost=False)
        waits.append(conn.reconnect_interval)
    assert waits == [w for n in (0.5, 1.0, 2.0, 4.0, 5.0, 5.0) for w in (0.0, 0.0, n)]
    conn._move_on(lost=True)  # it had connected, then lost the node: start again at once
    assert conn.reconnect_interval == 0.0
    for _ in range(3):
        conn._move_on(lost=False)
    assert conn.reconnect_interval == 0.5


@pytest.mark.rabbitmq
async def test_unreachable_nodes_are_all_named_masked() -> None:
    urls = [f"amqp://guest:sekrit@127.0.0.1:{free_port()}/" for _ in range(3)]
    transport = RabbitTransport(urls, connect_timeout=2)
    with pytest.raises(BrokerUnavailableError) as caught:
        await transport.connect()
    message = str(caught.value)
    assert "sekrit" not in message
    for url in urls:
        assert mask_url(url) in message


@pytest.mark.rabbitmq
async def test_connects_to_the_live_node_of_a_list(amqp_url: str) -> None:
    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    for _ in range(4):  # whatever the shuffled order, it ends up on the live node
        async with RabbitTransport([dead, amqp_url], connect_timeout=2) as transport:
            assert transport.masked_url == mask_url(amqp_url)


@pytest.fixture(scope="module")
def cluster() -> Iterator[PrivateCluster]:
    """A private 3-node cluster, started and torn down by the rig script."""
    with rigged_cluster() as cluster:
        yield cluster


def _port(masked: str) -> int:
    return int(masked.rsplit(":", 1)[1].strip("/"))


async def _publish_retrying(transport: RabbitTransport, exchange: str, message: Message) -> None:
    """Publish as the outbox relay does: an unconfirmed publish is published again."""
    while True:
        try:
            await transport.publish(exchange, message)
            return
        except TransportClosedError:
            await asyncio.sleep(0.2)


@pytest.mark.slow
@pytest.mark.rabbitmq
@pytest.mark.timeout(600)
async def test_killing_the_connected_node_fails_over(cluster: PrivateCluster) -> None:
    name = f"failover-{uuid.uuid4().hex[:6]}"
    spec = QueueSpec(name, ("Ping",), f"{name}.dlq", retry_delays=(1.0,), quorum=True)
    topology = Topology(f"{name}.events", (spec,))
    received: set[str] = set()
    got = asyncio.Event()

    async def on_delivery(delivery: Delivery) -> None:
        received.add(delivery.message.message_id or "")
        await delivery.ack()
        got.set()

    async with RabbitTransport(cluster.urls) as transport:
        await transport.declare(topology)
        await transport.consume(name, on_delivery, prefetch=10)
        sent = [f"m{i}" for i in range(40)]
        for mid in sent[:20]:
            await _publish_retrying(transport, topology.exchange, Message(b"x", "Ping", mid))
        await _wait(got, lambda: set(sent[:20]) <= received)
        victim = next(n for n in cluster.nodes if n.port == _port(transport.masked_url))
        victim.kill()
        try:
            for mid in sent[20:]:
                await _publish_retrying(transport, topology.exchange, Message(b"x", "Ping", mid))
            # Consumed again (on another node) with nothing lost.
            await _wait(got, lambda: set(sent) <= received)
            assert _port(transport.masked_url) != victim.port
            # It also re-declared the topology: the retry tier still routes.
            await transport.send(name, Message(b"x", "Ping", "late"), delay=0.1, tier=1.0)
            await _wait(got, lambda: "late" in received)
        finally:
            victim.start()
        cluster.wait_healthy()


async def _wait(changed: asyncio.Event, condition: Callable[[], bool]) -> None:
    """Wait until `condition()` holds, looking again whenever `changed` is set."""
    async with asyncio.timeout(WAIT_TIMEOUT):
        while not condition():
            changed.clear()
            await changed.wait()
