"""`txflow flows list` and `txflow flows show`: flow instances as their tracker recorded them.

    txflow flows list [--app module:app] [--database URL] [--status S] [--flow NAME] [--json]
    txflow flows show ID [--app module:app] [--database URL] [--flow NAME] [--json]

The database is `--database`, else the app's (`--app`), else `$TXFLOW_DATABASE_URL`: the
database of the app that tracks the flow.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import sqlalchemy as sa

from txflow._config import resolve_database_url
from txflow.cli._common import apply_urls, existing_store, load_app, print_table, run_async
from txflow.errors import ConfigurationError
from txflow.flows import (
    Flow,
    FlowInfo,
    FlowStatus,
    count_flows,
    find_flows,
    flow_history,
    list_flows,
)
from txflow.store import Store

T = TypeVar("T")


def add_commands(sub: Any, add_database: Callable[[argparse.ArgumentParser], None]) -> None:
    group = sub.add_parser("flows", help="inspect flow instances").add_subparsers(
        dest="flows", required=True
    )

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--app", help="module:attribute of the app that tracks the flow")
        add_database(p)
        p.add_argument("--flow", help="only instances of this flow")
        p.add_argument("--json", action="store_true", help="print JSON")

    listing = group.add_parser("list", help="flow instances, most recently updated first")
    common(listing)
    listing.add_argument(
        "--status", choices=[str(s) for s in FlowStatus], help="only instances in this status"
    )
    listing.add_argument("--limit", type=int, default=50, help="instances shown (default 50)")
    listing.set_defaults(func=_cmd_list)
    show = group.add_parser("show", help="one instance: steps, compensations, events, errors")
    show.add_argument("id", help="the flow instance id (its correlation id)")
    common(show)
    show.set_defaults(func=_cmd_show)


def _on_store(
    args: argparse.Namespace, work: Callable[[Store, dict[str, Flow]], Awaitable[T]]
) -> T:
    known: dict[str, Flow] = {}
    url = args.database
    if args.app:
        app = load_app(args.app)
        apply_urls(app, args)
        url = resolve_database_url(app.database_url, app.name)
        known = {name: tracker.flow for name, tracker in app.trackers.items()}
    store = existing_store(url, "--app module:app")

    async def main() -> T:
        await store.connect()
        try:
            return await work(store, known)
        except sa.exc.SQLAlchemyError as exc:
            cause = getattr(exc, "orig", None) or exc
            raise ConfigurationError(
                f"cannot read flow state in {store.masked_url} ({type(cause).__name__}); "
                "is this the database of the app that tracks the flow?"
            ) from exc
        finally:
            await store.aclose()

    return run_async(main)


def _age(value: datetime | None, now: datetime) -> str:
    if value is None:
        return ""
    seconds = max(0.0, (now - value).total_seconds())
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _summary(info: FlowInfo) -> dict[str, Any]:
    return {
        "flow": info.flow,
        "id": info.flow_id,
        "status": str(info.status),
        "steps": ",".join(info.completed_steps),
        "compensated": ",".join(info.compensated),
        "failed_step": info.failed_step,
        "reason": info.reason,
        "started_at": info.started_at.isoformat() if info.started_at else None,
        "updated_at": info.updated_at.isoformat() if info.updated_at else None,
        "finished_at": info.finished_at.isoformat() if info.finished_at else None,
        "deadline": (
            datetime.fromtimestamp(info.deadline, UTC).isoformat() if info.deadline else None
        ),
    }


def _cmd_list(args: argparse.Namespace) -> int:
    async def work(store: Store, known: dict[str, Flow]) -> tuple[dict[str, int], list[FlowInfo]]:
        counts = await count_flows(store, flow=args.flow)
        found = await list_flows(
            store, flow=args.flow, status=args.status, limit=args.limit, known=known
        )
        return counts, found

    counts, found = _on_store(args, work)
    if args.json:
        print(json.dumps({"counts": counts, "flows": [_summary(i) for i in found]}))
        return 0
    print("  ".join(f"{status} {n}" for status, n in sorted(counts.items())) or "no flows")
    if not found:
        return 0
    now = datetime.now(UTC)
    rows = [
        {
            **_summary(i),
            "age": _age(i.started_at, now),
            "updated": _age(i.updated_at, now),
            "reason": (i.reason or "")[:60],
        }
        for i in found
    ]
    print()
    print_table(rows, ["flow", "id", "status", "steps", "age", "updated", "reason"])
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    async def work(store: Store, known: dict[str, Flow]) -> list[dict[str, Any]]:
        shown = []
        for info in await find_flows(store, args.id, known):
            if args.flow and info.flow != args.flow:
                continue
            history = await flow_history(store, info.flow, info.flow_id)
            shown.append(
                {
                    **_summary(info),
                    "completed": [
                        {
                            "step": s.step,
                            "event_type": s.event_type,
                            "message_id": s.message_id,
                            "at": s.at.isoformat(),
                        }
                        for s in info.steps
                    ],
                    "history": [
                        {
                            "at": e.at.isoformat(),
                            "action": e.action,
                            "step": e.step or "",
                            "event": e.event_type or "",
                            "message_id": e.message_id or "",
                            "detail": e.detail or "",
                        }
                        for e in history
                    ],
                }
            )
        return shown

    shown = _on_store(args, work)
    if not shown:
        raise ConfigurationError(f"no flow instance {args.id!r} in this database")
    if args.json:
        print(json.dumps(shown if len(shown) > 1 else shown[0]))
        return 0
    for item in shown:
        history = item.pop("history")
        completed = item.pop("completed")
        width = max(len(k) for k in item)
        for key, value in item.items():
            if value not in (None, ""):
                print(f"{key:<{width}}  {value}")
        print("\nsteps completed:")
        print_table(completed, ["step", "event_type", "at", "message_id"])
        print("\nhistory:")
        print_table(history, ["at", "action", "step", "event", "detail"])
        print()
    return 0
