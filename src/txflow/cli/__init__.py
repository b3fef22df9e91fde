"""The `txflow` command: run apps, create tables, inspect the outbox, dead letters and flows.

    txflow run module:app [--broker URL] [--database URL] [--workers N] [--log-level LEVEL]
                          [--log-format text|json] [--metrics-port PORT [--metrics-host H]]
                          [--start-timeout SECONDS | --fail-fast]
    txflow db init module:app [--database URL]
    txflow outbox status module:app [--database URL] [--json]
    txflow dlq list module:app | show QUEUE | replay QUEUE --id ID|--all|--exception-type T
    txflow dlq purge QUEUE --yes
    txflow flows list [--status S] [--flow NAME] | show ID
    txflow graph module:app [module:app ...]
    txflow console module:app [module:app ...] [--host 127.0.0.1] [--port 8080] [--read-only]

One module per command group; `_common` holds what they share, exit codes included. Errors
print one line naming the fix; docs/cli.md lists the exit codes.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import traceback
from collections.abc import Sequence

from txflow.cli import _console, _db, _dlq, _flows, _run
from txflow.cli._common import (
    EXIT_ERROR,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    add_urls,
    configure_logging,
    load_app,
)
from txflow.errors import ConnectionFailedError, TxflowError

_log = logging.getLogger("txflow.cli")

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every `txflow` command."""
    parser = argparse.ArgumentParser(
        prog="txflow", description="Reliable event-driven flows on RabbitMQ and PostgreSQL."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _run.add_command(sub)
    _db.add_commands(sub)
    _dlq.add_commands(sub)
    _flows.add_commands(sub, lambda p: add_urls(p, broker=False))
    graph = sub.add_parser("graph", help="print the event chain of apps as a Mermaid diagram")
    graph.add_argument("targets", nargs="+", help="module:attribute of each app to draw")
    graph.set_defaults(func=_cmd_graph)
    _console.add_command(sub)
    return parser


def _cmd_graph(args: argparse.Namespace) -> int:
    from txflow._graph import mermaid

    print(mermaid([load_app(target) for target in args.targets]))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    json_lines = getattr(args, "log_format", "text") == "json"
    configure_logging(getattr(args, "log_level", "warning"), getattr(args, "log_format", "text"))
    if getattr(args, "workers", 1) < 1:
        parser.error("--workers must be at least 1")
    try:
        code: int = args.func(args)
    except ConnectionFailedError as exc:
        _error(str(exc), json_lines)
        return EXIT_UNAVAILABLE
    except TxflowError as exc:
        _error(str(exc), json_lines)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # A bug in the app's code or in txflow: the traceback, and a code the supervisor
        # counts as a crash rather than as an outage or a configuration error.
        if json_lines:
            _log.critical("%s: %s", type(exc).__name__, exc, exc_info=exc)
        else:
            traceback.print_exc()
        return EXIT_ERROR
    return code


def _error(message: str, json_lines: bool) -> None:
    """Say why the command failed: one `txflow: error:` line, or one JSON log line."""
    if json_lines:
        # Under --log-format json every stderr line parses, this one included.
        _log.error(message)
    else:
        print(f"txflow: error: {message}", file=sys.stderr)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
