"""Place a batch of orders, wait until every flow ended, and check the example's invariants.

    python -m examples.order_inventory.demo [--orders N]
        One process: the three apps share an in-memory broker, each has its own SQLite file
        in a temporary directory. Add --broker amqp://... to use RabbitMQ instead.

    python -m examples.order_inventory.demo --broker amqp://... --database postgresql://.../db
        [--workers N] [--quorum-queues] [--trace-dir DIR]
        [--listen-database postgresql://.../db]
        Three services as `txflow run` processes on RabbitMQ, each with a fresh PostgreSQL
        database created on the server of --database (and dropped at the end). For a
        cluster, repeat --broker (or give the nodes' URLs comma-separated): every worker gets
        the whole list and fails over between the nodes. With --trace-dir, the services run
        traced (traced.py), each order is placed under a `place order` span, and every
        process writes its spans to a JSON-lines file in DIR. Through pgbouncer in
        transaction mode, add ?pool_mode=transaction to --database, and give
        --listen-database a direct connection to the same server for the relays' LISTEN.

Exits 0 only if every invariant check passes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import sqlalchemy as sa
from opentelemetry import trace

from examples.order_inventory import _rabbit, inventory, orders, payment
from examples.order_inventory.orders import TERMINAL, Order, place_order
from examples.order_inventory.report import (
    OPEN_FLOWS,
    ExpectedDeadLetter,
    check_invariants,
    count_by_status,
    format_checks,
    summary,
    take_snapshot,
)
from examples.order_inventory.settings import (
    CONCURRENCY_ENV,
    EXCHANGE_ENV,
    QUEUE_PREFIX_ENV,
    QUORUM_QUEUES_ENV,
    SPANS_DIR_ENV,
    STATS_INTERVAL_ENV,
    database_url_env,
    listen_url_env,
)
from examples.order_inventory.workload import OrderRequest, initial_stock, make_orders
from txflow import (
    DatabaseUnavailableError,
    DeadLetterInfo,
    Store,
    Transport,
    TxFlow,
    dlq,
    open_transport,
)
from txflow.testing import InMemoryBroker, InMemoryTransport

DEFAULT_ORDERS = 200
DEFAULT_TIMEOUT = 120.0
# Orders being placed at once, like concurrent web requests.
PLACING_CONCURRENCY = 16
# Tries to place one order through database blips (connection killed, server restarting).
PLACE_ATTEMPTS = 30
# Seconds the services get to start consuming, and to stop gracefully.
SERVICE_START_TIMEOUT = 60.0
SERVICE_STOP_TIMEOUT = 70.0
# Database connections a service process uses besides its handlers' (relay, LISTEN, sweeps),
# and those the demo process itself holds (placing orders, reading results).
PROCESS_CONNECTIONS = 4
DEMO_CONNECTIONS = PLACING_CONCURRENCY + 8
MAX_CONCURRENCY = 32
LOG_TAIL_LINES = 30
# Seconds expected dead letters get to arrive once every order is terminal.
DEAD_LETTER_SETTLE_TIMEOUT = 60.0
REPO_ROOT = Path(__file__).resolve().parents[2]

FACTORIES: dict[str, Callable[..., TxFlow]] = {
    "orders": orders.create_app,
    "inventory": inventory.create_app,
    "payment": payment.create_app,
}


class DemoError(Exception):
    """The demo could not run (bad arguments, a service died, a timeout)."""


@dataclass(frozen=True, slots=True)
class Counts:
    """What the services did in a distributed run, summed over services and worker processes.

    handled, retries, requeued and duplicates (dropped by the inbox) come from the stats line
    each worker logs when it stops gracefully; a worker killed with SIGKILL never logs its
    own, so unless every worker run logged (`exact`) they are lower bounds. dead_letters (the
    dead-letter queues' depths), republished (outbox rows a relay took more than once) and
    unsent (outbox rows no broker confirmed) are read from RabbitMQ and the databases once
    the services stopped: always exact.
    """

    orders: int
    handled: int
    retries: int
    requeued: int
    duplicates: int
    dead_letters: int
    republished: int
    unsent: int
    worker_runs: int
    logged_runs: int

    @property
    def exact(self) -> bool:
        return self.logged_runs == self.worker_runs

    def line(self) -> str:
        """`orders=1000 retries=3 ...`, with `>=` on the counts that are lower bounds."""
        op = "=" if self.exact else ">="
        return (
            f"orders={self.orders} handled{op}{self.handled} retries{op}{self.retries} "
            f"requeued{op}{self.requeued} duplicates{op}{self.duplicates} "
            f"dead_letters={self.dead_letters} republished={self.republished} "
            f"unsent={self.unsent}"
        )


@dataclass(slots=True)
class Run:
    """One demo run: the orders to place, the stock to start with, and progress.

    A fault test may set `expected_dead_letters` before the run (and add to the list while it
    runs): the dead-letter queues must then hold exactly those, instead of nothing. The
    distributed mode fills in `counts`, and `dead_letter_details` when dead letters were
    expected.
    """

    requests: Sequence[OrderRequest]
    stock: Mapping[str, int]
    timeout: float
    placed: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    expected_dead_letters: list[ExpectedDeadLetter] | None = None
    dead_letter_details: dict[str, list[DeadLetterInfo]] = field(default_factory=dict)
    counts: Counts | None = None
    # (monotonic time, orders terminal) at each look while waiting: how progress went.
    progress: list[tuple[float, int]] = field(default_factory=list)
    # Orders that may be placed so far (None: all). A fault test holds the rest back and
    # releases them as its faults strike, so that traffic flows during each fault whatever
    # the machine's speed, rather than hoping the run lasts long enough.
    released: int | None = None
    # Places each order under a `place order` span (the API's no-op unless --trace-dir).
    tracer: trace.Tracer = field(default_factory=lambda: trace.get_tracer(__name__))
    # Where the services run (see `Host`); empty: one `txflow run` per service, here.
    hosts: Sequence[Host] = ()
    _raised: asyncio.Event = field(default_factory=asyncio.Event)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def release(self, count: int | None = None) -> None:
        """Let the first `count` orders be placed (every order when None)."""
        self.released = count
        self._raised.set()

    async def may_place(self, index: int) -> None:
        """Wait until the order at `index` is released."""
        while self.released is not None and index >= self.released:
            self._raised.clear()
            await self._raised.wait()


# -- the part both modes share ------------------------------------------------------------


async def place_with_retries(app: TxFlow, request: OrderRequest) -> None:
    """What a careful front end does when its database blips: try again, idempotently.

    The order id is the key: if a failed attempt did commit after all (the connection died
    during COMMIT), the retry finds the order and stops, so no order is placed twice.
    """
    for attempt in range(1, PLACE_ATTEMPTS + 1):
        try:
            await place_order(
                app,
                order_id=request.order_id,
                sku=request.sku,
                quantity=request.quantity,
                amount=request.amount,
                customer=request.customer,
            )
            return
        except (sa.exc.DBAPIError, DatabaseUnavailableError, OSError) as exc:
            if await order_exists(app, request.order_id):
                return
            if attempt == PLACE_ATTEMPTS:
                raise DemoError(
                    f"placing {request.order_id} failed {attempt} times: {exc}"
                ) from exc
            await asyncio.sleep(0.2 * attempt)


async def order_exists(app: TxFlow, order_id: str) -> bool:
    for _ in range(PLACE_ATTEMPTS):
        try:
            async with app.store.engine.connect() as conn:
                found = await conn.execute(
                    sa.select(Order.order_id).where(Order.order_id == order_id)
                )
                return found.first() is not None
        except (sa.exc.DBAPIError, OSError):
            await asyncio.sleep(0.5)
    raise DemoError(f"cannot tell whether order {order_id} exists: the database is unreachable")


async def place_all(app: TxFlow, run: Run) -> None:
    gate = asyncio.Semaphore(PLACING_CONCURRENCY)

    async def place(index: int, request: OrderRequest) -> None:
        await run.may_place(index)
        async with gate:
            # As a web request's span would be: the order's trace starts here.
            with run.tracer.start_as_current_span(
                "place order", attributes={"order.id": request.order_id}
            ):
                await place_with_retries(app, request)
            run.placed.append(request.order_id)

    async with asyncio.TaskGroup() as tasks:
        for index, request in enumerate(run.requests):
            tasks.create_task(place(index, request))


async def watch(store: Store, run: Run, check_alive: Callable[[], None]) -> bool:
    """Print progress every second until every order is terminal; False on timeout."""
    total = len(run.requests)
    next_line = 0.0
    while True:
        try:
            counts = await count_by_status(store)
        except (sa.exc.DBAPIError, OSError):
            await asyncio.sleep(0.5)  # the database is restarting; look again shortly
            continue
        terminal = sum(counts[s] for s in TERMINAL)
        run.progress.append((time.monotonic(), terminal))
        # The flow tracker records an order's end right after the order row changes.
        done = terminal == total and len(run.placed) == total and not counts[OPEN_FLOWS]
        if done or run.elapsed() >= next_line:
            next_line += 1.0
            print(
                f"[{run.elapsed():6.1f}s] placed {len(run.placed):>6}/{total}  "
                f"terminal {terminal:>6}/{total}  pending {counts['PENDING']:>6}",
                flush=True,
            )
        if done:
            run.finished = run.elapsed()
            return True
        check_alive()
        if run.elapsed() > run.timeout:
            print(
                f"TIMEOUT: {total - terminal} of {total} orders not terminal after "
                f"{run.timeout:.0f}s (statuses: {dict(counts)})",
                flush=True,
            )
            return False
        await asyncio.sleep(0.1)


async def drive(client: TxFlow, run: Run, check_alive: Callable[[], None] = lambda: None) -> bool:
    """Place all orders while watching progress; True when every order became terminal.

    Raises:
        DemoError: placing failed, or `check_alive` found a dead service.
    """
    run.started = time.monotonic()
    placing = asyncio.create_task(place_all(client, run))

    def check() -> None:
        if placing.done() and not placing.cancelled() and placing.exception() is not None:
            raise DemoError(f"placing orders failed: {placing.exception()!r}")
        check_alive()

    try:
        return await watch(client.store, run, check)
    finally:
        placing.cancel()
        await asyncio.gather(placing, return_exceptions=True)


T = TypeVar("T")


async def read_through_blips(read: Callable[[], Awaitable[T]]) -> T:
    """`await read()`, tried again while the database connection fails."""
    for _ in range(PLACE_ATTEMPTS - 1):
        try:
            return await read()
        except (sa.exc.DBAPIError, OSError):
            # Pooled connections may predate a database restart; the pool drops them on
            # the first failure, so the next try gets fresh ones.
            await asyncio.sleep(0.5)
    return await read()


async def report(
    stores: Mapping[str, Store], dead_letters: Mapping[str, int], run: Run, finished: bool
) -> bool:
    """Print the summary and the invariant checks; True if all passed."""
    snap = await read_through_blips(
        lambda: take_snapshot(stores["orders"], stores["inventory"], stores["payment"])
    )
    snap.dead_letters = dict(dead_letters)
    snap.dead_letter_details = run.dead_letter_details
    print()
    print(summary(snap, run.stock))
    if run.finished:
        print(
            f"{len(run.requests)} orders in {run.finished:.1f}s "
            f"({len(run.requests) / run.finished:.0f} orders/s end to end)"
        )
    print()
    checks = check_invariants(
        snap, run.stock, [r.order_id for r in run.requests], run.expected_dead_letters
    )
    print(format_checks(checks))
    ok = finished and all(c.ok for c in checks)
    print()
    print("ALL CHECKS PASSED" if ok else "SOME CHECKS FAILED")
    return ok


async def dead_letter_depths(apps: Sequence[TxFlow], transport: Transport) -> dict[str, int]:
    return {
        spec.dead_letter_queue: await transport.queue_depth(spec.dead_letter_queue)
        for app in apps
        for spec in app.topology().queues
    }


async def read_dead_letters(
    transport: Transport, depths: Mapping[str, int]
) -> dict[str, list[DeadLetterInfo]]:
    """Every dead letter with its reason (they stay in their queues)."""
    return {q: await dlq.show(transport, q, n) for q, n in depths.items() if n}


async def settle_dead_letters(apps: Sequence[TxFlow], transport: Transport, run: Run) -> None:
    """Wait until the expected dead letters are in their queues, for the check to see them.

    Garbage can still be on its way when the last order ends; the check reports what is
    missing after DEAD_LETTER_SETTLE_TIMEOUT.
    """
    if not run.expected_dead_letters:
        return
    wanted = Counter(e.queue for e in run.expected_dead_letters)
    started = time.monotonic()
    while True:
        depths = await dead_letter_depths(apps, transport)
        if all(depths.get(q, 0) >= n for q, n in wanted.items()):
            return
        if time.monotonic() - started > DEAD_LETTER_SETTLE_TIMEOUT:
            print(f"expected dead letters still missing after {DEAD_LETTER_SETTLE_TIMEOUT:.0f}s")
            return
        await asyncio.sleep(0.2)


def new_run_id() -> str:
    """Unique per run: names queues, the exchange and databases, so runs never collide."""
    return f"oidemo_{secrets.token_hex(4)}"


def isolation_options(run_id: str) -> dict[str, str]:
    # Both are needed: a shared exchange would route one run's events into another's queues.
    return {"queue_prefix": f"{run_id}.", "exchange": f"{run_id}.events"}


def broker_options(args: argparse.Namespace, run_id: str) -> dict[str, Any]:
    """`TxFlow(...)` options of the run's apps: isolation, and quorum queues if asked."""
    return {**isolation_options(run_id), "quorum_queues": args.quorum_queues}


# -- one process ------------------------------------------------------------------------------


async def run_in_process(args: argparse.Namespace, run: Run) -> bool:
    """All three apps in this process, each with its own SQLite file."""
    run_id = new_run_id()
    broker = InMemoryBroker()

    def options() -> dict[str, Any]:
        tuning = {"concurrency": args.concurrency} if args.concurrency else {}
        if args.broker:
            return {"broker_url": args.broker, **broker_options(args, run_id), **tuning}
        return {"transport": InMemoryTransport(broker), **tuning}

    with tempfile.TemporaryDirectory(prefix="txflow-order-demo-") as tmp:
        apps = {
            name: factory(database_url=f"sqlite:///{Path(tmp) / name}.db", **options())
            for name, factory in FACTORIES.items()
        }
        print(
            f"one process: broker {args.broker_display or 'in-memory'}, SQLite databases in {tmp}"
        )
        if args.workers > 1:
            print("note: --workers applies to separate processes (--database postgresql://...)")
        try:
            async with contextlib.AsyncExitStack() as stack:
                for app in apps.values():
                    await stack.enter_async_context(app)
                await inventory.seed_stock(apps["inventory"], run.stock)
                finished = await drive(apps["orders"], run)
                transport = apps["orders"].transport
                await settle_dead_letters(list(apps.values()), transport, run)
                dead = await dead_letter_depths(list(apps.values()), transport)
                if run.expected_dead_letters is not None:
                    run.dead_letter_details = await read_dead_letters(transport, dead)
                return await report({n: a.store for n, a in apps.items()}, dead, run, finished)
        finally:
            if args.broker and not args.keep:
                await _cleanup(
                    "deleting the run's queues",
                    _rabbit.delete_topology(args.broker, [a.topology() for a in apps.values()]),
                )


# -- separate processes ---------------------------------------------------------------------


# Lines of a service's log (txflow.cli's format, `... [pid] logger: message`) that tell which
# workers served and which logged their counters: a worker says it is running once started,
# logs `<app> stats (running): handled=N ...` every second (cumulative) and `<app> stats: ...`
# when it stops gracefully (TxFlow._log_stats), and its
# supervisor names each worker that died and was restarted.
LOG_LINE = re.compile(r" \[(?P<pid>\d+)\] [\w.]+: (?P<message>.*)$")
STATS_MESSAGE = re.compile(
    r"(?P<app>\S+) stats(?P<running> \(running\))?: (?P<counters>(?:\w+=\d+ ?)+)$"
)
RUNNING_MESSAGE = re.compile(r"(?P<app>\S+) running; ")
RESTART_MESSAGE = re.compile(r"worker \d+ \(pid (?P<pid>\d+)\) exited with (?P<code>-?\d+); ")


@dataclass(frozen=True, slots=True)
class ServiceStats:
    """The counters of a service's workers, summed over the worker runs that logged them.

    `worker_runs` counts the runs that may have handled messages: those that said they were
    running, and those killed by a signal such as SIGKILL (maybe before they could say so). A
    worker that failed to start handled nothing, and one that SIGTERM or SIGINT killed
    outright had not yet installed its handlers (so it never served) or had already stopped
    and logged: neither counts.
    """

    counters: Counter[str]
    worker_runs: int
    logged_runs: int


def _killed_serving(exit_code: int) -> bool:
    """Whether a worker that exited with `exit_code` may have died serving (see ServiceStats)."""
    return exit_code < 0 and -exit_code not in (signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True, slots=True)
class Host:
    """A machine the services run on, each service as one `txflow run --workers N` there.

    `prefix` is the command that runs a program on it (say `ip netns exec h1` for a network
    namespace); `servers_at` the address its processes reach the broker and the databases
    at, put in place of the host of every URL (None: the URLs as they are).
    """

    name: str
    prefix: tuple[str, ...] = ()
    servers_at: str | None = None

    def reach(self, urls: str) -> str:
        """`urls` (comma-separated) as seen from this host."""
        if self.servers_at is None:
            return urls
        moved = []
        for url in urls.split(","):
            parts = urlsplit(url)
            user, at, _ = parts.netloc.rpartition("@")
            port = f":{parts.port}" if parts.port else ""
            moved.append(parts._replace(netloc=f"{user}{at}{self.servers_at}{port}").geturl())
        return ",".join(moved)


HERE = Host("here")


@dataclass(slots=True)
class Service:
    """A `txflow run --workers N` process and its log.

    `app` is the demo's twin of the service's app, built with the same options: its
    `topology()` names the service's queues, and its store is the service's database.
    `host` names the `Host` it runs on.
    """

    name: str
    process: asyncio.subprocess.Process
    log: Path
    app: TxFlow
    host: str = HERE.name

    @property
    def label(self) -> str:
        return self.name if self.host == HERE.name else f"{self.name}@{self.host}"

    def problems(self) -> str:
        """How many warnings and errors the service logged."""
        levels = Counter(
            level
            for line in self.log.read_text(errors="replace").splitlines()
            for level in ("WARNING", "ERROR", "CRITICAL")
            if f" {level} " in line
        )
        return ", ".join(f"{n} {level}" for level, n in levels.items()) or "clean"

    def tail(self) -> str:
        lines = self.log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        return "\n".join(f"    {line}" for line in lines)

    def stats(self) -> ServiceStats:
        """Its workers' counters, from their stats lines; a killed worker has none."""
        latest: dict[str, Counter[str]] = {}  # the last counters each worker logged
        served: set[str] = set()
        logged: set[str] = set()
        for line in self.log.read_text(errors="replace").splitlines():
            if (entry := LOG_LINE.search(line)) is None:
                continue
            message = entry["message"]
            if (found := STATS_MESSAGE.match(message)) and found["app"] == self.app.name:
                served.add(entry["pid"])
                if not found["running"]:
                    logged.add(entry["pid"])  # its final line: the counters are complete
                latest[entry["pid"]] = Counter(
                    {
                        key: int(value)
                        for key, _, value in (p.partition("=") for p in found["counters"].split())
                    }
                )
            elif (found := RUNNING_MESSAGE.match(message)) and found["app"] == self.app.name:
                served.add(entry["pid"])
            elif (found := RESTART_MESSAGE.match(message)) and _killed_serving(int(found["code"])):
                served.add(found["pid"])
        counters: Counter[str] = sum(latest.values(), Counter())
        return ServiceStats(counters, len(served | logged), len(logged))


def _txflow_command() -> list[str]:
    found = shutil.which("txflow", path=str(Path(sys.executable).parent)) or shutil.which("txflow")
    if found is None:
        raise DemoError("the `txflow` command is not installed; `pip install -e .` first")
    return [found]


async def start_services(
    args: argparse.Namespace,
    run_id: str,
    apps: Mapping[str, TxFlow],
    urls: Mapping[str, str],
    concurrency: int,
    log_dir: Path,
    listen_urls: Mapping[str, str] | None = None,
    hosts: Sequence[Host] = (),
) -> list[Service]:
    """`txflow run examples.order_inventory.<name>:app --workers N`, one per service and host.

    URLs travel in the environment rather than as arguments, so passwords stay out of `ps`.
    """
    services = []
    for host in hosts or [HERE]:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])
            ),
            "TXFLOW_BROKER_URL": host.reach(args.broker),
            QUEUE_PREFIX_ENV: isolation_options(run_id)["queue_prefix"],
            EXCHANGE_ENV: isolation_options(run_id)["exchange"],
            CONCURRENCY_ENV: str(concurrency),
            QUORUM_QUEUES_ENV: "1" if args.quorum_queues else "",
            # Running counters every second, so a worker killed mid-run still counts.
            STATS_INTERVAL_ENV: "1",
            **{database_url_env(name): host.reach(url) for name, url in urls.items()},
            **{listen_url_env(n): host.reach(url) for n, url in (listen_urls or {}).items()},
        }
        env.pop("TXFLOW_DATABASE_URL", None)
        env.pop("TXFLOW_LISTEN_URL", None)
        # Traced: `traced.<name>` configures the SDK, then returns the service's app.
        target = "examples.order_inventory.{name}:app"
        if args.trace_dir:
            env[SPANS_DIR_ENV] = args.trace_dir
            target = "examples.order_inventory.traced:{name}"
        for name in FACTORIES:
            app, several = apps[name], len(hosts) > 1
            service = await _start_service(
                args, name, target.format(name=name), host, env, log_dir, app, several
            )
            services.append(service)
    return services


