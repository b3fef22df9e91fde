"""`txflow run --workers N`: worker processes kept running through outages and crashes.

Each worker is `python -m txflow run TARGET --workers 1 ...`. A worker waits for an
unreachable broker or database by itself, so an outage costs no respawns. A worker that
served and was killed is started again at once; one stopped or killed from outside before it
served, after a short backoff (at most `STOPPED_CAP`); one that crashes, or exits on its own
before it served, after a backoff that grows while its slot keeps doing so (at most 30 s).
Healthy workers are never
touched. The supervisor gives up only on what a restart cannot fix: a worker exiting with a
configuration error, or workers crashing on the app's own code right after starting several
times in a row. Workers say they serve through a pipe whose file descriptor is in
`$TXFLOW_READY_FD`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from txflow._app import TxFlow
from txflow._config import (
    BROKER_URL_ENV,
    open_transport,
    resolve_broker_url,
    resolve_database_url,
    resolve_listen_url,
)
from txflow._metrics import MetricsConfig, WorkerMetrics
from txflow.cli._common import (
    EXIT_CRASHING,
    EXIT_OK,
    EXIT_STUCK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    Backoff,
    log,
)
from txflow.errors import ConfigurationError
from txflow.store import open_store

READY_FD_ENV = "TXFLOW_READY_FD"
# Set for workers of a supervisor that serves their metrics: record them, do not serve.
SUPERVISED_METRICS_ENV = "TXFLOW_SUPERVISED_METRICS"
# Seconds between two looks at the workers.
POLL_INTERVAL = 0.1
# Seconds a worker must have served before it counts as healthy: a death after that is
# respawned at once and resets the crash count; a death before it backs off.
HEALTHY_AFTER = 30.0
# Crashes in a row (exit codes other than those below, before HEALTHY_AFTER) that make the
# supervisor give up: the app's code fails the same way every time.
MAX_CRASHES = 5
# Most seconds a slot waits after its worker was stopped or killed from outside before it
# served (a kill storm while starts are slow, or the OOM killer at start): short, so that
# kills cannot keep a service down, but never a tight loop of starts.
STOPPED_CAP = 2.0
# Signals someone sends a process to stop it, and those a process gets for its own fault.
_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGKILL})
_CRASH_SIGNALS = frozenset(
    {signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGFPE, signal.SIGILL}
)
# Seconds the supervisor adds to twice the shutdown timeout when waiting for workers to stop.
STOP_GRACE = 5.0


def check_urls(app: TxFlow, *, workers: int) -> None:
    """Fail at once, before anything starts, on URLs no worker could get past.

    Nothing is connected: an unreachable server is waited for by the workers.

    Raises:
        ConfigurationError: an unsupported URL, or the in-process broker with several
            workers (it cannot be shared between processes).
    """
    broker = resolve_broker_url(app.broker_url)
    if workers > 1 and broker.startswith("memory:"):
        raise ConfigurationError(
            "--workers > 1 needs a real broker: the in-memory broker lives inside one "
            f"process; pass --broker amqp://... or set {BROKER_URL_ENV}"
        )
    open_transport(broker)
    open_store(
        resolve_database_url(app.database_url, app.name),
        listen_url=resolve_listen_url(app.listen_url),
    )


def _is_crash(code: int) -> bool:
    """An exit that says the app's code failed (an error, or a signal such as SIGSEGV for its
    own fault), not the infrastructure nor someone stopping it."""
    if code < 0:
        return -code in _CRASH_SIGNALS
    return code > 0 and code not in (EXIT_UNAVAILABLE, EXIT_STUCK)


def _stopped(code: int) -> bool:
    """An exit that someone else caused: a stop or kill signal, or a graceful stop (0)."""
    return code == EXIT_OK or (code < 0 and -code in _STOP_SIGNALS)


@dataclass
class _Slot:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    ready_fd: int | None = None
    ready_at: float | None = None
    healthy: bool = False
    restart_at: float = 0.0
    backoff: Backoff = field(default_factory=Backoff)
    stopped: Backoff = field(default_factory=lambda: Backoff(cap=STOPPED_CAP))

    def restart_delay(self, code: int) -> float:
        """Seconds to wait before starting this slot's worker again, which exited `code`."""
        if self.healthy:
            return 0.0
        if _is_crash(code):
            return self.backoff.next()
        if self.ready_at is not None:
            return 0.0  # it served, then was stopped, killed or lost its server
        if _stopped(code):
            return self.stopped.next()
        return self.backoff.next()  # e.g. 69: it gave up on a server before it served

    def started(self) -> None:
        """The worker serves: its next start is not a retry of this one."""
        self.backoff.reset()
        self.stopped.reset()


