"""Prometheus metrics on real RabbitMQ and PostgreSQL: what a scrape of `/metrics` shows.

In-process apps serve their own `/metrics` (`MetricsConfig(port=0)`); the `txflow run`
tests scrape the supervisor's port, which sums its workers. Every app, queue and database
name is this test's own, and counters are read for this test's app and handlers only.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from tests.conftest import PG_URL, TEST_RELAY, Backend, _admin
from tests.metrics_support import Samples, scrape, total, values
from tests.servers import PrivateRabbit
from tests.support import Ping, add_sink, queue_depth_is, user_metadata
from tests.test_flows import make_rig
from tests.test_supervisor import handled_values
from txflow import Context, FlowStatus, MetricsConfig, RetryPolicy, TxFlow
from txflow._messages import encode, new_message_id
from txflow.testing import Harness, wait_until

ROOT = Path(__file__).resolve().parent.parent
METRICS = MetricsConfig(port=0, host="127.0.0.1", sample_interval=0.2)
SERVING = re.compile(r"serving metrics on http://127\.0\.0\.1:(\d+)/metrics")
RUNNING = re.compile(r"\[(\d+)\] txflow\.cli: metricsapp running; ")


class Boom(Exception):
    pass


def port_of(app: TxFlow) -> int:
    assert app._metrics is not None and app._metrics.port is not None
    return app._metrics.port


async def test_outcomes_are_counted_by_handler_and_exception_type(real: Backend) -> None:
    app = await real.app("outcomes", metrics=METRICS, retry=RetryPolicy.immediate(2))
    add_sink(app, Ping)

    @app.handler(Ping, name="fails")
    async def fails(event: Ping) -> None:
        raise Boom("always")

    message = encode(
        Ping(n=1),
        message_id=new_message_id(),
        correlation_id="flow-1",
        causation_id=None,
        occurred_at=datetime.now(UTC),
    )
    dead_letters = app.handlers["fails"].queue + ".dlq"
    async with app:
        port = port_of(app)
        await app.publish(Ping(n=0))
        await app.transport.publish(app.exchange, message)
        await app.transport.publish(app.exchange, message)  # the same message again

        seen: list[tuple[float, ...]] = []

        async def counted() -> bool:
            s = await scrape(port)
            seen[:] = [
                (
                    total(s, "txflow_messages_total", app="outcomes", handler="sink"),
                    total(s, "txflow_messages_total", app="outcomes", handler="fails"),
                    total(s, "txflow_dead_letter_queue_depth", app="outcomes"),
                    total(s, "txflow_outbox_pending_rows", app="outcomes"),  # sampled
                )
            ]
            return seen[0] == (3, 3 * 2, 3, 0)

        try:
            await wait_until(counted, timeout=60, message="every outcome counted")
        except TimeoutError:
            raise AssertionError(f"(sink, fails, dead letters, pending) = {seen}") from None
        await wait_until(queue_depth_is(app, dead_letters, 3), message="three dead letters")
        samples = await scrape(port)

    def count(handler: str, outcome: str, exception: str = "") -> float:
        return total(
            samples,
            "txflow_messages_total",
            app="outcomes",
            handler=handler,
            outcome=outcome,
            exception=exception,
        )

    assert count("sink", "handled") == 2
    assert count("sink", "duplicate") == 1
    boom = f"{__name__}.Boom"
    assert count("fails", "retry", boom) == 3  # the first of two attempts, for 3 messages
    assert count("fails", "dead_letter", boom) == 3
    assert count("fails", "handled") == 0
    assert total(samples, "txflow_dead_letter_queue_depth", queue=dead_letters) == 3
    sink = {"app": "outcomes", "handler": "sink"}
    assert total(samples, "txflow_handler_duration_seconds_count", **sink) == 2
    assert total(samples, "txflow_critical_time_seconds_count", **sink) == 2
    # Only the event emitted through the outbox; the two sent straight are not the relay's.
    assert total(samples, "txflow_outbox_published_total", app="outcomes") == 1
    assert total(samples, "txflow_outbox_commit_to_confirm_seconds_count", app="outcomes") == 1
    assert total(samples, "txflow_outbox_pending_rows", app="outcomes") == 0
    assert total(samples, "txflow_queue_consumers", app="outcomes") == 2


async def test_critical_time_and_outbox_lag_run_on_the_apps_clock() -> None:
    # Under the harness's manual clock the event is emitted at t0 and handled after a
    # 30 s retry delay that `advance` skips in no time: critical time is 30 s of the
    # app's clock, where the wall clock would say a few milliseconds.
    name = f"clocked-{uuid.uuid4().hex[:8]}"
    app = TxFlow(name, metrics=MetricsConfig(port=None), retry=RetryPolicy.ladder(30))

    @app.handler()
    async def late(event: Ping, ctx: Context) -> None:
        if ctx.attempt < 2:
            raise ConnectionError("not yet")

    labels = {"app": name, "handler": "late"}
    async with Harness(app) as h:
        await app.publish(Ping(n=1))
        await h.settle()
        assert not h.handled(Ping)
        await h.advance(30)
        h.handled(Ping).one()
    count = REGISTRY.get_sample_value("txflow_critical_time_seconds_count", labels)
    seconds = REGISTRY.get_sample_value("txflow_critical_time_seconds_sum", labels)
    assert count == 1
    assert seconds == pytest.approx(30.0, abs=1e-3)


async def test_flow_status_gauges_agree_with_txflow_flows_list(real: Backend) -> None:
    rig = await make_rig(real, metrics=METRICS)
    hold = asyncio.Event()
    rig.held["start"] = hold  # one flow stays compensating until the end of the test
    async with rig.owner, rig.worker:
        port = port_of(rig.owner)
        for key in ("ok1", "ok2", "ok3"):
            await rig.start_flow(key)
        await rig.start_flow("fails-at-d", fail_at="d")
        for key in ("ok1", "ok2", "ok3"):
            await rig.wait_status(key, FlowStatus.COMPLETED, timeout=60)
        await rig.wait_status("fails-at-d", FlowStatus.COMPENSATING, timeout=60)
        listed = await flows_list(await real.database_url("owner"))
        expected = {status: float(listed.get(status, 0)) for status in map(str, FlowStatus)}
        assert expected["completed"] == 3 and expected["compensating"] == 1

        async def agree() -> bool:
            gauges = values(await scrape(port), "txflow_flows", app="owner", flow="job")
            return {dict(ls)["status"]: v for ls, v in gauges.items()} == expected

        await wait_until(agree, timeout=30, message=f"flow gauges equal to {expected}")
        samples = await scrape(port)
        hold.set()
        await rig.wait_status("fails-at-d", FlowStatus.FAILED, timeout=60)
    entered = {
        dict(ls)["status"]: v
        for ls, v in values(samples, "txflow_flow_transitions_total", app="owner").items()
    }
    # An instance enters the status its first event seen leaves it in: running, unless a
    # failure overtook the step events (then it is created compensating).
    assert 3 <= entered["running"] <= 4
    assert entered["completed"] == 3
    assert entered["compensating"] == 1
    idle = values(samples, "txflow_flows_longest_idle_seconds", app="owner", status="compensating")
    assert next(iter(idle.values())) > 0


async def flows_list(database: str) -> dict[str, int]:
    """`txflow flows list --json`'s counts by status."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "txflow", "flows", "list", "--database", database, "--json",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()
    counts: dict[str, int] = json.loads(out)["counts"]
    return counts


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_outbox_lag_rises_while_rabbitmq_is_unreachable(
    private_rabbit: PrivateRabbit, real: Backend
) -> None:
    real.amqp_url = private_rabbit.url  # a node of this test's own, to stop
    app = await real.app("lagging", metrics=METRICS)
    received = add_sink(app, Ping)
    async with app:
        port = port_of(app)
        private_rabbit.stop_app()
        async with app.transaction() as tx:
            for n in range(20):
                tx.emit(Ping(n=n))

        async def lagging() -> bool:
            s = await scrape(port)
            return (
                total(s, "txflow_outbox_pending_rows", app="lagging") == 20
                and total(s, "txflow_outbox_lag_seconds", app="lagging") > 2.0
            )

        await wait_until(lagging, timeout=90, message="the outbox lag gauge rising")
        private_rabbit.start()
        await wait_until(lambda: len(received) >= 20, timeout=120, message="all handled")

        async def caught_up() -> bool:
            s = await scrape(port)
            return (
                total(s, "txflow_outbox_pending_rows", app="lagging") == 0
                and total(s, "txflow_outbox_lag_seconds", app="lagging") < 1.0
            )

        await wait_until(caught_up, timeout=60, message="the outbox lag back to ~0")
        samples = await scrape(port)
    assert total(samples, "txflow_outbox_published_total", app="lagging") >= 20


