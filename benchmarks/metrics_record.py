"""What recording one hop's metrics costs: prometheus-client's own calls against txflow's.

Per hop txflow records, when metrics are on, one counter and two histograms for the handler
(`HopMeter`) and one counter and two histograms for the relay's publish (`PublishMeter`).
This times those six recordings done two ways, in the same process and interleaved:

- client: `child.inc()` and `child.observe(x)`, prometheus-client's public calls;
- txflow: the recorders of `txflow._metrics.counting` / `observing`, which the meters use
  (the same value objects, without the per-call checks, and a bisect for the bucket).

Each repeat times `--hops` hops of each way back to back (the first way rotating), CPU time
of this process; the ratio is client / txflow of the same repeat (above 1: txflow's is
cheaper), median [min-max]. The amounts cycle through values that land in different buckets.

    .venv/bin/python benchmarks/metrics_record.py
    .venv/bin/python benchmarks/metrics_record.py --hops 200000 --repeat 9
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from txflow._metrics import LATENCY_BUCKETS, counting, observing

AMOUNTS = (0.0004, 0.0031, 0.012, 0.0009, 0.18, 0.0017, 2.2, 0.0062)


def _six(registry: CollectorRegistry, way: str) -> tuple[Any, ...]:
    counter = Counter(f"{way}_c", "", ["k"], registry=registry)
    histogram = Histogram(f"{way}_h", "", ["k"], buckets=LATENCY_BUCKETS, registry=registry)
    children = (
        counter.labels("handled"),
        histogram.labels("duration"),
        histogram.labels("critical"),
        counter.labels("published"),
        histogram.labels("publish"),
        histogram.labels("confirm"),
    )
    return children


def _client(hops: int, children: tuple[Any, ...]) -> float:
    handled, duration, critical, published, publish, confirm = children
    start = time.process_time()
    for i in range(hops):
        amount = AMOUNTS[i & 7]
        handled.inc()
        duration.observe(amount)
        critical.observe(amount * 2)
        publish.observe(amount / 3)
        published.inc()
        confirm.observe(amount)
    return time.process_time() - start


def _txflow(hops: int, children: tuple[Any, ...]) -> float:
    handled, duration, critical, published, publish, confirm = (
        counting(children[0]),
        observing(children[1]),
        observing(children[2]),
        counting(children[3]),
        observing(children[4]),
        observing(children[5]),
    )
    start = time.process_time()
    for i in range(hops):
        amount = AMOUNTS[i & 7]
        handled(1)
        duration(amount)
        critical(amount * 2)
        publish(amount / 3)
        published(1)
        confirm(amount)
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hops", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    registry = CollectorRegistry()
    client_children, txflow_children = _six(registry, "client"), _six(registry, "txflow")
    ways = [("client", _client, client_children), ("txflow", _txflow, txflow_children)]
    per_hop: dict[str, list[float]] = {"client": [], "txflow": []}
    ratios = []
    for repeat in range(args.repeat):
        order = ways if repeat % 2 == 0 else ways[::-1]
        seconds = {name: run(args.hops, children) for name, run, children in order}
        for name, value in seconds.items():
            per_hop[name].append(value / args.hops * 1e6)
        ratios.append(seconds["client"] / seconds["txflow"])
    for name, values in per_hop.items():
        print(
            f"{name:7} {statistics.median(values):6.2f} us of CPU per hop "
            f"[{min(values):.2f}-{max(values):.2f}]"
        )
    print(
        f"client / txflow: {statistics.median(ratios):.2f}x "
        f"[{min(ratios):.2f}-{max(ratios):.2f}] (median [min-max] of {args.repeat} repeats)"
    )


if __name__ == "__main__":
    main()
