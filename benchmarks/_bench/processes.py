"""The processes scale.py starts (bench_app.py's modes and `txflow run`), how it configures,
watches and stops them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from _bench.env import Env

# The scripts' folder: the processes run there, with it on their PYTHONPATH (bench_app, _bench).
BENCH_DIR = Path(__file__).resolve().parent.parent
# What bench_app.py reads from its environment.
ENV_AMQP_URL = "BENCH_AMQP_URL"
ENV_DB_URL = "BENCH_DB_URL"
ENV_QUEUE_PREFIX = "BENCH_QUEUE_PREFIX"
ENV_EXCHANGE = "BENCH_EXCHANGE"
ENV_INPUT = "BENCH_INPUT"
ENV_CONCURRENCY = "BENCH_CONCURRENCY"
ENV_QUORUM_QUEUES = "BENCH_QUORUM_QUEUES"  # "1": the txflow side declares quorum queues
# Seconds a process may take to start consuming, and to stop after SIGTERM.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 90.0


def txflow_run(target: str) -> list[str]:
    """The argv of `txflow run target`, with the `txflow` command beside this Python."""
    path = Path(sys.executable).parent / "txflow"
    if not path.exists():
        raise SystemExit("the `txflow` command is not next to this Python; pip install -e .")
    return [str(path), "run", target, "--log-level", "warning"]


def bench_app(mode: str) -> list[str]:
    """The argv of `python benchmarks/bench_app.py mode`."""
    return [sys.executable, str(BENCH_DIR / "bench_app.py"), mode]


def spawn(argv: Sequence[str], extra_env: dict[str, str]) -> subprocess.Popen[bytes]:
    env = {**os.environ, **extra_env}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH_DIR), env.get("PYTHONPATH")]))
    # Its own process group, so that a Ctrl-C here does not reach it before we stop it.
    return subprocess.Popen(argv, cwd=BENCH_DIR, env=env, start_new_session=True)


async def stop(procs: Sequence[subprocess.Popen[bytes]]) -> list[int | None]:
    """SIGTERM each process, wait up to STOP_TIMEOUT, kill what is left; their exit codes."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for _ in range(round(STOP_TIMEOUT / 0.05)):
        if all(p.poll() is not None for p in procs):
            break
        await asyncio.sleep(0.05)
    for proc in procs:
        if proc.poll() is None:
            print(f"  process {proc.pid} did not stop in {STOP_TIMEOUT:.0f}s; killing it")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # Workers of a supervisor that died stay in its process group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    return [p.returncode for p in procs]


def alive(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """Raise if one of `procs` has exited already."""
    for proc in procs:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited early with {proc.returncode}")


async def consumers(env: Env, queue: str) -> int:
    underlay = await env.tools().get_underlay_channel()
    result = await underlay.queue_declare(queue, passive=True)
    return int(result.consumer_count or 0)


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of `pid` in MiB; (nan, nan) once it is gone."""
    values = {"VmRSS": float("nan"), "VmHWM": float("nan")}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in values:
                values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]
