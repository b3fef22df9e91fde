"""The example on several hosts: network namespaces, one of them cut off mid-run.

Three hosts (tests/hosts.py: network namespaces on a bridge of the test's own, each with its
own address and hostname) run every service of the example, one worker each; they reach a
private RabbitMQ and a private PostgreSQL over their veth links, at the bridge's address.
One host is cut off while orders flow, in two steps: first what it sends to the broker is
dropped (a partial partition) until its relay holds leased outbox rows it cannot publish,
then its whole link goes down. Its connections neither close nor fail, so the broker must
find it gone (heartbeats) before its unacked deliveries go to the others, and PostgreSQL
(TCP keepalives) before the row locks of its open transactions are released; the rows its
relay leased wait out the lease (no renewal reaches the database any more) and are taken by
the other hosts' relays. Then the link is restored and the host rejoins. Every order must
end, every invariant of the example must hold (run_example checks them: nothing lost, no
effect applied twice), and every outbox row must have been confirmed.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import pytest
from examples.order_inventory import _rabbit, demo
from examples.order_inventory.orders import TERMINAL
from examples.order_inventory.report import count_by_status

from tests.faults.example import ORDERS, report_line, run_example
from tests.hosts import Hosts, made_hosts
from tests.servers import PrivatePostgres, PrivateRabbit

pytestmark = [
    pytest.mark.slow,
    pytest.mark.rabbitmq,
    pytest.mark.postgres,
    pytest.mark.timeout(900),
]

HOSTS = 3
VICTIM = 1
# Seconds between heartbeats on the AMQP connections: the broker drops a silent peer after
# two missed ones, so a cut host's deliveries are back in their queues within about 10 s.
HEARTBEAT = 5
# PostgreSQL drops a silent client after 5 s idle plus 3 unanswered probes 2 s apart (or
# 10 s of unacknowledged data), rolling back its open transactions and releasing their locks.
PG_KEEPALIVES = {
    "tcp_keepalives_idle": "5",
    "tcp_keepalives_interval": "2",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "10000",
}
# Orders placed before the cut, during it, and after the host is back.
BEFORE_CUT = 300
DURING_CUT = 600
RUN_TIMEOUT = 600


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    with made_hosts(HOSTS) as made:
        yield made
    assert made.leftovers() == [], "namespaces or links left behind"


@pytest.fixture
def pg(hosts: Hosts) -> Iterator[PrivatePostgres]:
    server = PrivatePostgres(
        Path(tempfile.mkdtemp(prefix="txflow-pg-")),
        extra_address=hosts.gateway,
        extra_network=str(hosts.subnet),
        settings=PG_KEEPALIVES,
    ).init()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def rabbit(hosts: Hosts) -> Iterator[PrivateRabbit]:
    node = PrivateRabbit(
        Path(tempfile.mkdtemp(prefix="txflow-rabbit-")), extra_address=hosts.gateway
    ).init()
    try:
        yield node
    finally:
        node.close()


async def _until(check: Callable[[], Awaitable[bool]]) -> None:
    # Polls: nothing signals these conditions. The run's own timeout bounds it: chaos is
    # cancelled once every order is terminal, and the run fails if that takes too long.
    while True:
        if await check():
            return
        await asyncio.sleep(0.2)


async def _terminal(services: Sequence[demo.Service]) -> int:
    orders = next(s for s in services if s.name == "orders")
    counts = await demo.read_through_blips(lambda: count_by_status(orders.app.store))
    return sum(counts[s] for s in TERMINAL)


def _queues(services: Sequence[demo.Service]) -> list[str]:
    apps = {s.name: s.app for s in services}.values()
    return [spec.name for app in apps for spec in app.topology().queues]


async def _consumers_are(url: str, services: Sequence[demo.Service], n: int) -> bool:
    counts = await _rabbit.consumer_counts(url, _queues(services))
    return all(count == n for count in counts.values())


async def _held_by(services: Sequence[demo.Service], hostname: str) -> int:
    """Pending outbox rows whose lease a relay on `hostname` still holds, in every database."""
    held = 0
    for service in {s.name: s for s in services}.values():
        status = await demo.read_through_blips(service.app.store.outbox_status)
        held += sum(
            b.pending for b in status.by_relay if (b.relay or "").startswith(f"{hostname}:")
        )
    return held


async def test_a_host_cut_off_mid_run_then_restored(
    hosts: Hosts, pg: PrivatePostgres, rabbit: PrivateRabbit
) -> None:
    url = f"{rabbit.url}?heartbeat={HEARTBEAT}"
    victim = hosts.name(VICTIM)
    seen: dict[str, object] = {}
    runs: list[demo.Run] = []

    async def cut_one_host(services: Sequence[demo.Service]) -> None:
        try:
            await _cut_one_host(services)
        except Exception as exc:
            # The run ignores what its chaos raised: let every order go, and say it at the end.
            seen["chaos_failed"] = repr(exc)
            runs[0].release()
            raise

    async def _cut_one_host(services: Sequence[demo.Service]) -> None:
        run = runs[0]
        await _until(lambda: _at_least(services, BEFORE_CUT // 2))
        await asyncio.to_thread(hosts.drop_to_port, VICTIM, rabbit.port)
        try:
            # Its relay still renews its leases, but can publish nothing: rows pile up.
            await _until(lambda: _holds_rows(services, victim))
            await asyncio.to_thread(hosts.cut, VICTIM)
            cut_at = time.monotonic()
            seen["rows_it_held"] = held = await _held_by(services, victim)
            republished_at_cut = await _republished(services)
            terminal_at_cut = await _terminal(services)
            run.release(DURING_CUT)
            # The broker gives the cut host up: its consumers go, its unacked deliveries
            # go back to their queues, and the other two hosts take them.
            await _until(lambda: _consumers_are(url, services, HOSTS - 1))
            seen["dropped_after"] = f"{time.monotonic() - cut_at:.1f}s"
            # The leases its relay held run out; the other relays take those rows.
            await _until(lambda: _no_rows_held(services, victim))
            seen["leases_free_after"] = f"{time.monotonic() - cut_at:.1f}s"
            # Taken, not only free: a lease that ran out but that no other relay claimed yet
            # is still the cut host's to renew once it is back (nobody else holds it).
            await _until(lambda: _republished_since(services, republished_at_cut, held))
            seen["rows_taken_after"] = f"{time.monotonic() - cut_at:.1f}s"
            # And the other hosts carry on without it.
            await _until(lambda: _at_least(services, terminal_at_cut + 100))
        finally:
            await asyncio.to_thread(hosts.restore, VICTIM)
        restored_at = time.monotonic()
        seen["cut_for"] = f"{restored_at - cut_at:.1f}s"
        # Back: the host's workers reconnect by themselves and consume again.
        await _until(lambda: _consumers_are(url, services, HOSTS))
        seen["rejoined_after"] = f"{time.monotonic() - restored_at:.1f}s"
        run.release()

    _, run = await run_example(
        url,
        cut_one_host,
        database=pg.url,
        workers=1,
        hosts=[demo.Host(hosts.name(i), hosts.prefix(i), hosts.gateway) for i in range(HOSTS)],
        released=BEFORE_CUT,
        runs=runs,
        timeout=RUN_TIMEOUT,
    )
    print(report_line("host-cut-off", run, **seen))
    assert "chaos_failed" not in seen, seen
    assert "rejoined_after" in seen, f"the run ended before the host was back: {seen}"
    held = seen["rows_it_held"]
    assert isinstance(held, int) and held > 0, seen
    assert run.counts is not None
    # Rows it held when cut off were taken again (by another relay, or by its own once
    # back) only after their leases ran out: each was claimed twice.
    assert run.counts.republished >= held, (run.counts, seen)
    assert run.counts is not None
    assert run.counts.orders == ORDERS
    # Nine `txflow run` processes, three per service, each on its own host.
    assert run.counts.worker_runs >= HOSTS * 3, run.counts


async def _at_least(services: Sequence[demo.Service], orders: int) -> bool:
    return await _terminal(services) >= orders


async def _republished(services: Sequence[demo.Service]) -> int:
    """Outbox rows a relay took more than once, in every service's database."""
    total = 0
    for service in {s.name: s for s in services}.values():
        status = await demo.read_through_blips(service.app.store.outbox_status)
        total += status.republished
    return total


async def _republished_since(services: Sequence[demo.Service], before: int, rows: int) -> bool:
    return await _republished(services) - before >= rows


async def _no_rows_held(services: Sequence[demo.Service], hostname: str) -> bool:
    return await _held_by(services, hostname) == 0


async def _holds_rows(services: Sequence[demo.Service], hostname: str) -> bool:
    return await _held_by(services, hostname) > 0
