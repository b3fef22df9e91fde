"""The console in a real browser, on the example's services over RabbitMQ and PostgreSQL.

Each test clicks through the pages as an operator would and checks the effect where it
lands: in the databases (the handler ran once per replayed message), on the broker, in the
page (counts drop, the timeline is in order, a `<script>` in a dead letter stays text).
"""

from __future__ import annotations

import re

import pytest
from playwright.async_api import Browser, Page, expect

from tests.console.conftest import Shop, screenshot_path, serving
from txflow import Message
from txflow.console._app import ConsoleSettings
from txflow.console._security import Auth

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

XSS_BODY = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2">'
XSS_HEADER = '<img src=x onerror="window.__xss = 3">'


async def shot(page: Page, name: str) -> None:
    path = screenshot_path(name)
    if path:
        await page.screenshot(path=path, full_page=True)


async def group_count(page: Page, queue: str) -> str:
    return await page.locator(f'tr.group[data-queue="{queue}.dlq"] td.count').inner_text()


async def test_replay_one_then_a_group_by_clicking(shop: Shop, browser: Browser) -> None:
    placed = [await shop.place() for _ in range(3)]
    queue = shop.charge_queue
    await shop.wait_dead_letters(queue, 3)
    shop.poisoned = False  # the gateway is back: replays now succeed
    page = await browser.new_page(viewport={"width": 1280, "height": 800})
    stale = await browser.new_page()
    async with serving(shop.console()) as url:
        await page.goto(url + "/")
        await expect(page.locator("table.queues")).to_contain_text(queue)
        await expect(page.locator("#overview")).to_contain_text("running")
        await shot(page, "overview")

        await page.click("text=Dead letters")
        await expect(page.locator("tr.group")).to_have_count(1)
        assert (await group_count(page, queue)).strip() == "3"
        await expect(page.locator("tr.group")).to_contain_text("RuntimeError")
        await shot(page, "dead-letters")

        await page.click(f'tr.group[data-queue="{queue}.dlq"] td.count a')
        await expect(page.locator("#count")).to_have_text("3")
        first = page.locator("tr.message").first
        message_id = await first.get_attribute("data-id")
        assert message_id
        await first.locator("td a").first.click()
        await expect(page.locator("h1")).to_contain_text(message_id)
        await expect(page.locator("#body")).to_contain_text('"order_id"')
        await expect(page.locator(".traceback")).to_contain_text("card gateway down")
        await shot(page, "dead-letter")

        # A second tab opens the same confirmation before the first replays the message.
        await page.click("text=Replay this message")
        await stale.goto(page.url)
        await expect(page.locator("#confirm-count")).to_have_text("1")
        await page.click("#confirm")
        await expect(page.locator("#result")).to_have_text(re.compile(r"replayed 1 message"))

        replayed = next(o for o in placed if shop.charged[o])
        await shop.wait_status(replayed, "CONFIRMED")
        assert shop.charged[replayed] == 1 and await shop.payments_for(replayed) == 1
        assert sum(shop.charged.values()) == 1

        await page.click("text=Back to the dead letters")
        assert (await group_count(page, queue)).strip() == "2"

        # The stale confirmation: the message is gone, and the page says so.
        await stale.click("#confirm")
        await expect(stale.locator("#result")).to_contain_text("no longer in")
        assert sum(shop.charged.values()) == 1

        await page.click(f'tr.group[data-queue="{queue}.dlq"] >> text=Replay group')
        await expect(page.locator("#confirm-count")).to_have_text("2")
        await page.click("#confirm")
        await expect(page.locator("#result")).to_have_text(re.compile(r"replayed 2 message"))
        for order_id in placed:
            await shop.wait_status(order_id, "CONFIRMED")
            assert shop.charged[order_id] == 1 and await shop.payments_for(order_id) == 1
        await page.click("text=Back to the dead letters")
        await expect(page.locator(".empty")).to_contain_text("No dead letters")


async def test_compensated_order_timeline_and_graph(shop: Shop, browser: Browser) -> None:
    shop.poisoned = False
    ok = await shop.place()
    declined = await shop.place(customer="declined-bob")
    await shop.wait_status(ok, "CONFIRMED")
    await shop.wait_status(declined, "FAILED")
    page = await browser.new_page(viewport={"width": 1280, "height": 800})
    async with serving(shop.console()) as url:
        await page.goto(url + "/flows")
        await expect(page.locator("tr.flow-row")).to_have_count(2)
        await page.select_option("select[name=status]", "failed")
        await page.click("form.filters button")
        await expect(page.locator("tr.flow-row")).to_have_count(1)
        await shot(page, "flows")

        await page.fill("input[name=id]", declined)
        await page.click("form.search button")
        await expect(page.locator("#flow-status")).to_have_text("failed")
        entries = page.locator("#timeline li.entry")
        seen = [
            (await e.get_attribute("data-action"), await e.get_attribute("data-step"))
            for e in await entries.all()
        ]
        expected = [
            ("step completed", "place_order"),
            ("step completed", "reserve_stock"),
            ("step failed", "charge"),
            ("compensation requested", "reserve_stock"),
            ("step compensated", "reserve_stock"),
            ("compensation requested", "place_order"),
            ("step compensated", "place_order"),
            ("failed", ""),
        ]
        positions = [seen.index(item) for item in expected]  # ValueError names a missing one
        assert positions == sorted(positions), seen
        await expect(page.locator("#timeline")).to_contain_text("PaymentDeclined")
        await shot(page, "flow")

        await page.goto(url + "/flows/order/no-such-order")
        await expect(page.locator(".error-message")).to_contain_text("no instance")

        await page.goto(url + "/graph")
        await expect(page.locator("body[data-graph=drawn] #graph svg")).to_be_visible()
        await expect(page.locator("#graph svg")).to_contain_text("PaymentDeclined")
        await shot(page, "graph")