async def _start_service(
    args: argparse.Namespace,
    name: str,
    target: str,
    host: Host,
    env: Mapping[str, str],
    log_dir: Path,
    app: TxFlow,
    several_hosts: bool,
) -> Service:
    log = log_dir / (f"{name}@{host.name}.log" if several_hosts else f"{name}.log")
    command = [
        *host.prefix,
        *_txflow_command(),
        "run",
        target,
        "--workers",
        str(args.workers),
    ]
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            *command,
            cwd=REPO_ROOT,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            # Its own process group: Ctrl-C here reaches the demo, which stops it cleanly.
            start_new_session=True,
        )
    where = f" on {host.name}" if several_hosts else ""
    print(f"started txflow {' '.join(command[-4:])}{where} (pid {process.pid}, log {log})")
    return Service(name, process, log, app, host.name)


def ensure_alive(services: Sequence[Service]) -> None:
    for service in services:
        code = service.process.returncode
        if code is not None:
            raise DemoError(
                f"service {service.label} exited with code {code}; last lines of "
                f"{service.log}:\n{service.tail()}"
            )


async def wait_consuming(
    url: str, apps: Sequence[TxFlow], services: Sequence[Service], workers: int
) -> None:
    """Wait until every handler queue has a consumer per worker (or at least one, at worst)."""
    queues = [spec.name for app in apps for spec in app.topology().queues]
    started = time.monotonic()
    while True:
        ensure_alive(services)
        counts = await _rabbit.consumer_counts(url, queues)
        waited = time.monotonic() - started
        if all(n >= workers for n in counts.values()) or (
            all(counts.values()) and waited > SERVICE_START_TIMEOUT / 3
        ):
            print(
                f"services consuming after {waited:.1f}s: "
                + ", ".join(f"{q.split('.', 1)[1]}={n}" for q, n in counts.items())
            )
            return
        if waited > SERVICE_START_TIMEOUT:
            raise DemoError(
                f"services did not start consuming within {SERVICE_START_TIMEOUT:.0f}s: "
                f"{counts}\n" + "\n".join(f"  {s.label} ({s.log}):\n{s.tail()}" for s in services)
            )
        await asyncio.sleep(0.5)


