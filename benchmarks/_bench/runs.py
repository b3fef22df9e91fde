"""How measurements are run: which sides can, in which order, on which event loop, and again
after a server went away."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
from collections.abc import Awaitable, Callable, Sequence
from importlib.metadata import version
from typing import TYPE_CHECKING, TypeVar

from aio_pika.abc import AbstractConnection

from _bench.defaults import ATTEMPTS

if TYPE_CHECKING:
    from _bench.env import Env

T = TypeVar("T")

# Every side of hop.py, in the order of its tables. The last two are the txflow hop traced
# (see _bench.tracing), run only when asked for and only in the preloaded workload.
SIDES = ("baseline", "txflow", "faststream", "txflow-api", "txflow-sdk")
TRACING_SIDES = ("txflow-api", "txflow-sdk")
# (numerator, denominator) of the ratio columns; each computed per repeat.
RATIOS = (
    ("txflow", "baseline"),
    ("faststream", "baseline"),
    ("txflow", "faststream"),
    ("txflow-api", "txflow"),
    ("txflow-sdk", "txflow"),
)
# How the ratio columns name each side.
SHORT = {
    "baseline": "ba",
    "txflow": "tx",
    "faststream": "fa",
    "txflow-api": "api",
    "txflow-sdk": "sdk",
}


def ratio_name(a: str, b: str) -> str:
    return f"{SHORT[a]}/{SHORT[b]}"


def faststream_installed() -> bool:
    return importlib.util.find_spec("faststream") is not None


def order(sides: Sequence[str], rep: int) -> list[str]:
    """Rotate which side goes first each repeat, so slow drift does not favour one side."""
    k = rep % len(sides)
    return [*sides[k:], *sides[:k]]


async def attempt(
    env: Env, what: str, run: Callable[[], Awaitable[T]], disturbed: list[dict[str, str]]
) -> T:
    """Run one measurement; if it fails (a server went away), wait for the servers, run again.

    Every failed attempt is kept in `disturbed` (and so in the JSON); after ATTEMPTS it raises.
    """
    for n in range(1, ATTEMPTS + 1):
        try:
            return await run()
        except Exception as exc:
            if n == ATTEMPTS:
                raise
            disturbed.append({"what": what, "error": repr(exc)[:300]})
            print(f"  {what}: disturbed ({repr(exc)[:160]}); trying again", flush=True)
            await env.reconnect()
    raise AssertionError("unreachable")


async def close_all(connections: list[AbstractConnection]) -> None:
    while connections:
        with contextlib.suppress(Exception):
            await connections.pop().close()


def pick_loop(no_uvloop: bool) -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    """uvloop's loop factory when installed (unless `no_uvloop`), and the loop's name."""
    if not no_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop, f"uvloop {version('uvloop')}"
    return None, "asyncio (default loop)"
