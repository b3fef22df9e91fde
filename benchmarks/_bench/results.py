"""What one run measured (the records the JSON keeps), and where the JSON is written."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _bench.defaults import RESULTS_DIR


@dataclass
class RunResult:
    side: str
    concurrency: int
    messages: int
    seconds: float
    hops_per_second: float
    # CPU time of this whole process (both sides' code, the sink poll, the loop) per hop.
    cpu_ms_per_hop: float
    checks: dict[str, Any] = field(default_factory=dict)
    # CPU time of the whole machine per hop: this process, PostgreSQL and RabbitMQ (and
    # whatever else runs; the machine is shared, so read it as an upper bound).
    machine_cpu_ms_per_hop: float = 0.0
    # CPU time of PostgreSQL's and RabbitMQ's processes per hop (both shared by every side).
    service_cpu_ms_per_hop: dict[str, float] = field(default_factory=dict)


@dataclass
class ChainResult:
    """One run of the chain workload: `chains` chains of `chain_length` hops each."""

    side: str
    concurrency: int
    chains: int
    chain_length: int
    hops: int
    seconds: float
    hops_per_second: float
    # elapsed * chains / hops: how long one hop of a chain took, on average
    ms_per_hop: float
    cpu_ms_per_hop: float
    checks: dict[str, Any] = field(default_factory=dict)


@dataclass
class LatencyResult:
    side: str
    mode: str
    samples: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    # every sample, sorted (for the distribution plot)
    values_ms: list[float] = field(default_factory=list, repr=False)
    # commit -> the relay hands the message to the broker connection (its publish starts),
    # and commit -> the broker's publish confirm, where a side reports them
    publish_p50_ms: float | None = None
    publish_p99_ms: float | None = None
    confirm_p50_ms: float | None = None
    confirm_p99_ms: float | None = None


def failed_checks(checks: dict[str, Any], expected: dict[str, Any]) -> dict[str, str]:
    """The checks whose value is not the expected one, each as `value (expected v)`."""
    return {k: f"{checks.get(k)} (expected {v})" for k, v in expected.items() if checks.get(k) != v}


def run_result(
    side: str,
    concurrency: int,
    messages: int,
    seconds: float,
    cpu_seconds: float,
    checks: dict[str, Any],
) -> RunResult:
    """A preloaded run of `messages` hops, its checks' failures under checks["failed"]."""
    expected = {"items": messages, "inbox": messages, "outbox": messages, "unsent_after_stop": 0}
    expected.update(sink=messages, input_left=0, connections_left=0)
    checks["failed"] = failed_checks(checks, expected)
    return RunResult(
        side,
        concurrency,
        messages,
        seconds,
        messages / seconds,
        cpu_seconds * 1000 / messages,
        checks,
    )


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    print(f"wrote {path}")


def default_json_path(kind: str) -> Path:
    return RESULTS_DIR / f"{kind}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