# -- txflow run --------------------------------------------------------------------------------

EXCHANGE = f"txflow.test.metrics.{uuid.uuid4().hex[:6]}"
PREFIX = f"met{uuid.uuid4().hex[:6]}."


@dataclass
class Service:
    """A `txflow run tests.metrics_app:app` process and its log file."""

    process: asyncio.subprocess.Process
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def running_pids(self) -> list[int]:
        return [int(m.group(1)) for m in RUNNING.finditer(self.text())]

    def metrics_port(self) -> int | None:
        found = SERVING.search(self.text())
        return int(found.group(1)) if found else None

    async def stop(self) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 90)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        assert self.process.returncode is not None
        return self.process.returncode


@pytest.fixture
async def services() -> AsyncIterator[list[Service]]:
    started: list[Service] = []
    yield started
    for service in started:
        await service.stop()


async def run_service(
    services: list[Service], tmp_path: Path, broker: str, database: str, *args: str
) -> Service:
    log = tmp_path / f"service-{len(services)}.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "txflow", "run", "tests.metrics_app:app",
            "--shutdown-timeout", "5", *args,
            cwd=ROOT, stdout=out, stderr=out,
            env={**os.environ, "TEST_EXCHANGE": EXCHANGE, "TEST_QUEUE_PREFIX": PREFIX,
                 "TXFLOW_BROKER_URL": broker, "TXFLOW_DATABASE_URL": database},
        )  # fmt: skip
    service = Service(process, log)
    services.append(service)
    return service


