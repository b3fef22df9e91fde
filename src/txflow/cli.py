"""The `txflow` command: run apps, create tables, inspect the outbox.

    txflow run module:app [--broker URL] [--database URL] [--workers N] [--log-level LEVEL]
    txflow db init module:app [--database URL]
    txflow outbox status module:app [--database URL] [--json]
    txflow dlq list module:app | show QUEUE | replay QUEUE --id ID|--all|--exception-type T
    txflow dlq purge QUEUE --yes
    txflow flows list [--status S] [--flow NAME] | show ID   (see cli_flows)
    txflow graph module:app [module:app ...]

Errors print one line naming the fix and exit non-zero: 2 for usage and configuration
errors (bad target, bad URL), 1 for unreachable services.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import sqlalchemy as sa

from txflow import dlq
from txflow.abc import Transport
from txflow.app import TxFlow
from txflow.config import (
    BROKER_URL_ENV,
    DATABASE_URL_ENV,
    open_transport,
    resolve_broker_url,
    resolve_database_url,
)
from txflow.errors import (
    AppNotFoundError,
    ConfigurationError,
    ConnectionFailedError,
    TxflowError,
)
from txflow.store import Store, open_store

log = logging.getLogger("txflow.cli")

T = TypeVar("T")

EXIT_USAGE = 2
EXIT_UNAVAILABLE = 1
# A worker that dies this soon after starting counts as failing to start.
WORKER_START_GRACE = 5.0
# Respawns of quickly failing workers before the supervisor gives up.
MAX_QUICK_FAILURES = 5
# Seconds a stopping worker gets beyond twice its shutdown timeout before it exits anyway.
STOP_MARGIN = 30.0
# Exit code of a worker that had to exit without closing its connections.
EXIT_STUCK = 3
LOG_FORMAT = "%(asctime)s %(levelname)-7s [%(process)d] %(name)s: %(message)s"


def load_app(target: str) -> TxFlow:
    """Import `module:attribute` and return the `TxFlow` it names (calling a factory).

    Raises:
        AppNotFoundError: the target is malformed, or the module or attribute does not exist.
    """
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise AppNotFoundError(
            f"target {target!r} is not of the form module:attribute, e.g. myservice.main:app"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise AppNotFoundError(
                f"cannot import module {module_name!r} ({exc}); run from the project "
                "directory or add it to PYTHONPATH"
            ) from exc
        raise AppNotFoundError(f"importing {module_name!r} failed: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AppNotFoundError(
                f"module {module_name!r} has no attribute {attr!r}; "
                f"expected {module_name}:<name of your TxFlow app>"
            )
        obj = getattr(obj, part)
    if callable(obj) and not isinstance(obj, TxFlow):
        obj = obj()
    if not isinstance(obj, TxFlow):
        raise AppNotFoundError(
            f"{target} is a {type(obj).__name__}, not a TxFlow app (or a function returning one)"
        )
    return obj


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    # aiormq logs each failed connection attempt as an error with a traceback; txflow's own
    # lines name the broker and the fix, so keep the library quiet unless debugging.
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("aiormq").setLevel(logging.CRITICAL)
        logging.getLogger("aio_pika").setLevel(logging.ERROR)


def _run_async(main: Callable[[], Awaitable[T]]) -> T:
    """Run `main` on uvloop when it is installed, else on asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())  # type: ignore[arg-type]
    return uvloop.run(main())  # type: ignore[arg-type]


def _apply_urls(app: TxFlow, args: argparse.Namespace) -> None:
    if getattr(args, "broker", None):
        app.broker_url = args.broker
    if getattr(args, "database", None):
        app.database_url = args.database


# -- txflow run ------------------------------------------------------------------------------


# Signals that arrived before the event loop took over signal handling (during imports and
# start-up); they still mean "stop gracefully".
_early_signals: list[int] = []


def _record_early_signal(signum: int, _frame: object) -> None:
    _early_signals.append(signum)


async def _serve(app: TxFlow) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if _early_signals:
        stop.set()
    await app.start()
    log.info("%s running; SIGINT or SIGTERM stops it gracefully", app.name)
    try:
        await stop.wait()
    finally:
        log.info("%s stopping: finishing in-flight handlers and draining the outbox", app.name)
        await _stop_or_exit(app)
        log.info("%s stopped", app.name)


