"""What the fault scenarios report and check, tested without servers.

The counts read from a service's log, and the check that the dead letters are exactly the
garbage a scenario injected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from examples.order_inventory import demo, orders
from examples.order_inventory.report import ExpectedDeadLetter, check_dead_letters

from txflow import DeadLetterInfo

SUPERVISOR = 100
RUNNING = "orders running; SIGINT or SIGTERM stops it gracefully"


def _line(pid: int, logger: str, message: str) -> str:
    return f"2026-01-01 00:00:00,000 INFO    [{pid}] {logger}: {message}"


def _stats(pid: int, handled: int, duplicates: int, retried: int, requeued: int) -> str:
    return _line(
        pid,
        "txflow",
        f"orders stats: handled={handled} duplicates={duplicates} retried={retried} "
        f"dead_lettered=0 requeued={requeued} published={handled} swept=0 publish_failures=0",
    )


def _restarted(pid: int, code: int) -> str:
    return _line(SUPERVISOR, "txflow.cli", f"worker 1 (pid {pid}) exited with {code}; restarting")


def _service(tmp_path: Path, *lines: str) -> demo.Service:
    log = tmp_path / "orders.log"
    log.write_text("\n".join(lines) + "\n")
    process: Any = None  # stats() reads only the log
    return demo.Service("orders", process, log, orders.create_app(database_url="sqlite://"))


def test_counters_are_summed_and_killed_workers_make_them_lower_bounds(tmp_path: Path) -> None:
    service = _service(
        tmp_path,
        _line(SUPERVISOR, "txflow.cli", "supervising 2 workers of x:app"),
        _line(101, "txflow.cli", RUNNING),
        _line(102, "txflow.cli", RUNNING),
        _restarted(102, -9),  # killed while serving
        _restarted(103, -9),  # killed before it said it was running
        _restarted(104, 1),  # failed to start: handled nothing
        _restarted(106, -15),  # SIGTERM before its handlers were installed: never served
        _line(105, "txflow.cli", RUNNING),
        _stats(101, handled=10, duplicates=1, retried=2, requeued=3),
        _stats(105, handled=5, duplicates=0, retried=1, requeued=0),
        _line(105, "txflow", "inventory stats: handled=99 duplicates=99"),  # not this app
    )
    stats = service.stats()
    assert stats.counters["handled"] == 15
    assert stats.counters["duplicates"] == 1
    assert stats.counters["retried"] == 3
    assert stats.counters["requeued"] == 3
    assert (stats.worker_runs, stats.logged_runs) == (4, 2)
    counts = demo.Counts(1000, 15, 3, 3, 1, 0, 2, 0, stats.worker_runs, stats.logged_runs)
    assert not counts.exact
    assert "retries>=3" in counts.line()
    assert "dead_letters=0" in counts.line()  # read from the broker: exact either way


def test_running_counters_of_a_killed_worker_count_and_are_not_added_twice(
    tmp_path: Path,
) -> None:
    service = _service(
        tmp_path,
        _line(101, "txflow.cli", RUNNING),
        _line(101, "txflow", "orders stats (running): handled=3 duplicates=0 retried=0 requeued=0"),
        _line(101, "txflow", "orders stats (running): handled=7 duplicates=1 retried=0 requeued=0"),
        _restarted(101, -9),  # killed after its second running line
        _line(102, "txflow.cli", RUNNING),
        _line(102, "txflow", "orders stats (running): handled=2 duplicates=0 retried=0 requeued=0"),
        _stats(102, handled=4, duplicates=0, retried=0, requeued=0),  # its final line
    )
    stats = service.stats()
    assert stats.counters["handled"] == 11  # the last line of each worker: 7 + 4
    assert stats.counters["duplicates"] == 1
    assert (stats.worker_runs, stats.logged_runs) == (2, 1)


def test_counts_are_exact_when_every_serving_worker_logged(tmp_path: Path) -> None:
    service = _service(
        tmp_path,
        _line(SUPERVISOR, "txflow.cli", "supervising 2 workers of x:app"),
        _line(101, "txflow.cli", RUNNING),
        _line(102, "txflow.cli", RUNNING),
        _stats(102, handled=4, duplicates=0, retried=0, requeued=0),
        _restarted(102, 0),  # stopped gracefully (SIGTERM), restarted
        _line(103, "txflow.cli", RUNNING),
        _stats(101, handled=10, duplicates=1, retried=2, requeued=3),
        _stats(103, handled=1, duplicates=0, retried=1, requeued=0),
    )
    stats = service.stats()
    assert (stats.worker_runs, stats.logged_runs) == (3, 3)
    counts = demo.Counts(1000, 15, 3, 3, 1, 0, 2, 0, stats.worker_runs, stats.logged_runs)
    assert counts.exact
    assert counts.line() == (
        "orders=1000 handled=15 retries=3 requeued=3 duplicates=1 dead_letters=0 "
        "republished=2 unsent=0"
    )


MALFORMED = "txflow.errors.MalformedMessageError"
UNKNOWN = "txflow.errors.UnknownEventTypeError"


def _dead(message_id: str, exception_type: str | None, reason: str | None) -> DeadLetterInfo:
    return DeadLetterInfo(
        message_id, "c-" + message_id, None, None, exception_type, reason, None, 1, None, None, None
    )


EXPECTED = [
    ExpectedDeadLetter("a.dlq", MALFORMED, "m1", reason_contains="JSON"),
    ExpectedDeadLetter("a.dlq", UNKNOWN, correlation_id="c-m2"),  # sent without an id
    ExpectedDeadLetter("b.dlq", MALFORMED, "m3"),
]
FOUND = {
    "a.dlq": [_dead("m1", MALFORMED, "body is not valid JSON"), _dead("m2", UNKNOWN, "no")],
    "b.dlq": [_dead("m3", MALFORMED, "content type")],
}


def test_dead_letters_that_are_exactly_the_garbage_pass() -> None:
    check = check_dead_letters({"a.dlq": 2, "b.dlq": 1, "c.dlq": 0}, FOUND, EXPECTED)
    assert check.ok, check.detail


def test_dead_letters_missing_extra_or_without_their_reason_fail() -> None:
    depths = {"a.dlq": 2, "b.dlq": 1}
    missing = {**FOUND, "b.dlq": []}
    assert not check_dead_letters({**depths, "b.dlq": 0}, missing, EXPECTED).ok
    extra = {**FOUND, "b.dlq": [*FOUND["b.dlq"], _dead("real", "Boom", "a real failure")]}
    assert not check_dead_letters({**depths, "b.dlq": 2}, extra, EXPECTED).ok
    no_reason = {**FOUND, "b.dlq": [_dead("m3", MALFORMED, "")]}
    assert not check_dead_letters(depths, no_reason, EXPECTED).ok
    wrong_type = {**FOUND, "b.dlq": [_dead("m3", UNKNOWN, "content type")]}
    assert not check_dead_letters(depths, wrong_type, EXPECTED).ok
    wrong_reason = {**FOUND, "a.dlq": [_dead("m1", MALFORMED, "other"), FOUND["a.dlq"][1]]}
    assert not check_dead_letters(depths, wrong_reason, EXPECTED).ok
    # Every expected one found, but the queue holds more than was read.
    assert not check_dead_letters({**depths, "a.dlq": 3}, FOUND, EXPECTED).ok
