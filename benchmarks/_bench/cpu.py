"""CPU time while the clock runs: this process, the whole machine, and each server's processes
(Linux /proc; the machine's and the servers' figures read 0.0 elsewhere)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from _bench.results import RunResult, run_result

R = TypeVar("R", bound=RunResult)

# Process names whose CPU counts as the database's and as the broker's.
SERVICE_PROCESSES = {"postgresql": ("postgres",), "rabbitmq": ("beam.smp", "erl_child_setup")}


def service_cpu_seconds() -> dict[str, dict[int, float]]:
    """CPU seconds used so far by each service's live processes (Linux /proc), by pid.

    Compare two readings with `service_cpu_since`: a process that exits in between takes
    its time with it. The pools are opened before the clock starts, so during a measurement
    only the servers' background workers (autovacuum) come and go.
    """
    totals: dict[str, dict[int, float]] = {service: {} for service in SERVICE_PROCESSES}
    names = {name: service for service, ns in SERVICE_PROCESSES.items() for name in ns}
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # exited meanwhile
        comm = text[text.find("(") + 1 : text.rfind(")")]
        service = names.get(comm)
        if service is not None:
            fields = text[text.rfind(")") + 2 :].split()
            # utime + stime
            totals[service][int(stat.parent.name)] = (int(fields[11]) + int(fields[12])) / tick
    return totals


def service_cpu_since(before: dict[str, dict[int, float]]) -> dict[str, float]:
    """CPU seconds each service used since the reading `before`, by its processes alive now."""
    now = service_cpu_seconds()
    return {
        service: sum(cpu - before[service].get(pid, 0.0) for pid, cpu in pids.items())
        for service, pids in now.items()
    }


def machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot (Linux /proc/stat), 0.0 elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    # Time the hypervisor gave to other machines (steal) is not ours; idle and iowait neither.
    user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


@dataclass
class Clock:
    """Wall time, this process's CPU, the machine's CPU and each service's CPU of one run."""

    wall: float = field(default_factory=time.perf_counter)
    cpu: float = field(default_factory=time.process_time)
    machine: float = field(default_factory=lambda: machine_cpu_seconds())
    services: dict[str, dict[int, float]] = field(default_factory=lambda: service_cpu_seconds())
    spent: dict[str, float] = field(default_factory=dict)

    def stop(self, finished: float) -> None:
        """Take the CPU figures now, for a run whose last hop ended at `finished`."""
        self.spent = {
            "seconds": finished - self.wall,
            "cpu": time.process_time() - self.cpu,
            "machine": machine_cpu_seconds() - self.machine,
            **service_cpu_since(self.services),
        }

    def result(
        self, side: str, concurrency: int, messages: int, checks: dict[str, Any]
    ) -> RunResult:
        """The `RunResult` of `messages` hops measured between start and `stop`."""
        spent = self.spent
        result = run_result(side, concurrency, messages, spent["seconds"], spent["cpu"], checks)
        return self.per_hop(result)

    def per_hop(self, result: R) -> R:
        """`result` with the machine's and each service's CPU per hop of its `messages`."""
        spent, messages = self.spent, result.messages
        result.machine_cpu_ms_per_hop = spent["machine"] * 1000 / messages
        result.service_cpu_ms_per_hop = {
            name: spent[name] * 1000 / messages for name in SERVICE_PROCESSES
        }
        return result