@pytest.fixture
async def database() -> AsyncIterator[str]:
    """A database of this test's own on the shared PostgreSQL, with the app's tables."""
    name = f"txflow_met_{uuid.uuid4().hex[:8]}"
    await _admin(f'CREATE DATABASE "{name}"')
    url = PG_URL.rsplit("/", 1)[0] + "/" + name
    try:
        init = TxFlow("init", database_url=url, metadata=user_metadata)
        await init.init_db()
        await init.store.aclose()
        yield url
    finally:
        await _admin(f'DROP DATABASE "{name}" WITH (FORCE)')


def producer(broker: str, tmp_path: Path) -> TxFlow:
    """An app that only emits Ping events onto the service's exchange."""
    return TxFlow(
        "producer", broker_url=broker, database_url=f"sqlite:///{tmp_path}/producer.db",
        exchange=EXCHANGE, queue_prefix=PREFIX, relay=TEST_RELAY, create_tables=True,
        shutdown_timeout=5,
    )  # fmt: skip


async def emit(app: TxFlow, first: int, count: int) -> None:
    for start in range(first, first + count, 100):
        async with app.transaction() as tx:
            for n in range(start, min(start + 100, first + count)):
                tx.emit(Ping(n=n))


async def count_handled(database: str) -> int:
    return len(await handled_values(database))


HANDLED = {"app": "metricsapp", "handler": "record", "outcome": "handled"}


