"""Failover across the nodes of a RabbitMQ cluster: one robust connection, several node URLs.

No Python AMQP client takes a list of nodes (aio-pika's RobustConnection reconnects to its
one URL only), so `FailoverConnection` is a RobustConnection that moves on to the next node
whenever an attempt fails or the connection drops. Everything else is aio-pika's: its
reconnect loop, and its robust channels that re-declare their queues and restore their
consumers on whichever node the connection reaches.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from typing import Any

import aio_pika
from aio_pika.connection import make_url

from txflow._backoff import Backoff
from txflow.errors import ConfigurationError, UnsupportedURLError, mask_url, split_url_list

log = logging.getLogger("txflow.rabbit")

# Seconds to wait after the first full round of nodes failed; doubled each further round.
RECONNECT_MIN = 0.5
# The longest wait between two rounds (aio-pika's own fixed reconnect interval).
RECONNECT_MAX = 5.0
SCHEMES = ("amqp", "amqps")


def split_urls(urls: str | Sequence[str]) -> list[str]:
    """The node URLs in `urls`: a comma-separated string or a sequence of URLs.

    Raises:
        ConfigurationError: no URL at all.
        UnsupportedURLError: a URL that is not `amqp://` or `amqps://`.
    """
    parts = split_url_list(urls) if isinstance(urls, str) else [u.strip() for u in urls]
    nodes = [part for part in parts if part]
    if not nodes:
        raise ConfigurationError("no broker URL given; pass amqp://user:password@host:5672/")
    for node in nodes:
        if node.partition("://")[0] not in SCHEMES:
            raise UnsupportedURLError(
                f"unsupported broker URL {mask_url(node)!r} in a node list; every node "
                "needs an amqp:// or amqps:// URL"
            )
    return nodes


def shuffled(nodes: Sequence[str]) -> list[str]:
    """`nodes` in a random order, so that many processes given one list spread over it."""
    return random.sample(list(nodes), len(nodes))


class FailoverConnection(aio_pika.RobustConnection):
    """A robust connection over `nodes`, starting at `nodes[start]`.

    After a lost connection it tries the next node at once; after each full round of failed
    attempts it waits `RECONNECT_MIN` seconds, doubling up to `RECONNECT_MAX` (or the URL's
    `reconnect_interval`, if lower).
    """

    def __init__(self, nodes: Sequence[str], start: int = 0, **kwargs: Any) -> None:
        self._nodes = list(nodes)
        self._index = start % len(self._nodes)
        super().__init__(make_url(self._nodes[self._index]), **kwargs)
        # Exact doubling, no jitter: the shuffled node order already spreads processes.
        self._backoff = Backoff(
            first=RECONNECT_MIN,
            cap=min(float(self.reconnect_interval), RECONNECT_MAX),
            jitter=False,
        )
        self._failures = 0
        self._established = False
        self.reconnect_interval = 0.0

    @property
    def node(self) -> str:
        """The URL of the node this connection is on (or trying next), password masked."""
        return mask_url(self._nodes[self._index])

    async def _on_connected(self) -> None:
        reconnect = self.connection_attempt > 0
        # aio-pika restores every channel in here; should that fail on this node, it closes
        # the connection and `_on_connection_close` counts a failed attempt.
        await super()._on_connected()
        self._established = True
        self._failures = 0
        self._backoff.reset()
        self.reconnect_interval = 0.0
        if reconnect:
            log.warning("reconnected to RabbitMQ node %s", self.node)

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        # Every failed attempt passes through here too: aio-pika's UnderlayConnection.connect
        # calls it with the failure before raising. The loop then connects to `self.url`.
        if not (self._close_called or self.is_closed):
            self._move_on(lost=self._established)
        self._established = False
        await super()._on_connection_close(closing)

    def _move_on(self, *, lost: bool) -> None:
        left = self.node
        self._index = (self._index + 1) % len(self._nodes)
        self.url = make_url(self._nodes[self._index])
        if lost:
            self._failures = 0
            self._backoff.reset()
            self.reconnect_interval = 0.0
            log.warning("lost RabbitMQ node %s; trying %s", left, self.node)
            return
        self._failures += 1
        if self._failures % len(self._nodes):
            self.reconnect_interval = 0.0  # untried nodes left in this round
        else:
            self.reconnect_interval = self._backoff.next()
        log.info(
            "cannot reach RabbitMQ node %s; trying %s in %.1fs",
            left,
            self.node,
            self.reconnect_interval,
        )