class Supervisor:
    """Runs `args.workers` workers of `args.target` until SIGINT/SIGTERM or a fatal exit."""

    def __init__(
        self,
        args: argparse.Namespace,
        shutdown_timeout: float,
        metrics: MetricsConfig | None = None,
    ) -> None:
        self._args = args
        self._shutdown_timeout = shutdown_timeout
        self._metrics_config = metrics
        self._metrics: WorkerMetrics | None = None
        self._slots = [_Slot(i) for i in range(args.workers)]
        self._signals: list[int] = []
        self._result: int | None = None
        self._crashes = 0
        self._ever_ready = False

    def run(self) -> int:
        """Supervise; returns the exit code (0 after a graceful stop).

        Raises:
            ConfigurationError: the metrics port is taken (before any worker starts).
        """
        config = self._metrics_config
        if config is not None and config.port is not None:
            # The supervisor serves the sum of its workers' metrics, which they write into
            # files of one directory (prometheus-client's multiprocess mode).
            self._metrics = WorkerMetrics(config.host, config.port)
        try:
            return self._supervise()
        finally:
            if self._metrics is not None:
                self._metrics.close()

    def _supervise(self) -> int:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        for slot in self._slots:
            self._spawn(slot)
        log.info("supervising %d workers of %s", len(self._slots), self._args.target)
        while self._result is None and not self._signals:
            time.sleep(POLL_INTERVAL)
            for slot in self._slots:
                self._look_at(slot, time.monotonic())
                if self._result is not None or self._signals:
                    break
        self._stop_workers()
        return EXIT_OK if self._result is None else self._result

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signals.append(signum)

    def _argv(self) -> list[str]:
        args = self._args
        argv = [sys.executable, "-m", "txflow", "run", args.target, "--workers", "1"]
        argv += ["--log-level", args.log_level, "--log-format", args.log_format]
        if args.broker:
            argv += ["--broker", args.broker]
        if args.database:
            argv += ["--database", args.database]
        if args.listen_url:
            argv += ["--listen-url", args.listen_url]
        if args.shutdown_timeout is not None:
            argv += ["--shutdown-timeout", str(args.shutdown_timeout)]
        # Only until the service served once: after that a respawned worker waits out an
        # outage like its running siblings do, rather than fail and be respawned again.
        if args.start_timeout is not None and not self._ever_ready:
            argv += ["--start-timeout", str(args.start_timeout)]
        return argv

    def _spawn(self, slot: _Slot) -> None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        env = {**os.environ, READY_FD_ENV: str(write_fd)}
        if self._metrics is not None:
            env.update(self._metrics.env(), **{SUPERVISED_METRICS_ENV: "1"})
        try:
            slot.proc = subprocess.Popen(self._argv(), env=env, pass_fds=(write_fd,))
        finally:
            os.close(write_fd)
        slot.ready_fd = read_fd
        slot.ready_at = None
        slot.healthy = False

    def _look_at(self, slot: _Slot, now: float) -> None:
        if slot.proc is None:
            if now >= slot.restart_at:
                self._spawn(slot)
            return
        self._read_ready(slot, now)
        if slot.ready_at is not None and not slot.healthy and now - slot.ready_at >= HEALTHY_AFTER:
            slot.healthy = True
            slot.started()
            self._crashes = 0
        code = slot.proc.poll()
        if code is not None:
            self._exited(slot, code, now)

    def _read_ready(self, slot: _Slot, now: float) -> None:
        if slot.ready_fd is None:
            return
        try:
            data = os.read(slot.ready_fd, 64)
        except BlockingIOError:
            return
        self._close_ready(slot)
        if data:  # b"" is the worker gone without saying it was ready
            slot.ready_at = now
            slot.started()
            self._ever_ready = True

    def _close_ready(self, slot: _Slot) -> None:
        if slot.ready_fd is not None:
            os.close(slot.ready_fd)
            slot.ready_fd = None

    def _exited(self, slot: _Slot, code: int, now: float) -> None:
        assert slot.proc is not None
        pid = slot.proc.pid
        if self._metrics is not None:
            self._metrics.process_dead(pid)  # its counters stay in the sum, its gauges go
        self._read_ready(slot, now)  # a worker that served and died between two looks
        self._close_ready(slot)
        slot.proc = None
        if code == EXIT_USAGE:
            log.error(
                "worker %d (pid %d) exited with %d, a configuration error that a restart "
                "cannot fix; stopping",
                slot.index,
                pid,
                code,
            )
            self._result = EXIT_USAGE
            return
        if code == EXIT_UNAVAILABLE and not self._ever_ready:
            log.error(
                "worker %d (pid %d) could not reach the broker or database within "
                "--start-timeout; stopping",
                slot.index,
                pid,
            )
            self._result = EXIT_UNAVAILABLE
            return
        if _is_crash(code) and not slot.healthy:
            self._crashes += 1
            if self._crashes >= MAX_CRASHES:
                log.error(
                    "workers crashed %d times in a row soon after starting (last: worker %d, "
                    "pid %d, exit code %d); giving up: see the tracebacks above",
                    self._crashes,
                    slot.index,
                    pid,
                    code,
                )
                self._result = EXIT_CRASHING
                return
        # A worker that served and was then killed (a signal, an OOM kill, a stuck stop) is
        # not failing to start: it comes back at once, and one stopped or killed before it
        # served after a short wait, or a storm of kills while starts are slow would leave
        # the service down for the backoff's length. The long backoff is for workers that
        # die young on their own: crashing, or giving up before they ever served.
        delay = slot.restart_delay(code)
        slot.restart_at = now + delay
        log.warning(
            "worker %d (pid %d) exited with %s; restarting in %.1fs", slot.index, pid, code, delay
        )

    def _stop_workers(self) -> None:
        running = [s.proc for s in self._slots if s.proc is not None]
        for proc in running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        # A worker waits up to shutdown_timeout for handlers and again for the relay.
        deadline = time.monotonic() + self._shutdown_timeout * 2 + STOP_GRACE
        for proc in running:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker pid %d did not stop in time; killing it", proc.pid)
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        for slot in self._slots:
            self._close_ready(slot)
