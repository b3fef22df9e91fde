"""The example on a private 3-node RabbitMQ cluster with quorum queues, losing nodes mid-run.

Every worker is given all three nodes (in its own shuffled order, so they spread); the
cluster is started and torn down by scripts/rabbit_cluster.py and never touches the
machine's RabbitMQ. After each fault every order must be terminal and every invariant of the
example must hold (run_example checks them), and every outbox row must have been confirmed.
Each scenario prints a REPORT line; the first says how long consumption paused.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence

import pytest
from examples.order_inventory import demo
from examples.order_inventory.orders import TERMINAL
from examples.order_inventory.report import count_by_status

from tests.faults.example import report_line, run_example
from tests.servers import PrivateCluster, PrivateRabbit, rigged_cluster
from txflow import Message
from txflow.errors import PublishError, TransportClosedError
from txflow.rabbit import RabbitTransport
from txflow.transport import QueueSpec, Topology

pytestmark = [
    pytest.mark.slow,
    pytest.mark.rabbitmq,
    pytest.mark.postgres,
    pytest.mark.timeout(900),
]

# Seconds every order has to end: a quorum loss holds the whole run up while it lasts.
RUN_TIMEOUT = 480
# Orders terminal before a fault strikes: mid-run, with work in every queue.
STRIKE_AT = 100
# Seconds a probe publish waits for its confirm while the cluster has no quorum.
PROBE_TIMEOUT = 5.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[PrivateCluster]:
    with rigged_cluster(3) as cluster:
        yield cluster


@pytest.fixture(autouse=True)
def healthy(cluster: PrivateCluster) -> Iterator[None]:
    """Every node up again after each test, whatever it did to them."""
    yield
    for node in cluster.nodes:
        node.start()
    cluster.wait_healthy()


async def _terminal(services: Sequence[demo.Service]) -> int:
    orders = next(s for s in services if s.name == "orders")
    counts = await demo.read_through_blips(lambda: count_by_status(orders.app.store))
    return sum(counts[s] for s in TERMINAL)


async def _until(check: Callable[[], Awaitable[bool]]) -> None:
    # Polls: the databases and the broker have no event to wait on. The run's own timeout
    # bounds it: chaos is cancelled once every order is terminal.
    while True:
        if await check():
            return
        await asyncio.sleep(0.2)


def _handler_queue_leaders(
    cluster: PrivateCluster, services: Sequence[demo.Service]
) -> Counter[str]:
    queues = {spec.name for s in services for spec in s.app.topology().queues}
    return Counter(node for queue, node in cluster.leaders().items() if queue in queues)


def _longest_stall(progress: Sequence[tuple[float, int]], since: float) -> float:
    """The longest time after `since` in which no order became terminal."""
    stall, last_change, last_count = 0.0, since, None
    for at, count in progress:
        if at < since:
            last_count = count
            continue
        if last_count is not None and count > last_count:
            stall = max(stall, at - last_change)
            last_change = at
        last_count = count
    return stall


async def test_sigkill_of_the_node_leading_the_handler_queues(cluster: PrivateCluster) -> None:
    killed: list[tuple[PrivateRabbit, float, int]] = []

    async def kill_leader(services: Sequence[demo.Service]) -> None:
        await _until(lambda: _at_least(services, STRIKE_AT))
        leaders = _handler_queue_leaders(cluster, services)
        name, led = leaders.most_common(1)[0]
        victim = cluster.node_of(name)
        await asyncio.to_thread(victim.kill)
        killed.append((victim, time.monotonic(), led))
        # Down while a good share of the orders goes through the other two nodes.
        await _until(lambda: _at_least(services, STRIKE_AT + 300))
        await asyncio.to_thread(victim.start)

    _, run = await run_example(cluster.url, kill_leader, quorum_queues=True, timeout=RUN_TIMEOUT)
    assert killed, "the node was killed before every order ended"
    _, at, led = killed[0]
    pause = _longest_stall(run.progress, at)
    print(report_line("cluster-leader-sigkill", run, led_queues=led, paused=f"{pause:.1f}s"))


async def _at_least(services: Sequence[demo.Service], orders: int) -> bool:
    return await _terminal(services) >= orders


async def _pending(services: Sequence[demo.Service]) -> int:
    statuses = [await demo.read_through_blips(s.app.store.outbox_status) for s in services]
    return sum(status.pending for status in statuses)


async def test_quorum_lost_then_regained(cluster: PrivateCluster) -> None:
    seen: dict[str, int] = {}

    async def lose_quorum(services: Sequence[demo.Service]) -> None:
        await _until(lambda: _at_least(services, STRIKE_AT))
        first, second = cluster.nodes[1], cluster.nodes[2]
        survivor = cluster.nodes[0]
        probe = await _probe_queue(survivor.url)
        await asyncio.to_thread(first.stop_app)
        await asyncio.to_thread(second.stop_app)
        try:
            # No quorum: publishes go unconfirmed, so committed rows wait in the outbox. The
            # window lasts until a publish to a quorum queue has timed out on the surviving
            # node, so it is a real loss of quorum and not merely a connection blip.
            await _until(lambda: _has_pending(services))
            seen["pending"] = await _pending(services)
            await _until(lambda: _publish_times_out(survivor.url, probe))
            seen["pending_after_timeout"] = await _pending(services)
            seen["terminal_during"] = await _terminal(services)
        finally:
            await asyncio.to_thread(first.start)
            await asyncio.to_thread(second.start)
        seen["restored"] = 1

    _, run = await run_example(cluster.url, lose_quorum, quorum_queues=True, timeout=RUN_TIMEOUT)
    assert seen.get("restored") == 1, seen
    assert seen["pending"] > 0
    assert seen["pending_after_timeout"] > 0, "rows left the outbox without a quorum"
    print(report_line("cluster-quorum-lost", run, **seen))


async def _has_pending(services: Sequence[demo.Service]) -> bool:
    return await _pending(services) > 0


async def _probe_queue(url: str) -> str:
    """Declare a quorum queue of the test's own to probe publishing with; its name."""
    name = f"txflow-probe-{uuid.uuid4().hex[:8]}"
    transport = RabbitTransport(url)
    await transport.connect()
    try:
        queue = QueueSpec(name, (), dead_letter_queue=f"{name}.dlq", quorum=True)
        await transport.declare(Topology(exchange=f"{name}.x", queues=(queue,)))
    finally:
        await transport.aclose()
    return name


