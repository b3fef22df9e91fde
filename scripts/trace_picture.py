"""Draw the trace of one order of the example as a waterfall, from a real run.

    .venv/bin/python scripts/trace_picture.py                 # docs/img/trace-waterfall.png
    .venv/bin/python scripts/trace_picture.py --spans DIR     # redraw from a run's span files

Runs the example's demo (`python -m examples.order_inventory.demo --trace-dir DIR`) with its
three services as separate `txflow run` processes on RabbitMQ and PostgreSQL, each writing
its spans to a JSON-lines file in DIR, as does the demo's front end for its `place order`
spans. Then it joins the files and draws the trace of one order: a bar per span from its
start to its end, indented under its parent, coloured by the process (service) that
recorded it, with the span events as marks.

Needs matplotlib (`pip install -e '.[bench]'`), the OpenTelemetry SDK (the dev extra) and
the servers: `--broker`, `--database` (defaults `$TXFLOW_TEST_AMQP_URL`, `$TXFLOW_TEST_PG_URL`,
else the local ones the tests use). The run makes its own databases, queues and exchange
and removes them at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from examples.order_inventory import demo  # noqa: E402
from examples.order_inventory.traced import read_spans  # noqa: E402

DEFAULT_OUT = REPO / "docs" / "img" / "trace-waterfall.png"
AMQP_URL = os.environ.get("TXFLOW_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
PG_URL = os.environ.get("TXFLOW_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
# Orders the demo places; the picture shows one of them (the demo's orders are the same for
# the same seed: order-000001 is 3 widgets for customer-931, confirmed).
ORDERS = 4
ORDER = "order-000001"
COLORS = {"web": "#7f7f7f", "orders": "#1f77b4", "inventory": "#2ca02c", "payment": "#ff7f0e"}
# The span events worth a mark, and how each is labelled.
MARKED = {
    "flow transition": lambda a: f"-> {a['txflow.flow.to_status']}",
    "compensation requested": lambda a: f"undo {a['txflow.flow.step']}?",
    "compensation ran": lambda a: f"undid {a['txflow.flow.step']}",
    "retry scheduled": lambda a: "retry",
    "dead-lettered": lambda a: "dead letter",
    "duplicate skipped": lambda a: "duplicate",
}


def run_demo(spans: Path, args: argparse.Namespace) -> None:
    argv = ["--orders", str(args.orders), "--broker", args.broker, "--database", args.database]
    argv += ["--concurrency", "2", "--trace-dir", str(spans)]
    if not asyncio.run(demo.amain(demo.parse_args(argv))):
        raise SystemExit("the demo's checks failed; no picture")


def _time(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def label(span: dict[str, Any]) -> str:
    attributes = span["attributes"]
    if span["name"] == "process":
        event = attributes["messaging.rabbitmq.destination.routing_key"].rsplit(".", 2)
        shown = ".".join(event[-2:]) if event[0].startswith("txflow") else event[-1]
        return f"process {attributes['txflow.handler']} ({shown})"
    if span["name"] == "publish":
        return f"publish {attributes['messaging.rabbitmq.destination.routing_key']}"
    return str(span["name"])


def tree_order(spans: Sequence[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """(depth, span) depth first, children by start time."""
    ids = {s["context"]["span_id"] for s in spans}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for span in spans:
        parent = span["parent_id"] if span["parent_id"] in ids else None
        children.setdefault(parent, []).append(span)
    out: list[tuple[int, dict[str, Any]]] = []

    def visit(parent: str | None, depth: int) -> None:
        for span in sorted(children.get(parent, []), key=lambda s: _time(s["start_time"])):
            out.append((depth, span))
            visit(span["context"]["span_id"], depth + 1)

    visit(None, 0)
    return out


def draw(spans: Sequence[dict[str, Any]], order_id: str, out: Path) -> None:
    rows = tree_order(spans)
    start = min(_time(s["start_time"]) for s in spans)
    end = max(_time(s["end_time"]) for s in spans)
    fig, ax = plt.subplots(figsize=(12, 0.42 * len(rows) + 1.6))
    for y, (depth, span) in enumerate(rows):
        left = (_time(span["start_time"]) - start) * 1000
        width = max((_time(span["end_time"]) - _time(span["start_time"])) * 1000, 0.3)
        ax.barh(y, width, left=left, height=0.6, color=COLORS.get(span["service"], "#bbbbbb"))
        ax.text(
            -0.5,
            y,
            "  " * depth + ("└ " if depth else "") + label(span),
            transform=ax.get_yaxis_transform(),
            ha="left",
            va="center",
            fontsize=8,
            fontfamily="monospace",
        )
        ax.text(left + width + 0.5, y, f"{width:.1f} ms", va="center", fontsize=7, color="#555")
        for event in span["events"]:
            if event["name"] in MARKED:
                x = (_time(event["timestamp"]) - start) * 1000
                ax.plot(x, y, marker="v", color="black", markersize=5)
                ax.annotate(
                    MARKED[event["name"]](event["attributes"]),
                    (x, y),
                    xytext=(0, 8),
                    textcoords="offset points",
                    ha="center",
                    fontsize=7,
                )
    ax.set_yticks([])
    ax.set_ylim(len(rows) - 0.4, -0.8)
    ax.set_xlim(0, (end - start) * 1000 * 1.12)
    ax.set_xlabel("ms since the order was placed")
    services = sorted({s["service"] for s in spans}, key=list(COLORS).index)
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS[s]) for s in services]
    ax.legend(
        handles,
        [f"{s} (pid {next(x['pid'] for x in spans if x['service'] == s)})" for s in services],
        loc="upper right",
        fontsize=8,
        title="process",
        title_fontsize=8,
    )
    ax.set_title(
        f"One order ({order_id}) of examples/order_inventory: one trace, "
        f"{len(spans)} spans from {len(services)} processes",
        fontsize=10,
    )
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    fig.subplots_adjust(left=0.36)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out} ({len(spans)} spans)")


def the_trace(spans: Sequence[dict[str, Any]], order_id: str) -> list[dict[str, Any]]:
    roots = [
        s
        for s in spans
        if s["name"] == "place order" and s["attributes"].get("order.id") == order_id
    ]
    if len(roots) != 1:
        raise SystemExit(f"found {len(roots)} `place order` spans of {order_id}")
    trace_id = roots[0]["context"]["trace_id"]
    return [s for s in spans if s["context"]["trace_id"] == trace_id]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", default=AMQP_URL, help="amqp://... (default: %(default)s)")
    parser.add_argument("--database", default=PG_URL, help="postgresql://... server")
    parser.add_argument("--orders", type=int, default=ORDERS, help="orders the demo places")
    parser.add_argument("--order", default=ORDER, help="the order to draw (default: %(default)s)")
    parser.add_argument("--spans", type=Path, help="draw from these span files; run nothing")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the PNG to write")
    args = parser.parse_args(argv)
    if args.spans is not None:
        spans = read_spans(args.spans)
    else:
        directory = Path(tempfile.mkdtemp(prefix="txflow-trace-"))
        run_demo(directory, args)
        spans = read_spans(directory)
        print(f"span files in {directory}")
    draw(the_trace(spans, args.order), args.order, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
