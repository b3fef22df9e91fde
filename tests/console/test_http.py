"""The console without a browser: binding rules, credentials, 404 pages, redaction, the CLI."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import pytest

from txflow import TxFlow
from txflow.cli import main
from txflow.cli._common import EXIT_USAGE
from txflow.console._app import ConsoleSettings, create_app
from txflow.console._data import ConsoleData, redact
from txflow.console._security import Auth, check_bind, is_loopback, load_auth
from txflow.errors import ConfigurationError

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
