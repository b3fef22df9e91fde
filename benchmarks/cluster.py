"""Past one machine: hops/s and orders/s with 1, 2, 3 worker processes, a 3-node RabbitMQ
cluster with quorum queues against a single node, as same-run ratios.

Two private brokers are started for the run (scripts/rabbit_cluster.py, as the cluster
tests do; the machine's own RabbitMQ is not used) and stopped at the end, also after an
error or Ctrl-C:

- `single`: one node, classic queues (txflow's default);
- `single-quorum`: the same node, quorum queues (what a quorum queue costs with nothing to
  replicate to);
- `cluster`: three nodes joined into one cluster, quorum queues (replicated on all three),
  every worker given every node (each connects to one of them, in its own random order).

Workloads, for each worker count and configuration in turn (the first configuration
rotating between repeats):

- hops/s: scale.py's hop (inbox + business row + outbox row in one transaction, confirmed
  publish, mark sent, ack) as `txflow run bench_app:app --workers N`, M messages preloaded
  into its input queue, timed from N consumers to the M-th output in the sink queue;
- orders/s: the example end to end (`python -m examples.order_inventory.demo --workers N
  --broker <nodes> [--quorum-queues]`, three services of N workers each), the rate the demo
  itself reports: orders from the first one placed to the last one terminal, without the
  services' start-up and teardown. A run counts only if the demo passed every check.

Every ratio is computed from the same repeat (same minute, same load on the machine). No
figure is asserted. The nodes, the workers, PostgreSQL and the benchmark share this
machine's cores: see docs/performance.md for what that does to the figures.

    .venv/bin/python benchmarks/cluster.py                   # defaults: ~20-25 minutes
    .venv/bin/python benchmarks/cluster.py --skip-orders --messages 2000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _bench import cli, stats
from _bench.env import Env
from _bench.results import default_json_path, write_json
from _bench.workers import run_workers

REPO_ROOT = Path(__file__).resolve().parents[1]
RIG = REPO_ROOT / "scripts" / "rabbit_cluster.py"
CONFIGS = ("single", "single-quorum", "cluster")
# Messages each handler works on at once, per worker: the same everywhere, so that only the
# broker configuration and the worker count change.
CONCURRENCY = 8
# The demo's own line: "600 orders in 41.3s (15 orders/s end to end)".
DEMO_RATE = re.compile(r"(\d+) orders in ([\d.]+)s \(")


@dataclass
class Figure:
    workload: str  # "hops" or "orders"
    config: str
    workers: int
    repeat: int
    per_second: float
    detail: str


@contextlib.contextmanager
def brokers(log: Path) -> Iterator[dict[str, str]]:
    """A single node and a 3-node cluster: config -> the comma-separated node URLs."""
    roots: list[Path] = []
    try:
        urls: dict[str, str] = {}
        for name, size in (("single", 1), ("cluster", 3)):
            root = Path(tempfile.mkdtemp(prefix=f"txflow-bench-{name}-"))
            root.rmdir()  # the rig makes it, and refuses a directory with a cluster in it
            roots.append(root)
            print(f"starting {name}: {size} private RabbitMQ node(s) in {root}", flush=True)
            with log.open("ab") as out:
                done = subprocess.run(
                    [sys.executable, str(RIG), "start", str(root), "--nodes", str(size)],
                    stdout=subprocess.PIPE, stderr=out, check=True, timeout=600,
                )  # fmt: skip
            urls[name] = done.stdout.decode().strip()
        urls["single-quorum"] = urls["single"]
        yield urls
    finally:
        for root in roots:
            if root.exists():
                subprocess.run(
                    [sys.executable, str(RIG), "stop", str(root)],
                    capture_output=True, check=False, timeout=600,
                )  # fmt: skip


def _env(args: argparse.Namespace, config: str, urls: str) -> Env:
    nodes = urls.split(",")
    return Env(
        argparse.Namespace(
            amqp_url=nodes[0],  # the tools (preload, depths, cleanup) talk to the first node
            worker_amqp_url=urls,
            quorum_queues=config != "single",
            pg_url=args.pg_url,
        )
    )


async def measure_hops(
    args: argparse.Namespace, urls: dict[str, str], figures: list[Figure]
) -> None:
    async with AsyncExitStack() as stack:
        envs = {}
        for config in args.configs:
            envs[config] = _env(args, config, urls[config])
            await envs[config].setup(stack)
            # Untimed warm-up: the broker's queue processes, the database's caches.
            await run_workers(envs[config], "txflow", 1, CONCURRENCY, min(500, args.messages))
        for rep in range(args.repeat):
            for workers in args.workers:
                for config in _rotated(args.configs, rep):
                    r = await run_workers(
                        envs[config], "txflow", workers, CONCURRENCY, args.messages
                    )
                    failed = r.checks["failed"]
                    detail = f"{r.timed_messages} hops in {r.seconds:.1f}s"
                    if failed:
                        detail += f"; CHECK FAILED: {failed}"
                    figures.append(Figure("hops", config, workers, rep, r.hops_per_second, detail))
                    print(f"  hops   {config:13s} workers={workers}: {r.hops_per_second:6.0f}/s "
                          f"({detail})", flush=True)  # fmt: skip


def _demo(args: argparse.Namespace, config: str, urls: str, workers: int) -> tuple[float, str]:
    """The orders/s one demo run reports, and a detail; raises if it did not pass its checks."""
    orders = args.orders
    argv = [
        sys.executable, "-m", "examples.order_inventory.demo", "--orders", str(orders),
        "--broker", urls, "--database", args.pg_url, "--workers", str(workers),
        "--concurrency", str(CONCURRENCY), "--timeout", "600",
    ] + (["--quorum-queues"] if config != "single" else [])  # fmt: skip
    env = {**os.environ}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    started = time.perf_counter()
    done = subprocess.run(
        argv, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True,
        check=False, timeout=900,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    out = done.stdout.decode(errors="replace")
    rate = DEMO_RATE.search(out)
    if done.returncode != 0 or rate is None:
        tail = "\n".join(out.splitlines()[-20:])
        raise RuntimeError(f"demo {config} --workers {workers} --orders {orders} failed:\n{tail}")
    placed, took = int(rate.group(1)), float(rate.group(2))
    return placed / took, f"{placed} orders in {took:.1f}s ({seconds:.0f}s with start-up)"


def measure_orders(args: argparse.Namespace, urls: dict[str, str], figures: list[Figure]) -> None:
    for rep in range(args.repeat):
        for workers in args.workers:
            for config in _rotated(args.configs, rep):
                rate, detail = _demo(args, config, urls[config], workers)
                figures.append(Figure("orders", config, workers, rep, rate, detail))
                print(f"  orders {config:13s} workers={workers}: {rate:6.1f}/s ({detail})",
                      flush=True)  # fmt: skip


def _rotated(configs: Sequence[str], rep: int) -> list[str]:
    k = rep % len(configs)
    return [*configs[k:], *configs[:k]]


def report(args: argparse.Namespace, figures: list[Figure]) -> dict[str, Any]:
    """Per workload: the rate per config and worker count, and same-repeat ratios."""
    out: dict[str, Any] = {}
    base = "single"
    for workload in ("hops", "orders"):
        mine = [f for f in figures if f.workload == workload]
        if not mine:
            continue
        rate = {(f.config, f.workers, f.repeat): f.per_second for f in mine}
        print(f"\n{workload}/s, median [min-max] of {args.repeat} repeat(s); ratios per repeat")
        header = f"{'config':13s} {'workers':>7} {'per second':>20} {'vs single':>18}"
        header += f" {'vs 1 worker':>18}"
        print(header)
        print("-" * len(header))
        rows = []
        for config in args.configs:
            for workers in args.workers:
                values = [rate[k] for k in rate if k[:2] == (config, workers)]
                vs_base = [
                    rate[(config, workers, r)] / rate[(base, workers, r)]
                    for r in range(args.repeat)
                    if (config, workers, r) in rate and (base, workers, r) in rate
                ]
                vs_one = [
                    rate[(config, workers, r)] / rate[(config, 1, r)]
                    for r in range(args.repeat)
                    if (config, workers, r) in rate and (config, 1, r) in rate
                ]
                rows.append(
                    {
                        "config": config,
                        "workers": workers,
                        "per_second": values and stats.summary(values),
                        "vs_single": vs_base and stats.summary(vs_base),
                        "vs_one_worker": vs_one and stats.summary(vs_one),
                    }
                )
                print(
                    f"{config:13s} {workers:>7} {stats.cell(values):>20} "
                    f"{stats.cell(vs_base, 2, 'x'):>18} {stats.cell(vs_one, 2, 'x'):>18}"
                )
        out[workload] = rows
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pg-url",
        help="PostgreSQL server for the scratch databases (default: $TXFLOW_TEST_PG_URL, "
        "else postgresql://postgres@127.0.0.1:5432/test)",
    )
    parser.add_argument("--workers", type=cli.int_list, default="1,2,3")
    parser.add_argument("--configs", type=cli.name_list, default=",".join(CONFIGS))
    parser.add_argument("--messages", type=int, default=3000, help="hops per timed run")
    parser.add_argument("--orders", type=int, default=600, help="orders per demo run")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--skip-hops", action="store_true")
    parser.add_argument("--skip-orders", action="store_true")
    parser.add_argument("--json", type=Path, help="write the JSON here")
    args = parser.parse_args(argv)
    args.pg_url = args.pg_url or os.environ.get(
        "TXFLOW_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test"
    )
    unknown = set(args.configs) - set(CONFIGS)
    if unknown or "single" not in args.configs:
        parser.error(f"--configs: some of {', '.join(CONFIGS)}, with single (the baseline)")
    if 1 not in args.workers:
        parser.error("--workers must include 1 (the scaling baseline)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    figures: list[Figure] = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="txflow-bench-cluster-") as tmp:
        with brokers(Path(tmp) / "rig.log") as urls:
            if not args.skip_hops:
                asyncio.run(measure_hops(args, urls, figures))
            if not args.skip_orders:
                measure_orders(args, urls, figures)
    summary = report(args, figures)
    load_after = os.getloadavg()
    print(
        f"\ntotal {time.perf_counter() - started:.0f}s on {os.cpu_count()} CPUs; load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after"
    )
    write_json(
        args.json or default_json_path("cluster"),
        {
            "benchmark": "cluster",
            "created_at": datetime.now(UTC).isoformat(),
            "argv": sys.argv[1:],
            "cpus": os.cpu_count(),
            "load_average": {"before": load_before, "after": load_after},
            "summary": summary,
            "figures": [asdict(f) for f in figures],
        },
    )
    return 0 if figures else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