async def _publish_times_out(url: str, queue: str) -> bool:
    """Whether a publish to `queue` on the node at `url` now waits in vain for its confirm."""
    transport = RabbitTransport(url, publish_timeout=PROBE_TIMEOUT)
    try:
        await transport.connect()
        await transport.send(queue, Message(b"{}", routing_key=queue, message_id=queue))
    except TransportClosedError as exc:
        if isinstance(exc.__cause__, TimeoutError):
            assert "TimeoutError" in str(exc), f"the error does not say it timed out: {exc}"
            return True
        return False
    except PublishError:
        return True  # refused outright: as much a failed publish as a timeout
    finally:
        await transport.aclose()
    return False


async def test_rolling_restart_of_every_node(cluster: PrivateCluster) -> None:
    restarted: list[str] = []
    runs: list[demo.Run] = []
    # Orders released as each node goes down, so traffic flows during every restart; the
    # last batch waits until the last node is back, so the run cannot end before it.
    batch = 200

    async def rolling_restart(services: Sequence[demo.Service]) -> None:
        run = runs[0]
        await _until(lambda: _at_least(services, 1))
        for i, node in enumerate(cluster.nodes):
            await asyncio.to_thread(node.stop)
            run.release(batch * (i + 2))
            await asyncio.to_thread(node.start)
            await asyncio.to_thread(cluster.wait_healthy)
            restarted.append(node.name)
        run.release()  # the rest, on the healthy cluster

    _, run = await run_example(
        cluster.url,
        rolling_restart,
        quorum_queues=True,
        timeout=RUN_TIMEOUT,
        released=batch,
        runs=runs,
    )
    print(report_line("cluster-rolling-restart", run, restarted=len(restarted)))
    assert restarted == [node.name for node in cluster.nodes]