@pytest.mark.slow
@pytest.mark.timeout(360)
async def test_one_scrape_sums_the_workers_and_survives_a_sigkill(
    amqp_url: str, database: str, services: list[Service], tmp_path: Path
) -> None:
    service = await run_service(
        services, tmp_path, amqp_url, database,
        "--workers", "2", "--metrics-port", "0", "--metrics-host", "127.0.0.1",
    )  # fmt: skip
    await wait_until(
        lambda: len(service.running_pids()) >= 2,
        timeout=90,
        message=f"two workers running\n{service.text()[-3000:]}",
    )
    port = service.metrics_port()
    assert port is not None, service.text()[-3000:]
    async with producer(amqp_url, tmp_path) as prod:
        await emit(prod, 0, 1000)

        async def all_handled() -> bool:
            return await count_handled(database) >= 1000

        await wait_until(all_handled, timeout=180, message="1,000 pings handled")

        async def summed() -> bool:
            return total(await scrape(port), "txflow_messages_total", **HANDLED) >= 1000

        await wait_until(summed, timeout=30, message="the counters caught up")
        samples = await scrape(port)
        assert total(samples, "txflow_messages_total", **HANDLED) == 1000
        assert total(samples, "txflow_handler_duration_seconds_count", app="metricsapp") == 1000

        # Kill a worker while events flow; every scrape from then on is at least the last.
        await emit(prod, 1000, 500)
        scrapes: list[Samples] = [samples]

        async def some_more() -> bool:
            return await count_handled(database) >= 1100

        await wait_until(some_more, timeout=120, message="more pings handled")
        victim = service.running_pids()[0]
        scrapes.append(await scrape(port))
        os.kill(victim, signal.SIGKILL)

        async def respawned_and_done() -> bool:
            scrapes.append(await scrape(port))
            return len(service.running_pids()) >= 3 and await count_handled(database) >= 1500

        await wait_until(respawned_and_done, timeout=180, interval=0.2, message="respawned")

        async def settled() -> bool:
            scrapes.append(await scrape(port))
            s = scrapes[-1]
            done = total(s, "txflow_messages_total", **HANDLED)
            dupes = total(s, "txflow_messages_total", app="metricsapp", outcome="duplicate")
            return done + dupes >= 1500

        await wait_until(settled, timeout=30, message="the counters caught up again")
    handled = [total(s, "txflow_messages_total", **HANDLED) for s in scrapes]
    assert handled == sorted(handled), handled  # never backwards, the kill included
    assert handled[0] == 1000
    # Each commit counted once: the killed worker's counts are in the sum once, and a
    # message it committed but did not ack comes back as a duplicate, not a second handled.
    assert handled[-1] <= 1500 == len(await handled_values(database))
    assert f"(pid {victim}) exited with -9; restarting" in service.text()
    assert await service.stop() == 0


def _listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_taken_metrics_port_exits_2_before_serving(
    workers: str, amqp_url: str, tmp_path: Path, services: list[Service]
) -> None:
    with _listening_socket() as taken:
        port = taken.getsockname()[1]
        service = await run_service(
            services, tmp_path, amqp_url, f"sqlite:///{tmp_path}/app.db",
            "--workers", workers, "--metrics-port", str(port), "--metrics-host", "127.0.0.1",
        )  # fmt: skip
        code = await asyncio.wait_for(service.process.wait(), 60)
    text = service.text()
    assert code == 2, text
    errors = [line for line in text.splitlines() if line.startswith("txflow: error:")]
    assert errors == [
        f"txflow: error: cannot serve metrics on 127.0.0.1:{port}: Address already in use; "
        "pick a free port with --metrics-port (or MetricsConfig(port=...))"
    ], text
    assert "starting" not in text and "running" not in text, text  # nothing consumed


@pytest.mark.parametrize("port", ["70000", "-1", "http"])
async def test_an_invalid_metrics_port_exits_2(
    port: str, amqp_url: str, tmp_path: Path, services: list[Service]
) -> None:
    service = await run_service(
        services, tmp_path, amqp_url, f"sqlite:///{tmp_path}/app.db", "--metrics-port", port
    )
    code = await asyncio.wait_for(service.process.wait(), 60)
    text = service.text()
    assert code == 2, text
    assert text.strip().splitlines()[-1] == (
        f"txflow: error: metrics port {port!r} is not a port number; give one from 1 to 65535 "
        "(0 picks a free one)"
    ), text


def test_the_documented_alert_rules_name_only_metrics_txflow_exports() -> None:
    import yaml  # type: ignore[import-untyped]  # PyYAML comes with mkdocs (dev)

    from txflow import _metrics

    page = (ROOT / "docs" / "observability.md").read_text()
    rules_yaml = page.split("### Alert rules", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    rules = yaml.safe_load(rules_yaml)["groups"][0]["rules"]
    exported = set()
    for value in vars(_metrics).values():
        name = getattr(value, "_name", None)
        kind = getattr(value, "_type", None)
        if isinstance(name, str) and name.startswith("txflow_"):
            exported.add(name + ("_total" if kind == "counter" else ""))
    used = {n for rule in rules for n in re.findall(r"txflow_\w+", rule["expr"])}
    assert {r["alert"] for r in rules} >= {
        "TxflowOutboxLag",
        "TxflowDeadLetters",
        "TxflowFlowsStuckCompensating",
        "TxflowConsumersMissing",
    }
    assert used and used <= exported, used - exported
    documented = set(re.findall(r"^\| `(txflow_\w+)` \|", page, flags=re.M))
    assert documented == exported  # every metric in the table, and only those