async def _stop_or_exit(app: TxFlow) -> None:
    """`app.stop()`, but a worker never hangs on the way out.

    A stop has `shutdown_timeout` for handlers and again for the relay; if closing still does
    not finish (a driver stuck on a dead socket), the process exits anyway. Nothing is lost:
    unacked messages are redelivered, unsent outbox rows wait for the next relay, and the
    database releases whatever the process's connections held.
    """
    limit = 2 * app.shutdown_timeout + STOP_MARGIN
    stopping = asyncio.create_task(app.stop())
    done, _ = await asyncio.wait({stopping}, timeout=limit)
    if not done:
        log.error("%s did not stop within %.0fs; exiting without closing", app.name, limit)
        logging.shutdown()
        os._exit(EXIT_STUCK)
    stopping.result()


async def _check_reachable(app: TxFlow) -> None:
    """Connect once to the database and the broker, so a supervisor fails fast and clearly."""
    await app.open_store()
    try:
        transport = open_transport(resolve_broker_url(app.broker_url))
        await transport.connect()
        await transport.aclose()
    finally:
        await app.stop()  # closes the store again


def _cmd_run(args: argparse.Namespace) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _record_early_signal)
    app = load_app(args.target)
    _apply_urls(app, args)
    if args.shutdown_timeout is not None:
        app.shutdown_timeout = args.shutdown_timeout
    if args.workers > 1:
        broker = resolve_broker_url(app.broker_url)
        if broker.startswith("memory:"):
            raise ConfigurationError(
                "--workers > 1 needs a real broker: the in-memory broker lives inside one "
                f"process; pass --broker amqp://... or set {BROKER_URL_ENV}"
            )
        _run_async(lambda: _check_reachable(app))
        return _supervise(args, app.shutdown_timeout)
    _run_async(lambda: _serve(app))
    return 0


def _worker_argv(args: argparse.Namespace) -> list[str]:
    argv = [sys.executable, "-m", "txflow", "run", args.target, "--workers", "1"]
    argv += ["--log-level", args.log_level]
    if args.broker:
        argv += ["--broker", args.broker]
    if args.database:
        argv += ["--database", args.database]
    if args.shutdown_timeout is not None:
        argv += ["--shutdown-timeout", str(args.shutdown_timeout)]
    return argv


def _supervise(args: argparse.Namespace, shutdown_timeout: float) -> int:
    """Run `args.workers` worker processes; restart any that die; forward SIGINT/SIGTERM."""
    argv = _worker_argv(args)
    stopping: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    workers: dict[int, tuple[subprocess.Popen[bytes], float]] = {}
    quick_failures = 0
    for slot in range(args.workers):
        workers[slot] = (subprocess.Popen(argv), time.monotonic())
    log.info("supervising %d workers of %s", args.workers, args.target)
    while not stopping:
        time.sleep(0.2)
        for slot, (proc, started) in list(workers.items()):
            code = proc.poll()
            if code is None or stopping:
                continue
            # A worker killed by a signal is restarted without counting; one that exits with
            # an error right after starting (bad config, unreachable service) counts.
            quick = code > 0 and time.monotonic() - started < WORKER_START_GRACE
            quick_failures = quick_failures + 1 if quick else 0
            if quick_failures > MAX_QUICK_FAILURES:
                log.error("workers keep failing at start; giving up (last exit code %s)", code)
                stopping.append(signal.SIGTERM)
                break
            log.warning("worker %d (pid %d) exited with %s; restarting", slot, proc.pid, code)
            workers[slot] = (subprocess.Popen(argv), time.monotonic())
    for proc, _ in workers.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    # A worker waits up to shutdown_timeout for handlers and again for the relay.
    deadline = time.monotonic() + shutdown_timeout * 2 + 5
    for proc, _ in workers.values():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("worker pid %d did not stop in time; killing it", proc.pid)
            proc.kill()
    return 0 if quick_failures <= MAX_QUICK_FAILURES else EXIT_UNAVAILABLE


# -- txflow db / outbox -----------------------------------------------------------------------


def _cmd_db_init(args: argparse.Namespace) -> int:
    app = load_app(args.target)
    _apply_urls(app, args)

    async def main() -> str:
        await app.init_db()
        url = app.store.masked_url
        await app.store.aclose()
        return url

    url = _run_async(main)
    extra = " and the app's own" if app.metadata is not None else ""
    print(f"created txflow's tables{extra} in {url}")
    return 0


def existing_store(url: str | None, app_option: str) -> Store:
    """A store for `url` (else `$TXFLOW_DATABASE_URL`) that must already exist; not connected.

    Raises:
        ConfigurationError: no URL at all, or a SQLite file that is not there.
    """
    url = url or os.environ.get(DATABASE_URL_ENV)
    if not url:
        raise ConfigurationError(
            f"no database: pass {app_option}, --database URL, or set {DATABASE_URL_ENV}"
        )
    store = open_store(url)
    path = store.url.database
    if store.url.get_backend_name() == "sqlite" and path and not os.path.exists(path):
        raise ConfigurationError(f"no SQLite database at {path}; check the path or --database")
    return store


