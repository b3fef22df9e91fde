"""The tutorial in docs/getting-started.md runs as written.

A fenced block preceded by `<!-- test: NAME -->` is (part of) the tutorial's file NAME;
blocks naming the same file are joined in page order. A ```text block preceded by
`<!-- output: SCRIPT -->` is what `python SCRIPT` prints. The tests write the files into a
fresh directory and run them there, as a reader would, in subprocesses so that the
process-wide in-memory broker and `sys.modules` stay untouched.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import Backend
from tests.support import collect_stderr
from txflow.testing import wait_until

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "getting-started.md"
FLOWS_PAGE = ROOT / "docs" / "concepts" / "flows.md"
TESTING_PAGE = ROOT / "docs" / "testing.md"
FILE_BLOCK = re.compile(r"<!-- test: (\S+) -->\n```\w+\n(.*?)^```$", re.DOTALL | re.MULTILINE)
OUTPUT_BLOCK = re.compile(r"<!-- output: (\S+) -->\n```text\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def tutorial_files(page: Path = PAGE) -> dict[str, str]:
    files: dict[str, str] = {}
    for name, body in FILE_BLOCK.findall(page.read_text()):
        files[name] = files[name] + "\n\n" + body if name in files else body
    return files


def documented_output(script: str, page: Path = PAGE) -> str:
    outputs: dict[str, str] = dict(OUTPUT_BLOCK.findall(page.read_text()))
    return outputs[script]


def write_tutorial(directory: Path, page: Path = PAGE) -> None:
    for name, text in tutorial_files(page).items():
        (directory / name).write_text(text)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a reader's shell: no txflow URLs unless given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TXFLOW_")}
    env["PYTHONWARNINGS"] = "error"
    return {**env, **extra}


def run(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=directory,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def test_page_marks_the_tutorial_files() -> None:
    files = tutorial_files()
    assert set(files) == {
        "shop.py",
        "run_embedded.py",
        "pyproject.toml",
        "test_shop.py",
        "place_orders.py",
    }
    for name, text in files.items():
        if name.endswith(".py"):
            compile(text, name, "exec")  # every Python block is complete on its own


def test_embedded_run_prints_what_the_page_shows(tmp_path: Path) -> None:
    write_tutorial(tmp_path)
    result = run(tmp_path, "run_embedded.py")
    assert result.returncode == 0, result.stderr
    assert result.stdout == documented_output("run_embedded.py")
    assert (tmp_path / "txflow-shop.db").exists()  # the embedded default database


def test_flows_page_example_prints_what_the_page_shows(tmp_path: Path) -> None:
    write_tutorial(tmp_path, FLOWS_PAGE)
    result = run(tmp_path, "trip.py")
    assert result.returncode == 0, result.stderr
    assert result.stdout == documented_output("trip.py", FLOWS_PAGE)


def test_tutorial_tests_pass(tmp_path: Path) -> None:
    write_tutorial(tmp_path)
    result = run(tmp_path, "-m", "pytest", "-q", "-W", "error", "-p", "no:cacheprovider")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def test_testing_page_tests_pass(tmp_path: Path) -> None:
    files = tutorial_files(TESTING_PAGE)
    assert set(files) == {"travel.py", "pyproject.toml", "conftest.py", "test_travel.py"}
    write_tutorial(tmp_path, TESTING_PAGE)
    # The harness's fixture comes from txflow's pytest plugin, found by its entry point.
    result = run(tmp_path, "-m", "pytest", "-q", "-W", "error", "-p", "no:cacheprovider")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "8 passed" in result.stdout


async def test_tutorial_on_rabbitmq_and_postgresql(real: Backend, tmp_path: Path) -> None:
    """The page's server section: db init, run --workers 2, place_orders.py, SIGTERM."""
    write_tutorial(tmp_path)
    env = clean_env(
        TXFLOW_BROKER_URL=real.amqp_url or "",  # a vhost of this test run's own
        TXFLOW_DATABASE_URL=await real.database_url("shop"),
    )

    async def python(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *args, cwd=tmp_path, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    code, out, err = await python("-m", "txflow", "db", "init", "shop:app")
    assert code == 0, err
    assert out.startswith("created txflow's tables and the app's own in postgresql")
    workers = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "txflow", "run", "shop:app", "--workers", "2",
        cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    lines: list[str] = []
    reader = collect_stderr(workers, lines)
    try:
        code, out, err = await python("place_orders.py")
        assert code == 0, err
        assert out == documented_output("place_orders.py")
        # One worker may have handled every order while the other was still starting (a
        # loaded machine): wait until both serve, so that both have a graceful stop to log.
        await wait_until(
            lambda: sum("shop running" in line for line in lines) == 2,
            timeout=60,
            message="both workers running",
        )
        workers.send_signal(signal.SIGTERM)
        await asyncio.wait_for(workers.wait(), 60)
        await reader
        log = "".join(lines)
        assert workers.returncode == 0, log[-2000:]
        assert log.count("shop stopped") == 2
        code, out, err = await python("-m", "txflow", "outbox", "status", "--json")
        assert code == 0, err
        assert '"pending": 0' in out
    finally:
        if workers.returncode is None:
            workers.kill()
            await workers.wait()
        reader.cancel()
