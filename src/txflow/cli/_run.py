"""`txflow run`: serve an app until a signal, waiting out an unreachable broker or database."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import time
from dataclasses import replace

from txflow._app import TxFlow
from txflow._config import LISTEN_URL_ENV, resolve_broker_url, resolve_database_url
from txflow._logging import set_process_app
from txflow._metrics import MetricsConfig, MetricsServer, check_port
from txflow.cli._common import (
    EXIT_STUCK,
    LOG_FORMATS,
    Backoff,
    add_urls,
    apply_urls,
    load_app,
    log,
    run_async,
)
from txflow.cli._supervisor import READY_FD_ENV, SUPERVISED_METRICS_ENV, Supervisor, check_urls
from txflow.errors import ConnectionFailedError, mask_url

# Seconds a stopping worker gets beyond twice its shutdown timeout before it exits anyway.
STOP_MARGIN = 30.0


def add_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = sub.add_parser("run", help="run an app's handlers and outbox relay")
    run.add_argument("target", help="module:attribute naming a TxFlow app (or a factory)")
    add_urls(run)
    run.add_argument(
        "--listen-url",
        help=f"PostgreSQL URL for the relay's LISTEN only, a direct connection when --database "
        f"goes through a transaction pooler (default ${LISTEN_URL_ENV}, else the database URL)",
    )
    run.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    run.add_argument(
        "--log-level",
        default="info",
        type=str.lower,
        choices=["debug", "info", "warning", "error", "critical"],
        help="log level (default info)",
    )
    run.add_argument(
        "--log-format",
        default="text",
        choices=LOG_FORMATS,
        help="text lines (default), or json: one object per line naming the app, handler, "
        "message, correlation, trace and span ids",
    )
    run.add_argument(
        "--metrics-port",
        metavar="PORT",
        help="record Prometheus metrics and serve them at http://HOST:PORT/metrics, summed "
        "over all workers (0 picks a free port, logged)",
    )
    run.add_argument(
        "--metrics-host",
        metavar="HOST",
        help="the address to serve metrics on (default 0.0.0.0, every interface)",
    )
    run.add_argument(
        "--shutdown-timeout", type=float, help="seconds to finish in-flight work on stop"
    )
    give_up = run.add_mutually_exclusive_group()
    give_up.add_argument(
        "--start-timeout",
        type=float,
        metavar="SECONDS",
        help="exit with code 69 if the broker or database is still unreachable after this "
        "long at start (default: wait for them for ever)",
    )
    give_up.add_argument(
        "--fail-fast",
        action="store_const",
        const=0.0,
        dest="start_timeout",
        help="exit with code 69 at once if the broker or database is unreachable at start",
    )
    run.set_defaults(func=_cmd_run)


# Signals that arrived before the event loop took over signal handling (during imports and
# start-up); they still mean "stop gracefully".
_early_signals: list[int] = []


def _record_early_signal(signum: int, _frame: object) -> None:
    _early_signals.append(signum)


def _cmd_run(args: argparse.Namespace) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _record_early_signal)
    app = load_app(args.target)
    set_process_app(app.name)
    apply_urls(app, args)
    if args.listen_url:
        app.listen_url = args.listen_url
    if args.shutdown_timeout is not None:
        app.shutdown_timeout = args.shutdown_timeout
    metrics = _metrics_config(app, args)
    check_urls(app, workers=args.workers)
    if args.workers > 1:
        return Supervisor(args, app.shutdown_timeout, metrics).run()
    if os.environ.get(SUPERVISED_METRICS_ENV):
        # A worker of a supervisor that serves the sum of its workers' metrics.
        metrics = MetricsConfig() if metrics is None else metrics
        app.metrics = replace(metrics, port=None)
        metrics = None
    # Bound here, before the app starts: a port that is taken fails now, with exit code 2.
    server = None
    if metrics is not None and metrics.port is not None:
        server = MetricsServer(metrics.host, metrics.port)
        app.metrics = replace(metrics, port=None)
    try:
        run_async(lambda: _serve(app, args.start_timeout))
    finally:
        if server is not None:
            server.close()
    return 0


def _metrics_config(app: TxFlow, args: argparse.Namespace) -> MetricsConfig | None:
    """The app's `metrics` with `--metrics-port` and `--metrics-host` applied.

    Raises:
        ConfigurationError: the port is not a port number.
    """
    metrics = app.metrics
    if args.metrics_port is not None:
        metrics = replace(metrics or MetricsConfig(), port=check_port(args.metrics_port))
    if args.metrics_host:
        metrics = replace(metrics or MetricsConfig(), host=args.metrics_host)
    return metrics


async def _serve(app: TxFlow, start_timeout: float | None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if _early_signals:
        stop.set()
    if not await _start_when_reachable(app, stop, start_timeout):
        log.info("%s stopped before it started serving", app.name)
        return
    _tell_supervisor_ready()
    log.info("%s running; SIGINT or SIGTERM stops it gracefully", app.name)
    try:
        await stop.wait()
    finally:
        log.info("%s stopping: finishing in-flight handlers and draining the outbox", app.name)
        await _stop_or_exit(app)
        log.info("%s stopped", app.name)


async def _start_when_reachable(
    app: TxFlow, stop: asyncio.Event, start_timeout: float | None
) -> bool:
    """Start `app`, retrying with backoff while the broker or database is unreachable.

    Returns False if a stop signal came first. Logs the first failure and each change of
    reason, not every attempt.

    Raises:
        ConnectionFailedError: still unreachable after `start_timeout` seconds.
        TxflowError: any other error of `app.start()` (configuration), at once.
    """
    log.info(
        "%s starting on %s and %s; %s",
        app.name,
        mask_url(resolve_broker_url(app.broker_url)),
        mask_url(resolve_database_url(app.database_url, app.name)),
        "an unreachable one is waited for with backoff"
        if start_timeout is None
        else f"giving up if one is unreachable for {start_timeout:g}s",
    )
    backoff = Backoff()
    began = time.monotonic()
    reason: str | None = None
    while not stop.is_set():
        try:
            await app.start()
        except ConnectionFailedError as exc:
            waited = time.monotonic() - began
            if start_timeout is not None and waited >= start_timeout:
                raise
            if type(exc).__name__ != reason:
                reason = type(exc).__name__
                log.warning("%s cannot start yet, waiting: %s", app.name, exc)
            delay = backoff.next()
            if start_timeout is not None:
                delay = min(delay, max(0.0, start_timeout - waited))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            continue
        if reason is not None:
            log.info(
                "%s reached its broker and database after %.1fs",
                app.name,
                time.monotonic() - began,
            )
        return True
    return False


def _tell_supervisor_ready() -> None:
    """Write to the supervisor's readiness pipe, if this process is one of its workers."""
    fd = os.environ.pop(READY_FD_ENV, None)
    if fd is None:
        return
    with contextlib.suppress(OSError, ValueError):
        os.write(int(fd), b"ready\n")
        os.close(int(fd))


async def _stop_or_exit(app: TxFlow) -> None:
    """`app.stop()`, but a worker never hangs on the way out.

    A stop has `shutdown_timeout` for handlers and again for the relay; if closing still does
    not finish (a driver stuck on a dead socket), the process exits anyway. Nothing is lost:
    unacked messages are redelivered, unsent outbox rows wait for the next relay, and the
    database releases whatever the process's connections held.
    """
    limit = 2 * app.shutdown_timeout + STOP_MARGIN
    # Plain asyncio, not a cancel scope: the limit must hold even if the stop never answers
    # a cancellation, so the stop runs in a task of its own that is left behind, not awaited.
    stopping = asyncio.create_task(app.stop())
    done, _ = await asyncio.wait({stopping}, timeout=limit)
    if not done:
        log.error("%s did not stop within %.0fs; exiting without closing", app.name, limit)
        logging.shutdown()
        os._exit(EXIT_STUCK)
    stopping.result()