def _cmd_outbox_status(args: argparse.Namespace) -> int:
    url = args.database
    if args.target:
        app = load_app(args.target)
        _apply_urls(app, args)
        url = resolve_database_url(app.database_url, app.name)
    store = existing_store(url, "module:app")

    async def main() -> dict[str, Any]:
        await store.connect()
        try:
            status = await store.outbox_status()
        except sa.exc.SQLAlchemyError as exc:
            cause = getattr(exc, "orig", None) or exc
            raise ConfigurationError(
                f"cannot read the outbox in {store.masked_url} ({type(cause).__name__}); "
                "are txflow's tables there? `txflow db init module:app` creates them"
            ) from exc
        finally:
            await store.aclose()
        oldest = status.oldest_pending_at
        return {
            "database": store.masked_url,
            "pending": status.pending,
            "oldest_pending_at": oldest.isoformat() if oldest else None,
            "lag_seconds": round(status.lag_seconds(datetime.now(UTC)), 3),
            "sent_retained": status.sent_retained,
            "republished": status.republished,
            "by_relay": [
                {
                    "relay": b.relay or "unclaimed",
                    "pending": b.pending,
                    "oldest_pending_at": b.oldest_pending_at.isoformat()
                    if b.oldest_pending_at
                    else None,
                }
                for b in status.by_relay
            ],
        }

    report = _run_async(main)
    if args.json:
        print(json.dumps(report))
        return 0
    by_relay = report.pop("by_relay")
    width = max(len(k) for k in report)
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")
    if by_relay:
        print()
        _print_table(by_relay, ["relay", "pending", "oldest_pending_at"])
    return 0


# -- txflow dlq -------------------------------------------------------------------------------


def _on_broker(
    args: argparse.Namespace, work: Callable[[Transport], Awaitable[T]], app: TxFlow | None = None
) -> T:
    """Connect to the broker the arguments name, run `work` on it, close."""
    url = args.broker or (app.broker_url if app else None) or os.environ.get(BROKER_URL_ENV)
    if not url or url.startswith("memory:"):
        raise ConfigurationError(
            f"dead-letter commands need the broker: pass --broker amqp://... or set "
            f"{BROKER_URL_ENV} (the in-memory broker lives inside its own process)"
        )
    transport = open_transport(url)

    async def main() -> T:
        await transport.connect()
        try:
            return await work(transport)
        finally:
            await transport.aclose()

    return _run_async(main)


def _print_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    widths = {c: max([len(c), *(len(str(r.get(c, ""))) for r in rows)]) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns).rstrip())


def _cmd_dlq_list(args: argparse.Namespace) -> int:
    app = load_app(args.target)
    found = _on_broker(args, lambda t: dlq.counts(t, app.topology()), app)
    rows = [{"queue": c.queue, "messages": c.messages, "handler": c.handler_queue} for c in found]
    if args.json:
        print(json.dumps(rows))
    else:
        _print_table(rows, ["queue", "messages"])
    return 0


def _cmd_dlq_show(args: argparse.Namespace) -> int:
    infos = _on_broker(args, lambda t: dlq.show(t, args.queue, args.limit))
    if args.json:
        print(json.dumps([dataclasses.asdict(i) for i in infos]))
        return 0
    rows = [
        {
            "message_id": i.message_id,
            "event": i.event_type,
            "handler": i.handler,
            "attempts": i.attempts,
            "exception": (i.exception_type or "").rsplit(".", 1)[-1],
            "reason": _shorten(i.reason or "", 60),
            "last_failure": i.last_failure_at,
        }
        for i in infos
    ]
    print(f"{len(rows)} dead letter(s) in {dlq.dead_letter_queue(args.queue)}")
    if rows:
        _print_table(rows, list(rows[0]))
    if args.body:
        for info in infos:
            print(f"\n{info.message_id} ({info.content_type}):\n{info.body}")
    return 0


def _shorten(text: str, width: int) -> str:
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= width else line[: width - 1] + "…"


def _cmd_dlq_replay(args: argparse.Namespace) -> int:
    count = _on_broker(
        args,
        lambda t: dlq.replay(
            t,
            args.queue,
            message_ids=args.id or (),
            exception_type=args.exception_type,
            replay_all=args.all,
        ),
    )
    target = dlq.handler_queue(dlq.dead_letter_queue(args.queue))
    if args.json:
        print(json.dumps({"replayed": count, "to": target}))
    else:
        print(f"replayed {count} message(s) to {target}")
    return 0


