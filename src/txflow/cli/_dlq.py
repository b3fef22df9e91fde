"""`txflow dlq list|show|replay|purge`: dead letters on the broker."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Awaitable, Callable
from typing import TypeVar

from txflow import dlq
from txflow._app import TxFlow
from txflow._config import BROKER_URL_ENV, open_transport
from txflow.cli._common import load_app, print_table, run_async, shorten
from txflow.errors import ConfigurationError
from txflow.transport import Transport

T = TypeVar("T")


def _on_broker(
    args: argparse.Namespace, work: Callable[[Transport], Awaitable[T]], app: TxFlow | None = None
) -> T:
    """Connect to the broker the arguments name, run `work` on it, close."""
    url = args.broker or (app.broker_url if app else None) or os.environ.get(BROKER_URL_ENV)
    if not url or url.startswith("memory:"):
        raise ConfigurationError(
            f"dead-letter commands need the broker: pass --broker amqp://... or set "
            f"{BROKER_URL_ENV} (the in-memory broker lives inside its own process)"
        )
    transport = open_transport(url)

    async def main() -> T:
        await transport.connect()
        try:
            return await work(transport)
        finally:
            await transport.aclose()

    return run_async(main)


def _cmd_dlq_list(args: argparse.Namespace) -> int:
    app = load_app(args.target)
    found = _on_broker(args, lambda t: dlq.counts(t, app.topology()), app)
    rows = [{"queue": c.queue, "messages": c.messages, "handler": c.handler_queue} for c in found]
    if args.json:
        print(json.dumps(rows))
    else:
        print_table(rows, ["queue", "messages"])
    return 0


def _cmd_dlq_show(args: argparse.Namespace) -> int:
    infos = _on_broker(args, lambda t: dlq.show(t, args.queue, args.limit))
    if args.json:
        print(json.dumps([dataclasses.asdict(i) for i in infos]))
        return 0
    rows = [
        {
            "message_id": i.message_id,
            "event": i.event_type,
            "handler": i.handler,
            "attempts": i.attempts,
            "exception": (i.exception_type or "").rsplit(".", 1)[-1],
            "reason": shorten(i.reason or "", 60),
            "last_failure": i.last_failure_at,
        }
        for i in infos
    ]
    print(f"{len(rows)} dead letter(s) in {dlq.dead_letter_queue(args.queue)}")
    if rows:
        print_table(rows, list(rows[0]))
    if args.body:
        for info in infos:
            print(f"\n{info.message_id} ({info.content_type}):\n{info.body}")
    return 0


def _cmd_dlq_replay(args: argparse.Namespace) -> int:
    count = _on_broker(
        args,
        lambda t: dlq.replay(
            t,
            args.queue,
            message_ids=args.id or (),
            exception_type=args.exception_type,
            replay_all=args.all,
        ),
    )
    target = dlq.handler_queue(dlq.dead_letter_queue(args.queue))
    if args.json:
        print(json.dumps({"replayed": count, "to": target}))
    else:
        print(f"replayed {count} message(s) to {target}")
    return 0


def _cmd_dlq_purge(args: argparse.Namespace) -> int:
    if not args.yes:
        raise ConfigurationError("purge deletes dead letters for good; add --yes to confirm")
    count = _on_broker(args, lambda t: dlq.purge(t, args.queue))
    if args.json:
        print(json.dumps({"purged": count}))
    else:
        print(f"purged {count} message(s) from {dlq.dead_letter_queue(args.queue)}")
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = sub.add_parser("dlq", help="inspect and replay dead letters").add_subparsers(
        dest="dlq", required=True
    )

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--broker", help=f"broker URL (default ${BROKER_URL_ENV})")
        p.add_argument("--json", action="store_true", help="print JSON")

    listing = group.add_parser("list", help="dead letters per queue of an app")
    listing.add_argument("target", help="module:attribute naming a TxFlow app")
    common(listing)
    listing.set_defaults(func=_cmd_dlq_list)

    show_ = group.add_parser("show", help="dead letters of a queue, with reasons")
    show_.add_argument("queue", help="a handler queue or its .dlq")
    show_.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    show_.add_argument("--body", action="store_true", help="also print each message's body")
    common(show_)
    show_.set_defaults(func=_cmd_dlq_show)

    replay_ = group.add_parser("replay", help="send dead letters back to their handler")
    replay_.add_argument("queue", help="a handler queue or its .dlq")
    which = replay_.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", action="append", help="a message id (repeatable)")
    which.add_argument("--all", action="store_true", help="every dead letter in the queue")
    which.add_argument("--exception-type", help="those that died of this exception type")
    common(replay_)
    replay_.set_defaults(func=_cmd_dlq_replay)

    purge_ = group.add_parser("purge", help="delete every dead letter of a queue")
    purge_.add_argument("queue", help="a handler queue or its .dlq")
    purge_.add_argument("--yes", action="store_true", help="confirm: the messages are gone")
    common(purge_)
    purge_.set_defaults(func=_cmd_dlq_purge)
