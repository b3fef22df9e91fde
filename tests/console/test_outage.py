"""The broker or the database goes away under an open console page, and comes back.

The shared servers are never stopped: the console reaches them through TCP proxies of this
test's own, which it cuts (closing the listener and every connection) and restores.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit, urlunsplit

import pytest
from playwright.async_api import Browser, expect

from tests.console.conftest import Shop, free_port, serving
from txflow.console._data import ConsoleData

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]


class Proxy:
    """Forwards 127.0.0.1:port to a server; `cut()` drops everything, `restore()` listens again."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def restore(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    def url(self, url: str) -> str:
        parts = urlsplit(url)
        netloc = parts.netloc.replace(f":{parts.port}", f":{self.port}")
        return urlunsplit(parts._replace(netloc=netloc))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(dst)
            with contextlib.suppress(Exception):
                dst.transport.abort()


async def test_banner_while_a_server_is_away_and_the_page_recovers(
    shop: Shop, browser: Browser
) -> None:
    assert shop.backend.amqp_url is not None
    broker = Proxy(5672)
    database = Proxy(5432)
    await broker.restore()
    await database.restore()
    orders_db = await shop.backend.database_url("orders")
    data = ConsoleData(shop.apps, broker_url=broker.url(shop.backend.amqp_url))
    # The orders database through its proxy; the others directly.
    data.databases = {
        (database.url(url) if url == orders_db else url): db for url, db in data.databases.items()
    }
    for url, db in data.databases.items():
        db.url = url
    page = await browser.new_page()
    try:
        async with serving(data) as console:
            await page.goto(console + "/")
            await expect(page.locator("table.queues td.n").first).to_have_text("0")
            await expect(page.locator("#banner")).to_have_count(0)

            await database.cut()
            banner = page.locator("#banner")
            await expect(banner).to_contain_text("txflow_", timeout=30_000)
            await expect(banner).not_to_contain_text("password")
            await database.restore()
            await expect(banner).to_have_count(0, timeout=30_000)

            await broker.cut()
            await expect(banner).to_contain_text("guest:***@", timeout=30_000)
            await expect(page.locator("table.queues")).to_contain_text("?")
            await page.goto(console + "/dead-letters")
            await expect(page.locator("main")).to_contain_text("cannot be reached")
            await page.goto(console + "/")
            await broker.restore()
            await expect(banner).to_have_count(0, timeout=30_000)
            await expect(page.locator("table.queues td.n").first).to_have_text("0")
    finally:
        await broker.cut()
        await database.cut()
