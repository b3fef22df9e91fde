"""`--workers N` metrics files: a dead worker's counts stay in the sum, in one compacted file."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from pathlib import Path

from tests.metrics_support import scrape, total
from txflow._metrics import WorkerMetrics

# A worker that records `n` handled messages of one handler, each 0.003 s long, and exits.
_WORKER = """
import sys
from txflow import _metrics
n = int(sys.argv[1])
handled = _metrics.MESSAGES.labels("files", "record", "handled", "")
duration = _metrics.HANDLER_DURATION.labels("files", "record")
for _ in range(n):
    handled.inc()
    duration.observe(0.003)
"""


def _worker(metrics: WorkerMetrics, n: int) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _WORKER, str(n)],
        env={**os.environ, **metrics.env()}, timeout=60, check=True,
    )  # fmt: skip
    assert done.returncode == 0
    return n


def _db_files(directory: str) -> list[str]:
    return sorted(p.name for p in Path(directory).glob("*.db"))


def _pids(directory: str) -> set[int]:
    """The pids of the workers whose own files are in `directory`."""
    return {
        int(name.split("_")[1].removesuffix(".db"))
        for name in _db_files(directory)
        if not name.endswith("_compacted.db")
    }


async def _handled(port: int) -> tuple[float, float]:
    samples = await scrape(port)
    return (
        total(samples, "txflow_messages_total", app="files", outcome="handled"),
        total(samples, "txflow_handler_duration_seconds_count", app="files"),
    )


async def test_dead_workers_files_are_compacted_and_the_sum_holds() -> None:
    metrics = WorkerMetrics("127.0.0.1", 0)
    port = metrics.server.port
    try:
        for n in (5, 7, 11):
            _worker(metrics, n)
        pids = _pids(metrics.directory)
        assert len(pids) == 3
        assert await _handled(port) == (23, 23)
        for pid in pids:
            metrics.process_dead(pid)
            assert await _handled(port) == (23, 23)  # after each compaction, the same sum
        assert _db_files(metrics.directory) == ["counter_compacted.db", "histogram_compacted.db"]
        # A worker after the compaction adds to it; its death folds it in again.
        _worker(metrics, 4)
        assert await _handled(port) == (27, 27)
        (late,) = _pids(metrics.directory)
        metrics.process_dead(late)
        assert await _handled(port) == (27, 27)
        samples = await scrape(port)
        bucket = total(samples, "txflow_handler_duration_seconds_bucket", app="files", le="0.005")
        assert bucket == 27  # the histogram's buckets were summed too, not only its count
        metrics.process_dead(999_999)  # a pid with no files: nothing to do, no error
    finally:
        metrics.close()
    assert not _db_files(metrics.directory)  # the directory went with it


async def test_scrapes_during_compaction_never_fail_nor_go_backwards() -> None:
    metrics = WorkerMetrics("127.0.0.1", 0)
    port = metrics.server.port
    seen: list[float] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def scraping() -> None:
        while not stop.is_set():
            try:
                seen.append(asyncio.run(_handled(port))[0])
            except BaseException as exc:
                errors.append(exc)
                return

    try:
        scraper = threading.Thread(target=scraping)
        scraper.start()
        expected = 0
        for n in range(1, 7):
            expected += _worker(metrics, n)
            for pid in _pids(metrics.directory):
                metrics.process_dead(pid)
        stop.set()
        scraper.join(timeout=60)
        assert not errors, errors
        assert seen == sorted(seen), seen
        assert await _handled(port) == (expected, expected)
    finally:
        stop.set()
        metrics.close()


def _half_made(directory: str, pid: int) -> None:
    """The files of a worker caught creating them: one still empty, one not yet sized."""
    Path(directory, f"counter_{pid}.db").touch()
    Path(directory, f"histogram_{pid}.db").write_bytes(b"\0\0")


async def test_a_worker_creating_its_file_does_not_fail_a_scrape() -> None:
    # A starting worker's file exists empty for a moment before prometheus_client sizes it;
    # a scrape in that moment once failed with HTTP 500.
    metrics = WorkerMetrics("127.0.0.1", 0)
    try:
        _worker(metrics, 3)
        _half_made(metrics.directory, 424242)
        assert await _handled(metrics.server.port) == (3, 3)
    finally:
        metrics.close()
