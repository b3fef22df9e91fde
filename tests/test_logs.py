"""`txflow run --log-format json`: one JSON object per line, naming the hop it comes from."""

from __future__ import annotations

import json
import logging
import sys
import uuid
from pathlib import Path

from tests.support import Ping
from tests.test_metrics import Service, count_handled, database, producer, run_service, services
from txflow._logging import JsonFormatter, hop_ended, hop_started
from txflow.testing import wait_until
from txflow.transport import Message

__all__ = ["database", "services"]  # fixtures, imported to be used here


async def test_json_log_lines_parse_and_name_the_hop(
    amqp_url: str, database: str, services: list[Service], tmp_path: Path
) -> None:
    service = await run_service(services, tmp_path, amqp_url, database, "--log-format", "json")
    trace_id, span_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    async with producer(amqp_url, tmp_path) as prod:

        def running() -> bool:
            return '"message": "metricsapp running; ' in service.text()

        await wait_until(running, timeout=90, message=f"running\n{service.text()[-3000:]}")
        async with prod.transaction(correlation_id="order-7") as tx:
            message_id = tx.emit(Ping(n=7), headers={"traceparent": f"00-{trace_id}-{span_id}-01"})
        await wait_until(
            lambda: "recording ping 7" in service.text(), timeout=60, message="the hop's line"
        )
    assert await service.stop() == 0
    lines = [json.loads(line) for line in service.text().splitlines() if line.strip()]
    (hop,) = [line for line in lines if line["message"] == "recording ping 7"]
    assert hop == {
        "time": hop["time"],
        "level": "INFO",
        "logger": "tests.metrics_app",
        "message": "recording ping 7",
        "process": service.process.pid,
        "app": "metricsapp",
        "handler": "record",
        "message_id": message_id,
        "correlation_id": "order-7",
        # No SDK in the worker: the ids are the producer's context, carried on.
        "trace_id": trace_id,
        "span_id": span_id,
    }
    started = [line for line in lines if line["message"].startswith("metricsapp started")]
    assert started and started[0]["app"] == "metricsapp" and started[0]["handler"] is None
    assert await count_handled(database) == 1


def test_a_line_outside_any_hop_names_only_the_process_app() -> None:
    record = logging.LogRecord("txflow", logging.ERROR, __file__, 1, "failed: %s", ("x",), None)
    try:
        raise ValueError("boom")
    except ValueError:
        record.exc_info = sys.exc_info()
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "failed: x"
    assert line["level"] == "ERROR"
    assert (line["handler"], line["message_id"], line["trace_id"]) == (None, None, None)
    assert "ValueError: boom" in line["exception"]


def test_the_hop_context_is_set_and_reset() -> None:
    message = Message(body=b"{}", routing_key="Ping", message_id="m1", correlation_id="c1")
    token = hop_started("app", "handler", message)
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "inside", (), None)
    inside = json.loads(JsonFormatter().format(record))
    hop_ended(token)
    outside = json.loads(JsonFormatter().format(record))
    assert (inside["app"], inside["handler"], inside["message_id"], inside["correlation_id"]) == (
        "app",
        "handler",
        "m1",
        "c1",
    )
    assert outside["handler"] is None and outside["message_id"] is None


def test_a_failing_command_says_why_in_json_when_asked() -> None:
    import subprocess

    def stderr(*args: str) -> tuple[int, list[str]]:
        done = subprocess.run(
            [sys.executable, "-m", "txflow", "run", *args],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        return done.returncode, [line for line in done.stderr.splitlines() if line.strip()]

    code, lines = stderr("tests.no_such_module:app", "--log-format", "json")
    assert code == 2
    parsed = [json.loads(line) for line in lines]  # every line parses
    assert [p["level"] for p in parsed] == ["ERROR"]
    assert "tests.no_such_module" in parsed[0]["message"]
    # The same failure in text: the one plain line scripts grep for.
    code, lines = stderr("tests.no_such_module:app")
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("txflow: error: ")
    assert "tests.no_such_module" in lines[0]