async def stop_services(services: Sequence[Service]) -> None:
    """SIGTERM (graceful stop), then SIGKILL to the process group if it hangs."""
    for service in services:
        if service.process.returncode is None:
            service.process.send_signal(signal.SIGTERM)
    for service in services:
        try:
            await asyncio.wait_for(service.process.wait(), SERVICE_STOP_TIMEOUT)
        except TimeoutError:
            print(
                f"service {service.label} did not stop in {SERVICE_STOP_TIMEOUT:.0f}s; killing it"
            )
            with contextlib.suppress(ProcessLookupError):
                os.killpg(service.process.pid, signal.SIGKILL)
            await service.process.wait()
        # Workers orphaned by a supervisor that died stay in its process group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(service.process.pid, signal.SIGTERM)


async def collect_counts(
    services: Sequence[Service], dead_letters: Mapping[str, int], run: Run
) -> Counts:
    """Sum the services' counters (read once they stopped) with the broker's and databases'."""
    stats = [service.stats() for service in services]
    total: Counter[str] = sum((s.counters for s in stats), Counter())
    republished = unsent = 0
    # One database per service, however many hosts run it.
    for service in {s.name: s for s in services}.values():
        status = await read_through_blips(service.app.store.outbox_status)
        republished += status.republished
        unsent += status.pending
    return Counts(
        orders=len(run.requests),
        handled=total["handled"],
        retries=total["retried"],
        requeued=total["requeued"],
        duplicates=total["duplicates"],
        dead_letters=sum(dead_letters.values()),
        republished=republished,
        unsent=unsent,
        worker_runs=sum(s.worker_runs for s in stats),
        logged_runs=sum(s.logged_runs for s in stats),
    )


