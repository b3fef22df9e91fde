"""What every `txflow` command shares: exit codes, loading the app, logging, URLs, tables."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from rich.console import Console
from rich.table import Table
from rich.text import Text

from txflow._app import TxFlow

# `txflow run` waits for its servers at start, and before respawning a worker, with the
# default numbers: 0.5 s doubling to 30 s, jittered (docs/cli.md).
from txflow._backoff import Backoff as Backoff
from txflow._config import BROKER_URL_ENV, DATABASE_URL_ENV
from txflow._logging import JsonFormatter
from txflow.errors import AppNotFoundError, ConfigurationError
from txflow.store import Store, open_store

# Every module of the CLI logs as "txflow.cli": operators (and the example's report) read
# the supervisor's and the workers' lines under that one name.
log = logging.getLogger("txflow.cli")

T = TypeVar("T")

# -- exit codes (docs/cli.md#exit-codes-and-errors) ----------------------------------------
EXIT_OK = 0
# An unexpected error: a bug in the app or in txflow; the traceback is in the log.
EXIT_ERROR = 1
# Usage and configuration errors: a restart cannot fix them.
EXIT_USAGE = 2
# A worker that had to exit without closing its connections (stuck on stop).
EXIT_STUCK = 3
# The supervisor gave up: workers kept crashing on the app's code right after starting.
EXIT_CRASHING = 4
# The broker or the database cannot be reached (sysexits' EX_UNAVAILABLE).
EXIT_UNAVAILABLE = 69

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


LOG_FORMATS = ("text", "json")


def configure_logging(level: str, log_format: str = "text") -> None:
    """Log to stderr: `text` lines (LOG_FORMAT), or `json`, one object per line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    # aiormq logs each failed connection attempt as an error with a traceback; txflow's own
    # lines name the broker and the fix, so keep the library quiet unless debugging.
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("aiormq").setLevel(logging.CRITICAL)
        logging.getLogger("aio_pika").setLevel(logging.ERROR)


def run_async(main: Callable[[], Awaitable[T]]) -> T:
    """Run `main` on uvloop when it is installed, else on asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())  # type: ignore[arg-type]
    return uvloop.run(main())  # type: ignore[arg-type]


def apply_urls(app: TxFlow, args: argparse.Namespace) -> None:
    """Let `--broker` and `--database` override the URLs the app was given in code."""
    if getattr(args, "broker", None):
        app.broker_url = args.broker
    if getattr(args, "database", None):
        app.database_url = args.database


class _NodeList(argparse.Action):
    """A repeated `--broker` adds a node: the value is the comma-separated list of them all."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        earlier = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, f"{earlier},{values}" if earlier else values)


def add_urls(p: argparse.ArgumentParser, broker: bool = True) -> None:
    if broker:
        p.add_argument(
            "--broker",
            action=_NodeList,
            help=f"broker URL (default ${BROKER_URL_ENV} or memory://); for a cluster, repeat "
            "it or give the nodes' URLs comma-separated",
        )
    p.add_argument(
        "--database", help=f"database URL (default ${DATABASE_URL_ENV} or a SQLite file)"
    )


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


def print_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    """Print `rows` as a plain table under upper-case `columns` headers, never wrapped.

    rich lays it out; with no borders and no colour it stays readable in a pager and
    greppable in a script (which should use `--json` to parse).
    """
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for column in columns:
        table.add_column(column.upper(), no_wrap=True, overflow="ignore")
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    console = Console(width=10_000, highlight=False, soft_wrap=True, no_color=True)
    with console.capture() as captured:
        console.print(table)
    for line in captured.get().splitlines():
        print(line.rstrip())


def _cell(value: Any) -> Text:
    return Text("" if value is None else str(value))  # Text: no markup in operators' data


def shorten(text: str, width: int) -> str:
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= width else line[: width - 1] + "…"