def _cmd_dlq_purge(args: argparse.Namespace) -> int:
    if not args.yes:
        raise ConfigurationError("purge deletes dead letters for good; add --yes to confirm")
    count = _on_broker(args, lambda t: dlq.purge(t, args.queue))
    if args.json:
        print(json.dumps({"purged": count}))
    else:
        print(f"purged {count} message(s) from {dlq.dead_letter_queue(args.queue)}")
    return 0


def _add_dlq_commands(sub: Any) -> None:
    group = sub.add_parser("dlq", help="inspect and replay dead letters").add_subparsers(
        dest="dlq", required=True
    )

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--broker", help=f"broker URL (default ${BROKER_URL_ENV})")
        p.add_argument("--json", action="store_true", help="print JSON")

    listing = group.add_parser("list", help="dead letters per queue of an app")
    listing.add_argument("target", help="module:attribute naming a TxFlow app")
    common(listing)
    listing.set_defaults(func=_cmd_dlq_list)

    show_ = group.add_parser("show", help="dead letters of a queue, with reasons")
    show_.add_argument("queue", help="a handler queue or its .dlq")
    show_.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    show_.add_argument("--body", action="store_true", help="also print each message's body")
    common(show_)
    show_.set_defaults(func=_cmd_dlq_show)

    replay_ = group.add_parser("replay", help="send dead letters back to their handler")
    replay_.add_argument("queue", help="a handler queue or its .dlq")
    which = replay_.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", action="append", help="a message id (repeatable)")
    which.add_argument("--all", action="store_true", help="every dead letter in the queue")
    which.add_argument("--exception-type", help="those that died of this exception type")
    common(replay_)
    replay_.set_defaults(func=_cmd_dlq_replay)

    purge_ = group.add_parser("purge", help="delete every dead letter of a queue")
    purge_.add_argument("queue", help="a handler queue or its .dlq")
    purge_.add_argument("--yes", action="store_true", help="confirm: the messages are gone")
    common(purge_)
    purge_.set_defaults(func=_cmd_dlq_purge)


# -- entry point ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="txflow", description="Reliable event-driven flows on RabbitMQ and PostgreSQL."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add_urls(p: argparse.ArgumentParser, broker: bool = True) -> None:
        if broker:
            p.add_argument("--broker", help=f"broker URL (default ${BROKER_URL_ENV} or memory://)")
        p.add_argument(
            "--database", help=f"database URL (default ${DATABASE_URL_ENV} or a SQLite file)"
        )

    run = sub.add_parser("run", help="run an app's handlers and outbox relay")
    run.add_argument("target", help="module:attribute naming a TxFlow app (or a factory)")
    add_urls(run)
    run.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    run.add_argument(
        "--log-level",
        default="info",
        type=str.lower,
        choices=["debug", "info", "warning", "error", "critical"],
        help="log level (default info)",
    )
    run.add_argument(
        "--shutdown-timeout", type=float, help="seconds to finish in-flight work on stop"
    )
    run.set_defaults(func=_cmd_run)

    db = sub.add_parser("db", help="database commands").add_subparsers(dest="db", required=True)
    init = db.add_parser("init", help="create txflow's tables and the app's own")
    init.add_argument("target", help="module:attribute naming a TxFlow app")
    add_urls(init, broker=False)
    init.set_defaults(func=_cmd_db_init)

    ob = sub.add_parser("outbox", help="outbox commands").add_subparsers(dest="ob", required=True)
    status = ob.add_parser("status", help="pending rows, oldest age, republished rows")
    status.add_argument("target", nargs="?", help="module:attribute naming a TxFlow app")
    add_urls(status, broker=False)
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=_cmd_outbox_status)
    _add_dlq_commands(sub)
    from txflow import cli_flows  # it imports helpers from this module

    cli_flows.add_commands(sub, lambda p: add_urls(p, broker=False))

    graph = sub.add_parser("graph", help="print the event chain of apps as a Mermaid diagram")
    graph.add_argument("targets", nargs="+", help="module:attribute of each app to draw")
    graph.set_defaults(func=_cmd_graph)
    return parser


def _cmd_graph(args: argparse.Namespace) -> int:
    from txflow.graph import mermaid

    print(mermaid([load_app(target) for target in args.targets]))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(getattr(args, "log_level", "warning"))
    if getattr(args, "workers", 1) < 1:
        parser.error("--workers must be at least 1")
    try:
        code: int = args.func(args)
    except ConnectionFailedError as exc:
        print(f"txflow: error: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except TxflowError as exc:
        print(f"txflow: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