def format_counts(counts: Counts) -> str:
    source = (
        f"all {counts.worker_runs} worker runs logged their stats"
        if counts.exact
        else f"lower bounds: {counts.logged_runs} of {counts.worker_runs} worker runs logged "
        "their final stats; a killed worker's last second is missing"
    )
    return f"counts: {counts.line()} ({source})"


async def _admin(url: sa.URL, statements: Sequence[str]) -> list[Any]:
    """Run `statements` on the server of `url`; returns the first value each one returned."""
    import asyncpg

    # pool_mode is txflow's, not the driver's; no statement cache, in case it is a pooler's.
    direct = url.difference_update_query(["pool_mode"]).set(drivername="postgresql")
    dsn = direct.render_as_string(hide_password=False)
    conn = await asyncpg.connect(dsn, timeout=10, statement_cache_size=0)
    try:
        return [await conn.fetchval(statement) for statement in statements]
    finally:
        await conn.close()


async def plan_concurrency(server: sa.URL, workers: int, apps: Sequence[TxFlow]) -> int:
    """The largest handler concurrency whose connections fit the server's free connections.

    Each message in flight holds a connection, so the services need about
    workers x (handlers x concurrency + PROCESS_CONNECTIONS per service) of them.
    """
    limit, reserved, in_use = await _admin(
        server,
        [
            "SHOW max_connections",
            "SHOW superuser_reserved_connections",
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'",
        ],
    )
    free = int(limit) - int(reserved) - int(in_use) - DEMO_CONNECTIONS
    handlers = sum(len(app.handlers) for app in apps)
    concurrency = min(
        MAX_CONCURRENCY, (free // workers - PROCESS_CONNECTIONS * len(apps)) // handlers
    )
    if concurrency < 1:
        raise DemoError(
            f"PostgreSQL has {free + DEMO_CONNECTIONS} free connections, too few for "
            f"{len(apps)} services x {workers} workers; lower --workers or raise max_connections"
        )
    return concurrency


# Something that harms the services while orders flow (the fault-injection tests use it);
# it is cancelled once every order is terminal.
Chaos = Callable[[Sequence["Service"]], Awaitable[None]]


async def run_distributed(args: argparse.Namespace, run: Run, chaos: Chaos | None = None) -> bool:
    """Three `txflow run` services on RabbitMQ, each with a fresh PostgreSQL database.

    The demo places orders through an orders app of its own with no handlers and no relay:
    `place_order` commits the order and its OrderCreated outbox row and sends NOTIFY; the orders
    service's relay (LISTEN) claims the row with SKIP LOCKED and publishes it. So the demo
    acts like a web front end writing to the service's database, and never consumes.
    """
    if not args.broker or not args.broker.startswith(("amqp://", "amqps://")):
        raise DemoError("--database needs --broker amqp://...: services in separate processes")
    server = sa.make_url(args.database)
    if server.get_backend_name() != "postgresql":
        raise DemoError("--database must be a postgresql:// URL (SQLite is one process only)")
    run_id = new_run_id()
    names = {name: f"{run_id}_{name}" for name in FACTORIES}
    urls = {
        name: server.set(database=db).render_as_string(hide_password=False)
        for name, db in names.items()
    }
    listen_urls = {}
    if args.listen_database:
        listen_server = sa.make_url(args.listen_database)
        listen_urls = {
            name: listen_server.set(database=db).render_as_string(hide_password=False)
            for name, db in names.items()
        }
    print(
        f"separate processes: broker {args.broker_display}, databases "
        f"{', '.join(names.values())} on {server.set(database='').render_as_string()}, "
        f"--workers {args.workers}"
    )
    await _admin(server, [f'CREATE DATABASE "{db}"' for db in names.values()])
    log_dir = Path(tempfile.mkdtemp(prefix=f"txflow-{run_id}-"))
    options = {"broker_url": args.broker, **broker_options(args, run_id)}
    apps = {
        name: factory(database_url=urls[name], listen_url=listen_urls.get(name), **options)
        for name, factory in FACTORIES.items()
    }
    services: list[Service] = []
    ok = False
    try:
        processes = args.workers * max(1, len(run.hosts))
        concurrency = args.concurrency or await plan_concurrency(
            server, processes, list(apps.values())
        )
        print(f"handler concurrency {concurrency} (each message in flight holds a connection)")
        for app in apps.values():
            await app.init_db()  # what `txflow db init` does
        await inventory.seed_stock(apps["inventory"], run.stock)
        # Declared before any service runs, so nothing emitted early is unroutable.
        async with open_transport(args.broker) as transport:
            for app in apps.values():
                await transport.declare(app.topology())
            services = await start_services(
                args, run_id, apps, urls, concurrency, log_dir, listen_urls, run.hosts
            )
            await wait_consuming(args.broker, list(apps.values()), services, processes)
            client = orders.create_app(
                handlers=False, relay=None, database_url=urls["orders"], **options
            )
            async with client, _client_tracing(args, run):
                harm = asyncio.ensure_future(chaos(services)) if chaos else None

                def check_alive() -> None:
                    # A fault injector that broke is a failed run, not a quiet one that
                    # waits for orders it was meant to release.
                    if harm is not None and harm.done() and not harm.cancelled():
                        if (error := harm.exception()) is not None:
                            raise DemoError(f"the chaos coroutine failed: {error!r}") from error
                    ensure_alive(services)

                try:
                    finished = await drive(client, run, check_alive)
                finally:
                    if harm is not None:
                        harm.cancel()
                        await asyncio.gather(harm, return_exceptions=True)
            await settle_dead_letters(list(apps.values()), transport, run)
            await stop_services(services)
            dead = await dead_letter_depths(list(apps.values()), transport)
            if run.expected_dead_letters is not None:
                # Before the queues are deleted; reading puts them back.
                run.dead_letter_details = await read_dead_letters(transport, dead)
        codes = {s.label: s.process.returncode for s in services}
        print(f"services stopped, exit codes {codes}")
        print("service logs: " + "; ".join(f"{s.label} {s.problems()}" for s in services))
        run.counts = await collect_counts(services, dead, run)
        print(format_counts(run.counts))
        ok = await report({n: a.store for n, a in apps.items()}, dead, run, finished)
        if any(codes.values()):
            print("FAIL  a service exited with a non-zero code")
            ok = False
        return ok
    finally:
        await stop_services(services)
        for app in apps.values():
            await app.stop()  # closes the store opened by init_db
        if args.keep:
            print(f"kept databases {list(names.values())}, queues {run_id}.*, logs {log_dir}")
        else:
            await _cleanup(
                "deleting the run's queues",
                _rabbit.delete_topology(args.broker, [a.topology() for a in apps.values()]),
            )
            await _cleanup(
                "dropping the run's databases",
                _admin(
                    server,
                    [f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)' for db in names.values()],
                ),
            )
            if ok:
                shutil.rmtree(log_dir, ignore_errors=True)
            else:
                print(f"service logs kept in {log_dir}")


@contextlib.asynccontextmanager
async def _client_tracing(args: argparse.Namespace, run: Run) -> AsyncIterator[None]:
    """With --trace-dir, the demo's `place order` spans go to DIR/web-<pid>.jsonl.

    A provider of its own rather than the global one: the demo may run inside another
    program (the tests), whose tracing it must leave alone.
    """
    if not args.trace_dir:
        yield
        return
    from examples.order_inventory.traced import span_file_provider

    provider = span_file_provider("web", Path(args.trace_dir))
    run.tracer = provider.get_tracer(__name__)
    try:
        yield
    finally:
        provider.shutdown()  # flushes: every span is in the file when the demo reports


async def _cleanup(what: str, step: Awaitable[object]) -> None:
    # One failed cleanup step must not skip the others, nor hide the demo's own error.
    try:
        await step
    except Exception as exc:
        print(f"warning: {what} failed: {exc!r}", file=sys.stderr)


# -- command line -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m examples.order_inventory.demo",
        description="Run the order/inventory/payment example and check its invariants.",
    )
    parser.add_argument("--orders", type=int, default=DEFAULT_ORDERS, help="orders to place")
    parser.add_argument(
        "--broker",
        action="append",
        help="amqp://... (default: an in-memory broker); repeat it, or separate URLs with "
        "commas, for the nodes of a cluster",
    )
    parser.add_argument(
        "--quorum-queues",
        action="store_true",
        help="declare quorum queues (replicated across a cluster's nodes)",
    )
    parser.add_argument(
        "--database",
        help="postgresql://.../db: run the services as separate processes, each with a fresh "
        "database on this server (default: SQLite files, one process)",
    )
    parser.add_argument(
        "--listen-database",
        help="postgresql://...: a direct connection to the server of --database, for the "
        "relays' LISTEN, when --database goes through a transaction pooler "
        "(?pool_mode=transaction)",
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes per service")
    parser.add_argument(
        "--concurrency",
        type=int,
        help="messages each handler works on at once, per worker (default: what fits "
        "PostgreSQL's max_connections; in one process: txflow's default)",
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds for all orders to end"
    )
    parser.add_argument("--seed", type=int, default=7, help="seed of the order mix")
    parser.add_argument("--keep", action="store_true", help="keep databases, queues and logs")
    parser.add_argument(
        "--trace-dir",
        help="run the services traced (needs the OpenTelemetry SDK): every process writes "
        "its spans to DIR/<service>-<pid>.jsonl (needs --database)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log txflow at INFO")
    args = parser.parse_args(argv)
    if args.orders < 1 or args.workers < 1:
        parser.error("--orders and --workers must be at least 1")
    if args.database and not args.broker:
        parser.error("--database needs --broker amqp://... (separate processes need RabbitMQ)")
    if args.trace_dir and not args.database:
        parser.error("--trace-dir needs --database: each service traces in its own process")
    if args.trace_dir:
        args.trace_dir = str(Path(args.trace_dir).resolve())  # the services run elsewhere
    nodes = [url.strip() for urls in args.broker or [] for url in urls.split(",") if url.strip()]
    args.broker = ",".join(nodes) or None
    args.broker_display = ",".join(sa.make_url(url).render_as_string() for url in nodes) or None
    return args


def new_run(args: argparse.Namespace) -> Run:
    """The orders and stock `args` ask for."""
    requests = make_orders(args.orders, args.seed)
    return Run(requests, initial_stock(requests), args.timeout)


async def amain(
    args: argparse.Namespace, chaos: Chaos | None = None, run: Run | None = None
) -> bool:
    """Run the demo; True if every check passed.

    Pass `run` (from `new_run`) to set what the run expects, and to read what it counted.
    """
    if run is None:
        run = new_run(args)
    if args.database:
        return await run_distributed(args, run, chaos)
    return await run_in_process(args, run)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        ok = asyncio.run(amain(args))
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
