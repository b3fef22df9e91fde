"""Runs the order/inventory example under a fault, and the REPORT line each scenario prints."""

from __future__ import annotations

import contextlib
import io

from examples.order_inventory import demo
from examples.order_inventory.report import ExpectedDeadLetter

from tests.conftest import PG_URL

ORDERS = 1000


async def run_example(
    amqp_url: str,
    chaos: demo.Chaos,
    *,
    expected_dead_letters: list[ExpectedDeadLetter] | None = None,
    killed: bool = False,
    database: str = PG_URL,
    listen_database: str | None = None,
    quorum_queues: bool = False,
    timeout: float = 240,
    released: int | None = None,
    runs: list[demo.Run] | None = None,
    workers: int = 2,
    hosts: list[demo.Host] | None = None,
) -> tuple[str, demo.Run]:
    """Run the example under `chaos`; return its printed report (which must pass) and run.

    `expected_dead_letters`, filled in by `chaos` as it goes, replaces the example's "no dead
    letters" check by "the dead letters are exactly these". `killed` says workers were
    SIGKILLed: a row a killed relay published but had not marked sent yet stays pending
    until its lease runs out and another relay sends it again, which may be after the run.
    `database` is the PostgreSQL server the services' databases are created on (a pooler's
    URL with `?pool_mode=transaction`, say), `listen_database` a direct connection to it for
    the relays' LISTEN.
    `amqp_url` may list a cluster's nodes, comma-separated; `quorum_queues` declares quorum
    queues; `timeout` is the seconds every order has to end. `released` places only that
    many orders until `chaos` calls `run.release(...)`; the run is appended to `runs` before
    it starts, so that `chaos` can reach it. `workers` is each service's worker processes
    per host; `hosts` where the services run (`demo.Host`; default: here, once each).
    """
    args = demo.parse_args(
        ["--orders", str(ORDERS), "--broker", amqp_url, "--database", database,
         "--workers", str(workers), "--concurrency", "4", "--timeout", str(timeout)]
        + (["--quorum-queues"] if quorum_queues else [])
        + (["--listen-database", listen_database] if listen_database else [])
    )  # fmt: skip
    run = demo.new_run(args)
    run.released = released
    run.hosts = hosts or ()
    if runs is not None:
        runs.append(run)
    run.expected_dead_letters = expected_dead_letters
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        ok = await demo.amain(args, chaos=chaos, run=run)
    out = buffer.getvalue()
    print(out)
    assert "ALL CHECKS PASSED" in out, out[-4000:]
    assert ok
    assert run.counts is not None, "the distributed demo counts what the services did"
    assert run.counts.orders == ORDERS
    assert run.counts.worker_runs >= 3, run.counts  # each service had a worker serving
    if not killed:
        # Every outbox row was confirmed by the broker before the services stopped.
        assert run.counts.unsent == 0, run.counts
    return out, run


def report_line(scenario: str, run: demo.Run, **fault: object) -> str:
    """`REPORT <scenario>: orders=... retries=... duplicates=... dead_letters=... republished=...`

    Counts taken from the workers' stats lines read `>=` when a worker died without logging.
    """
    assert run.counts is not None
    extra = "".join(f" {key}={value}" for key, value in fault.items())
    return f"REPORT {scenario}: {run.counts.line()}{extra}"
