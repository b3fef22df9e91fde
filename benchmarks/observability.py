"""What observability costs one hop: txflow's preloaded hop (hop.py) with tracing and metrics
off and on, in the same run, as ratios.

Configurations, each run back to back within every repeat (the first one rotating):
- off: the API only, no SDK configured (the default), no metrics;
- metrics: `TxFlow(metrics=MetricsConfig())`: the hop observer, the relay's meter and the
  sampled gauges, recorded into prometheus-client's registry (nothing scrapes it);
- sdk: an OpenTelemetry SDK, no metrics: a TracerProvider with a BatchSpanProcessor and an
  exporter that drops the spans, so the spans are made, batched and handed off but not sent
  (the cost inside the process, not a collector's);
- sdk+metrics: both.

The workload is hop.py's preloaded one (M messages queued before consuming starts; the clock
runs until the M-th output event sits in the sink). Each ratio is config / off of the same
repeat; the summary is median [min-max] over the repeats.

    .venv/bin/python benchmarks/observability.py                # ~3 minutes
    .venv/bin/python benchmarks/observability.py --messages 2000 --repeat 7 --concurrency 30
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator, Sequence
from contextlib import AsyncExitStack, contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from _bench import cli, stats
from _bench.env import Env
from _bench.hop_report import header_lines
from _bench.preloaded import run_txflow
from _bench.runs import attempt, order
from txflow import MetricsConfig

CONFIGS = ("off", "metrics", "sdk", "sdk+metrics")


class _DropSpans(SpanExporter):
    """An exporter that accepts every span and sends none."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


@contextmanager
def tracing(sdk: bool) -> Iterator[None]:
    """An SDK as the global tracer provider while the block runs, when `sdk`.

    `trace.set_tracer_provider` may be called once per process, so the global is set and
    reset directly (as tests/test_tracing.py does); txflow looks it up on every hop.
    """
    if not sdk:
        yield
        return
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(_DropSpans()))
    trace._TRACER_PROVIDER = provider  # type: ignore[attr-defined]
    try:
        yield
    finally:
        trace._TRACER_PROVIDER = None  # type: ignore[attr-defined]
        provider.shutdown()


async def bench(args: argparse.Namespace, loop_name: str) -> dict[str, Any]:
    env = Env(args)
    rates: dict[str, list[float]] = {c: [] for c in args.configs}
    cpu: dict[str, list[float]] = {c: [] for c in args.configs}
    disturbed: list[dict[str, str]] = []
    async with AsyncExitStack() as stack:
        await env.setup(stack)
        print(f"run {env.run_id}: database {env.db_name}; loop {loop_name}", flush=True)
        for rep in range(args.repeat):
            for config in order(args.configs, rep):
                metrics = MetricsConfig() if "metrics" in config else None

                async def run(metrics: MetricsConfig | None = metrics) -> Any:
                    return await run_txflow(env, args.concurrency, args.messages, metrics=metrics)

                with tracing("sdk" in config):
                    result = await attempt(env, f"{config} #{rep}", run, disturbed)
                rates[config].append(result.hops_per_second)
                cpu[config].append(result.cpu_ms_per_hop)
                print(
                    f"  #{rep + 1} {config:>12}: {result.hops_per_second:7.0f} hops/s, "
                    f"{result.cpu_ms_per_hop:.3f} ms CPU per hop",
                    flush=True,
                )
    return env.findings(rates=rates, cpu=cpu, disturbed=disturbed)


def report(args: argparse.Namespace, loop_name: str, data: dict[str, Any]) -> dict[str, Any]:
    rates, cpu = data["rates"], data["cpu"]
    print()
    print(
        f"Observability cost: txflow's preloaded hop, {args.messages} messages, concurrency "
        f"{args.concurrency}, median [min-max] of {args.repeat} run(s); ratios per repeat"
    )
    print(header_lines(argparse.Namespace(sides=["txflow"]), loop_name, data["server"]))
    print()
    print(
        f"{'config':>12}  {'hops/s':>21}  {'/ off':>19}  {'CPU ms/hop (process)':>21}"
        f"  {'off CPU / config CPU':>20}"
    )
    summary: dict[str, Any] = {}
    for config in args.configs:
        ratio = stats.ratios(rates[config], rates["off"])
        # The throughput ratio a CPU-bound process would see: robust to a noisy machine's
        # stalls, which stretch wall time far more than this process's CPU time.
        cpu_ratio = stats.ratios(cpu["off"], cpu[config])
        print(
            f"{config:>12}  {stats.cell(rates[config]):>21}  {stats.cell(ratio, 2, 'x'):>19}  "
            f"{stats.cell(cpu[config], 3):>21}  {stats.cell(cpu_ratio, 2, 'x'):>20}"
        )
        summary[config] = {
            "hops_per_second": stats.summary(rates[config]),
            "ratio_to_off": stats.summary(ratio),
            "cpu_ms_per_hop": stats.summary(cpu[config]),
            "cpu_ratio_to_off": stats.summary(cpu_ratio),
        }
    return summary


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = cli.new_parser(
        "Measure what tracing (an SDK with a batch span processor) and Prometheus metrics "
        "cost txflow's hop, against both off, in the same run."
    )
    parser.add_argument("--messages", type=int, default=2000, help="messages per run")
    parser.add_argument("--concurrency", type=int, default=30, help="prefetch (default 30)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per config (default 5)")
    parser.add_argument(
        "--configs",
        type=cli.name_list,
        default=list(CONFIGS),
        help=f"comma-separated configurations (default: {','.join(CONFIGS)})",
    )
    cli.add_output_arguments(parser, "observability")
    args = parser.parse_args(argv)
    cli.resolve_urls(args)
    if set(args.configs) - set(CONFIGS) or "off" not in args.configs:
        parser.error(f"--configs takes off and others of {', '.join(CONFIGS)}")
    args.txflow_write = "driver"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    data, loop_name = cli.run(bench, args)
    summary = report(args, loop_name, data)
    names = ["txflow", "prometheus-client", "opentelemetry-sdk"]
    cli.save("observability", args, loop_name, data, started, names, summary=summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
