"""`txflow` on the command line: one-line errors with the fix, graceful stop on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from tests.conftest import Backend
from tests.support import Ping, collect_stderr, count_rows, effects
from tests.support import user_metadata as md
from txflow.testing import wait_until

ROOT = Path(__file__).resolve().parent.parent


async def txflow(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "txflow", *args,
        cwd=ROOT, env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize(
    ("args", "code", "expected"),
    [
        (["run", "nosuch.module:app"], 2, "cannot import module 'nosuch.module'"),
        (["run", "tests.cli_app:missing"], 2, "has no attribute 'missing'"),
        (["run", "tests.cli_app:not_an_app"], 2, "is a int, not a TxFlow app"),
        (["run", "tests.cli_app"], 2, "not of the form module:attribute"),
        (["run", "tests.cli_app:app", "--broker", "kafka://x:9092"], 2, "unsupported broker URL"),
        (["run", "tests.cli_app:app", "--database", "mysql://u@h/db"], 2, "unsupported database"),
        (["run", "tests.cli_app:app", "--workers", "2"], 2, "--workers > 1 needs a real broker"),
        (
            ["run", "tests.cli_app:app", "--broker", "amqp://guest:s3cret@127.0.0.1:1/",
             "--fail-fast"],
            69,
            "cannot connect to amqp://guest:***@127.0.0.1:1/",
        ),
        (
            ["db", "init", "tests.cli_app:app", "--database", "postgresql://u:s3cret@127.0.0.1:1/x"],
            69,
            "cannot connect to database postgresql+asyncpg://u:***@127.0.0.1:1/x",
        ),
    ],
    ids=[
        "no-module", "no-attribute", "not-an-app", "no-colon", "bad-broker-scheme",
        "bad-db-scheme", "workers-on-memory", "broker-unreachable", "database-unreachable",
    ],
)  # fmt: skip
async def test_bad_input_gives_one_line_error(
    args: list[str], code: int, expected: str, tmp_path: Path
) -> None:
    rc, _out, err = await txflow(*args, env={"TXFLOW_DATABASE_URL": f"sqlite:///{tmp_path}/x.db"})
    assert rc == code, err
    # `txflow run` logs the URLs it starts on (masked) before it tries them.
    lines = [line for line in err.strip().splitlines() if " INFO " not in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("txflow: error: ")
    assert expected in lines[0]
    assert "s3cret" not in err
    assert "Traceback" not in err


async def test_db_init_then_outbox_status(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/svc.db"
    rc, out, err = await txflow("db", "init", "tests.cli_app:app", "--database", url)
    assert rc == 0, err
    assert "created txflow's tables and the app's own" in out
    rc, out, err = await txflow("outbox", "status", "--database", url, "--json")
    assert rc == 0, err
    assert '"pending": 0' in out


# Its own waits add up to 150 s; the suite's 120 s would cut them short under load and say
# less than they do.
@pytest.mark.timeout(240)
async def test_sigterm_stops_gracefully_and_loses_nothing(real: Backend) -> None:
    database = await real.database_url("main")
    app = await real.app("cliapp", metadata=md)  # same queue names as the worker's app
    env = {
        "TEST_EXCHANGE": real.exchange,
        "TEST_QUEUE_PREFIX": f"{real.test_id}.",
        "TXFLOW_BROKER_URL": real.amqp_url or "",
        "TXFLOW_DATABASE_URL": database,
    }
    rc, _, err = await txflow("db", "init", "tests.cli_app:app", env=env)
    assert rc == 0, err
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "txflow", "run", "tests.cli_app:app", "--workers", "2",
        cwd=ROOT, env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    lines: list[str] = []
    reader = collect_stderr(worker, lines)
    try:
        await wait_until(
            lambda: sum("cliapp running" in line for line in lines) == 2,
            timeout=30,
            message="both workers running",
        )
        app.handlers.clear()  # this process only produces
        async with app:
            total = 200
            async with app.transaction() as tx:
                for i in range(total):
                    tx.emit(Ping(n=i))

            async def some_handled() -> bool:
                return await count_rows(app, effects) >= 20

            await wait_until(some_handled, timeout=30, message="workers handling")
            worker.send_signal(signal.SIGTERM)
            await asyncio.wait_for(worker.wait(), 60)
            await reader
            log = "".join(lines)
            assert worker.returncode == 0, log[-2000:]
            assert log.count("cliapp stopped") == 2

            # What the workers did not finish stays queued; nothing was acked uncommitted.
            async def producer_drained() -> bool:
                return (await app.store.outbox_status()).pending == 0

            await wait_until(producer_drained, timeout=30, message="producer outbox drained")
            handled = await count_rows(app, effects)
            depth = await app.transport.queue_depth(f"{real.test_id}.cliapp.record")
            assert handled + depth == total
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()
        reader.cancel()


async def test_outbox_status_without_tables_is_one_line(tmp_path: Path) -> None:
    rc, _out, err = await txflow("outbox", "status", "--database", f"sqlite:///{tmp_path}/none.db")
    assert rc == 2
    assert err.strip().splitlines() == [
        f"txflow: error: no SQLite database at {tmp_path}/none.db; check the path or --database"
    ]
    assert not (tmp_path / "none.db").exists()


async def test_bad_log_level_is_a_usage_error() -> None:
    rc, _out, err = await txflow("run", "tests.cli_app:app", "--log-level", "loud")
    assert rc == 2
    assert "invalid choice: 'loud'" in err


async def test_dlq_commands_list_show_replay_purge(real: Backend) -> None:
    import json

    from txflow import Message

    env = {
        "TEST_EXCHANGE": real.exchange,
        "TEST_QUEUE_PREFIX": f"{real.test_id}.",
        "TXFLOW_BROKER_URL": real.amqp_url or "",
        "TXFLOW_DATABASE_URL": await real.database_url("main"),
    }
    app = await real.app("cliapp", metadata=md)

    @app.handler(Ping, name="record")
    async def record(event: Ping) -> None: ...

    queue = f"{real.test_id}.cliapp.record"
    async with app:
        await app.consumers[0].stop(timeout=1)  # declared, but nobody consumes
        for i in range(3):
            bad = Message(body=b"{oops", routing_key=queue, message_id=f"bad-{i}", type="Ping")
            await app.transport.send(queue + ".dlq", bad.with_headers({
                "x-txflow-exception-type": "txflow.errors.MalformedMessageError",
                "x-txflow-dead-letter-reason": "body is not valid JSON",
                "x-txflow-attempts": 1,
            }))  # fmt: skip

        rc, out, err = await txflow("dlq", "list", "tests.cli_app:app", env=env)
        assert rc == 0, err
        assert f"{queue}.dlq" in out and " 3" in out

        rc, out, err = await txflow("dlq", "show", queue, "--json", env=env)
        assert rc == 0, err
        shown = json.loads(out)
        assert [d["message_id"] for d in shown] == ["bad-0", "bad-1", "bad-2"]
        assert shown[0]["reason"] == "body is not valid JSON"
        assert shown[0]["body"] == "{oops"

        rc, out, err = await txflow("dlq", "show", queue, env=env)
        assert rc == 0, err
        assert "3 dead letter(s)" in out and "MalformedMessageError" in out
        assert "{oops" not in out

        rc, out, err = await txflow("dlq", "show", queue, "--body", "--limit", "1", env=env)
        assert rc == 0, err
        assert out.endswith("bad-0 (application/json):\n{oops\n")

        rc, out, err = await txflow("dlq", "replay", queue, "--id", "bad-1", env=env)
        assert rc == 0, err
        assert out.strip() == f"replayed 1 message(s) to {queue}"
        assert await app.transport.queue_depth(queue) == 1

        rc, out, err = await txflow("dlq", "purge", queue, env=env)
        assert rc == 2 and "--yes" in err
        rc, out, err = await txflow("dlq", "purge", queue, "--yes", "--json", env=env)
        assert rc == 0, err
        assert json.loads(out) == {"purged": 2}


async def test_flows_list_and_show(tmp_path: Path) -> None:
    from tests.test_flows import make_rig
    from txflow import FlowStatus
    from txflow.testing import InMemoryBroker

    backend = Backend("memory", tmp_path, "cli", broker=InMemoryBroker())
    async with backend.stack:
        rig = await make_rig(backend)
        async with rig.owner, rig.worker:
            await rig.start_flow("ok-1")
            await rig.start_flow("bad-1", fail_at="d")
            await rig.wait_status("ok-1", FlowStatus.COMPLETED)
            await rig.wait_status("bad-1", FlowStatus.FAILED)
    database = await backend.database_url("owner")

    code, out, err = await txflow("flows", "list", "--database", database)
    assert code == 0, err
    assert out.splitlines()[0] == "completed 1  failed 1"
    assert "bad-1" in out and "d: d refused" in out

    code, out, err = await txflow("flows", "list", "--database", database, "--status", "failed")
    assert code == 0, err
    assert "bad-1" in out and "ok-1" not in out

    code, out, err = await txflow("flows", "show", "bad-1", "--database", database, "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert shown["status"] == "failed" and shown["failed_step"] == "d"
    assert [s["step"] for s in shown["completed"]] == ["start", "b", "c"]
    requested = [h["step"] for h in shown["history"] if h["action"] == "compensation requested"]
    assert requested == ["c", "b", "start"]

    code, out, err = await txflow("flows", "show", "bad-1", "--database", database)
    assert code == 0, err
    assert "history:" in out and "step failed" in out and "d: d refused" in out

    code, out, err = await txflow("flows", "show", "nosuch", "--database", database)
    assert code == 2 and "no flow instance 'nosuch'" in err
