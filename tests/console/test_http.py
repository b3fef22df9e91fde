"""The console without a browser: binding rules, credentials, 404 pages, redaction, the CLI."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import pytest

from tests.conftest import Backend
from txflow import Event, RetryPolicy, TxFlow
from txflow.cli import main
from txflow.cli._common import EXIT_USAGE
from txflow.console import _data as console_data
from txflow.console._app import ConsoleSettings, create_app
from txflow.console._data import ConsoleData, redact
from txflow.console._security import Auth, check_bind, is_loopback, load_auth
from txflow.dlq import dead_letter_queue
from txflow.errors import ConfigurationError
from txflow.testing import wait_until


class Charged(Event):
    n: int


# Never connected: these tests stop before the console would ask the broker anything.
BROKER = "amqp://guest:guest@127.0.0.1:5672/console-unused"


def offline_app() -> TxFlow:
    from examples.order_inventory import inventory

    return inventory.create_app(database_url="sqlite:///unused.db")


def client(settings: ConsoleSettings | None = None) -> httpx.AsyncClient:
    app = create_app(ConsoleData([offline_app()], broker_url=BROKER), settings)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://console")


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_needs_no_credentials(host: str) -> None:
    assert is_loopback(host)
    check_bind(host, Auth())


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "console.example"])
def test_other_addresses_need_credentials(host: str) -> None:
    with pytest.raises(ConfigurationError, match="without authentication"):
        check_bind(host, Auth())
    check_bind(host, Auth(token="t"))


def test_cli_refuses_to_bind_beyond_loopback_without_auth(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("TXFLOW_CONSOLE_TOKEN", "TXFLOW_CONSOLE_PASSWORD", "TXFLOW_CONSOLE_AUTH_FILE"):
        monkeypatch.delenv(name, raising=False)
    code = main(["console", "tests.cli_app:app", "--host", "0.0.0.0", "--broker", BROKER])
    assert code == EXIT_USAGE
    assert "refusing to serve the console on 0.0.0.0" in capsys.readouterr().err


def test_credentials_from_a_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = tmp_path / "auth"
    file.write_text("ops:hunter2\n")
    auth = load_auth(str(file))
    basic = "Basic " + base64.b64encode(b"ops:hunter2").decode()
    assert auth.accepts(basic) and not auth.accepts("Basic " + base64.b64encode(b"ops:x").decode())
    file.write_text("tok3n\n")
    assert load_auth(str(file)).accepts("Bearer tok3n")
    monkeypatch.setenv("TXFLOW_CONSOLE_PASSWORD", "p")
    monkeypatch.delenv("TXFLOW_CONSOLE_USER", raising=False)
    with pytest.raises(ConfigurationError, match="TXFLOW_CONSOLE_USER"):
        load_auth()


def test_credentials_in_urls_are_masked() -> None:
    text = "cannot connect to postgresql://app:s3cret@db:5432/x or amqp://u:p@h/"
    assert redact(text) == "cannot connect to postgresql://app:***@db:5432/x or amqp://u:***@h/"


async def test_unknown_pages_queues_and_flows_are_404_pages() -> None:
    async with client() as http:
        for path in ("/nowhere", "/dead-letters/no-such-queue.dlq", "/dead-letters/x/replay"):
            response = await http.get(path)
            assert response.status_code == 404, path
            assert "<h1>Not found" in response.text and "Traceback" not in response.text
        assert "no dead-letter queue" in (await http.get("/dead-letters/nope")).text
        bad_status = await http.get("/flows?status=bogus")
        assert bad_status.status_code == 404 and "no flow status" in bad_status.text


async def test_every_response_carries_the_security_headers() -> None:
    async with client() as http:
        response = await http.get("/nowhere")
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert response.headers["x-content-type-options"] == "nosniff"
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie


async def test_a_post_without_the_token_is_refused_before_anything_happens() -> None:
    queue = offline_app().handlers["reserve_stock"].queue + ".dlq"
    async with client() as http:
        refused = await http.post(f"/dead-letters/{queue}/purge", data={})
    assert refused.status_code == 403 and "CSRF" in refused.text


def test_the_console_extra_is_not_needed_to_import_txflow() -> None:
    import subprocess
    import sys

    code = "import sys, txflow, txflow.cli; assert 'starlette' not in sys.modules, 'starlette'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_txflow_console_serves_until_sigterm(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.console.conftest import free_port

    port = free_port()
    env = {**os.environ, "TXFLOW_DATABASE_URL": f"sqlite:///{tmp_path}/cli.db"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "txflow",
            "console",
            "tests.cli_app:app",
            "--broker",
            BROKER,
            "--port",
            str(port),
            "--read-only",
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "console did not start"
                time.sleep(0.2)
        assert response.status_code == 200 and "read-only" in response.text
        # The vhost does not exist: the page says so, with the password masked.
        assert "guest:***@" in response.text and "guest:guest" not in response.text
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"txflow console on http://127.0.0.1:{port}/ (read-only)" in err


async def test_a_database_without_tables_gets_the_db_init_hint(tmp_path: Path) -> None:
    from examples.order_inventory import inventory

    app = inventory.create_app(database_url=f"sqlite:///{tmp_path / 'empty.db'}")
    data = ConsoleData([app], broker_url=BROKER)
    try:
        overview = await data.overview()
    finally:
        await data.aclose()
    assert overview.outboxes[0].pending is None
    (problem,) = [p for p in data.problems if "empty.db" in p]
    assert "no such table" in problem and "txflow db init module:app" in problem


async def test_groups_of_a_queue_longer_than_the_sample_say_so(
    real: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = await real.app("console-sample")

    @app.handler(retry=RetryPolicy(max_attempts=1))
    async def charge(event: Charged) -> None:
        raise ValueError(f"card {event.n} declined")

    await app.start()
    await app.publish(*(Charged(n=n) for n in range(5)))
    queue = dead_letter_queue(app.handlers["charge"].queue)
    data = ConsoleData([app], database_url=await real.database_url())
    try:
        await wait_until(lambda: app.consumers[0].stats.dead_lettered == 5, timeout=60)
        monkeypatch.setattr(console_data, "GROUPING_LIMIT", 3)
        (group,) = await data.dead_letter_groups() or []
        assert (group.queue, group.count, group.queue_depth, group.sampled) == (queue, 3, 5, True)
        web = create_app(data)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=web), base_url="http://console"
        ) as http:
            page = (await http.get("/dead-letters")).text
        assert ">3+</a>" in page and "first 3 of 5 dead letters" in page
        # Replaying the group still covers every message, not only the sampled ones.
        assert await data.replay(queue, exception_type="ValueError") == 5
    finally:
        await data.aclose()
