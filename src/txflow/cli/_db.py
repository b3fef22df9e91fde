"""`txflow db init` and `txflow outbox status`: the app's tables and its outbox."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from txflow._config import resolve_database_url
from txflow.cli._common import (
    add_urls,
    apply_urls,
    existing_store,
    load_app,
    print_table,
    run_async,
)
from txflow.errors import ConfigurationError


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    db = sub.add_parser("db", help="database commands").add_subparsers(dest="db", required=True)
    init = db.add_parser("init", help="create txflow's tables and the app's own")
    init.add_argument("target", help="module:attribute naming a TxFlow app")
    add_urls(init, broker=False)
    init.set_defaults(func=_cmd_db_init)

    ob = sub.add_parser("outbox", help="outbox commands").add_subparsers(dest="ob", required=True)
    status = ob.add_parser("status", help="pending rows, oldest age, republished rows")
    status.add_argument("target", nargs="?", help="module:attribute naming a TxFlow app")
    add_urls(status, broker=False)
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=_cmd_outbox_status)


def _cmd_db_init(args: argparse.Namespace) -> int:
    app = load_app(args.target)
    apply_urls(app, args)

    async def main() -> str:
        await app.init_db()
        url = app.store.masked_url
        await app.store.aclose()
        return url

    url = run_async(main)
    extra = " and the app's own" if app.metadata is not None else ""
    print(f"created txflow's tables{extra} in {url}")
    return 0


def _cmd_outbox_status(args: argparse.Namespace) -> int:
    url = args.database
    if args.target:
        app = load_app(args.target)
        apply_urls(app, args)
        url = resolve_database_url(app.database_url, app.name)
    store = existing_store(url, "module:app")

    async def main() -> dict[str, Any]:
        await store.connect()
        try:
            status = await store.outbox_status()
        except sa.exc.SQLAlchemyError as exc:
            cause = getattr(exc, "orig", None) or exc
            raise ConfigurationError(
                f"cannot read the outbox in {store.masked_url} ({type(cause).__name__}); "
                "are txflow's tables there? `txflow db init module:app` creates them"
            ) from exc
        finally:
            await store.aclose()
        oldest = status.oldest_pending_at
        return {
            "database": store.masked_url,
            "pending": status.pending,
            "oldest_pending_at": oldest.isoformat() if oldest else None,
            "lag_seconds": round(status.lag_seconds(datetime.now(UTC)), 3),
            "sent_retained": status.sent_retained,
            "republished": status.republished,
            "by_relay": [
                {
                    "relay": b.relay or "unclaimed",
                    "pending": b.pending,
                    "oldest_pending_at": b.oldest_pending_at.isoformat()
                    if b.oldest_pending_at
                    else None,
                }
                for b in status.by_relay
            ],
        }

    report = run_async(main)
    if args.json:
        print(json.dumps(report))
        return 0
    by_relay = report.pop("by_relay")
    width = max(len(k) for k in report)
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")
    if by_relay:
        print()
        print_table(by_relay, ["relay", "pending", "oldest_pending_at"])
    return 0
