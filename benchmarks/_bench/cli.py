"""What the scripts' command lines and JSON documents share: the server URLs, where the JSON
goes, the event loop, and the fields every JSON document starts with."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from _bench.defaults import DEFAULT_AMQP_URL, DEFAULT_PG_URL
from _bench.results import default_json_path, write_json
from _bench.runs import pick_loop

# A script's measurements: `bench(args, loop_name)` returns what its report and JSON show.
Bench = Callable[[argparse.Namespace, str], Awaitable[dict[str, Any]]]


def new_parser(description: str) -> argparse.ArgumentParser:
    """A script's parser: its `description`, what it leaves behind (nothing), and the server
    URLs (`add_server_arguments`)."""
    parser = argparse.ArgumentParser(
        description=f"{description} Creates a fresh database and fresh exchanges/queues, "
        "removed at the end."
    )
    add_server_arguments(parser)
    return parser


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """--amqp-url and --pg-url (read back by `resolve_urls`)."""
    parser.add_argument(
        "--amqp-url",
        help="RabbitMQ (default: $TXFLOW_TEST_AMQP_URL, else "
        f"{DEFAULT_AMQP_URL.replace(':guest@', ':***@')})",
    )
    parser.add_argument(
        "--pg-url",
        help="PostgreSQL server to create the scratch database bench_<random> on, as a user "
        f"who may CREATE DATABASE (default: $TXFLOW_TEST_PG_URL, else {DEFAULT_PG_URL})",
    )


def add_output_arguments(parser: argparse.ArgumentParser, kind: str) -> None:
    """--no-uvloop, --json, --no-json and -v."""
    parser.add_argument(
        "--no-uvloop",
        action="store_true",
        help="use the default asyncio loop even if uvloop is installed",
    )
    parser.add_argument(
        "--json",
        type=Path,
        help=f"write the JSON here (default: benchmarks/results/{kind}-<timestamp>.json)",
    )
    parser.add_argument(
        "--no-json", action="store_true", help="do not write benchmarks/results/*.json"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log txflow at INFO")


def resolve_urls(args: argparse.Namespace) -> None:
    """The server URLs the arguments gave, else the environment's, else the defaults."""
    args.amqp_url = args.amqp_url or os.environ.get("TXFLOW_TEST_AMQP_URL", DEFAULT_AMQP_URL)
    args.pg_url = args.pg_url or os.environ.get("TXFLOW_TEST_PG_URL", DEFAULT_PG_URL)


def run(bench: Bench, args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """`await bench(args, loop_name)` on uvloop (unless --no-uvloop), logging as -v says;
    what it returned, and the loop's name."""
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    loop_factory, loop_name = pick_loop(args.no_uvloop)
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(bench(args, loop_name)), loop_name


def save(
    kind: str,
    args: argparse.Namespace,
    loop_name: str,
    data: dict[str, Any],
    started: float,
    names: list[str],
    **fields: Any,
) -> None:
    """Print the run's total time and write its JSON (unless --no-json): what ran, where,
    with which versions of `names`, on which servers (no URLs: they may hold a password),
    then `fields`."""
    seconds = time.perf_counter() - started
    print(f"\ntotal {seconds:.0f}s")
    if args.no_json:
        return
    document = {
        "benchmark": kind,
        "created_at": datetime.now(UTC).isoformat(),
        "argv": sys.argv[1:],
        "config": {k: v for k, v in vars(args).items() if k not in ("amqp_url", "pg_url")},
        "loop": loop_name,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "versions": {name: version(name) for name in names},
        "server": data["server"],
        "run_id": data["run_id"],
        "seconds": seconds,
        **fields,
    }
    write_json(args.json or default_json_path(kind), document)


def pick_sides(
    parser: argparse.ArgumentParser, args: argparse.Namespace, known: Sequence[str]
) -> None:
    """Check --sides against the `known` sides and put them in that order."""
    if not args.sides or set(args.sides) - set(known):
        parser.error(f"--sides takes a comma-separated subset of {', '.join(known)}")
    args.sides = [s for s in known if s in args.sides]


def int_list(text: str) -> list[int]:
    """An argument's comma-separated integers: "1,10,30" -> [1, 10, 30]; "" -> []."""
    return [int(x) for x in text.split(",") if x]


def name_list(text: str) -> list[str]:
    """An argument's comma-separated names: "baseline,txflow" -> ["baseline", "txflow"]."""
    return [x for x in text.split(",") if x]