async def test_a_dead_letter_carrying_markup_is_inert(shop: Shop, browser: Browser) -> None:
    queue = shop.inventory.handlers["reserve_stock"].queue
    await shop.inventory.transport.send(
        queue,
        Message(
            body=XSS_BODY.encode(),
            routing_key=queue,
            message_id="xss-1",
            type="OrderCreated",
            headers={"x-evil": XSS_HEADER},
        ),
    )

    async def dead() -> bool:
        return await shop.inventory.transport.queue_depth(queue + ".dlq") == 1

    from txflow.testing import wait_until

    await wait_until(dead, timeout=60, message="the markup dead-lettered")
    page = await browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    async with serving(shop.console()) as url:
        for path in ("/dead-letters", f"/dead-letters/{queue}.dlq", f"/dead-letters/{queue}.dlq"):
            await page.goto(url + path)
        await page.goto(f"{url}/dead-letters/{queue}.dlq/message?id=xss-1")
        await expect(page.locator("#body")).to_have_text(XSS_BODY)
        await expect(page.locator("#headers")).to_contain_text(XSS_HEADER)
        assert await page.locator("#body img, #body script, #headers img").count() == 0
        assert await page.evaluate("window.__xss") is None
        assert not errors


async def test_posts_need_the_csrf_token_and_read_only_refuses(
    shop: Shop, browser: Browser
) -> None:
    await shop.place()
    await shop.wait_dead_letters(shop.charge_queue, 1)
    dlq = shop.charge_queue + ".dlq"
    page = await browser.new_page()
    async with serving(shop.console()) as url:
        await page.goto(f"{url}/dead-letters/{dlq}/purge")
        await expect(page.locator("#confirm-count")).to_have_text("1")
        # The page's own session cookie, but no token: refused, nothing purged.
        refused = await page.request.post(f"{url}/dead-letters/{dlq}/purge", form={})
        assert refused.status == 403 and "CSRF" in await refused.text()
        forged = await page.request.post(
            f"{url}/dead-letters/{dlq}/purge", form={"csrf_token": "0" * 64}
        )
        assert forged.status == 403
        assert await shop.payment.transport.queue_depth(dlq) == 1
        await page.click("#confirm")
        await expect(page.locator("#result")).to_have_text(f"purged 1 message(s) from {dlq}")
        assert await shop.payment.transport.queue_depth(dlq) == 0

    await shop.place()
    await shop.wait_dead_letters(shop.charge_queue, 1)
    async with serving(shop.console(), ConsoleSettings(read_only=True)) as url:
        await page.goto(f"{url}/dead-letters")
        await expect(page.locator("tr.group")).to_have_count(1)
        assert await page.locator("text=Replay group").count() == 0
        token_page = await page.goto(f"{url}/dead-letters/{dlq}/purge")
        assert token_page is not None and "read-only" in await token_page.text()
        refused = await page.request.post(f"{url}/dead-letters/{dlq}/purge", form={})
        assert refused.status == 403 and "read-only" in await refused.text()
        assert await shop.payment.transport.queue_depth(dlq) == 1


async def test_authentication_is_required_once_configured(shop: Shop, browser: Browser) -> None:
    settings = ConsoleSettings(auth=Auth(token="s3cret-token"))
    async with serving(shop.console(), settings) as url:
        # A page would show chromium's own error for the 401 (no login prompt headless), so
        # the refused ones go through the context's request API, with its cookies and auth.
        anonymous = await browser.new_context()
        refused = await anonymous.request.get(url + "/")
        assert refused.status == 401 and "basic" in refused.headers["www-authenticate"].lower()
        assert (await anonymous.request.get(url + "/static/console.css")).status == 401
        wrong = await browser.new_context(http_credentials={"username": "op", "password": "x"})
        assert (await wrong.request.get(url + "/")).status == 401
        operator = await browser.new_context(
            http_credentials={"username": "op", "password": "s3cret-token"}
        )
        page = await operator.new_page()
        response = await page.goto(url + "/")
        assert response is not None and response.status == 200
        await expect(page.locator("h1")).to_have_text("Overview")
