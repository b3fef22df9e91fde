"""Summaries of repeated measurements: median [min-max], percentiles, per-repeat ratios."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def summary(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def fmt(summary: dict[str, float], digits: int = 0, suffix: str = "") -> str:
    """`median [min-max]`, e.g. `1.02x [0.98-1.10]`."""
    f = f"{{:.{digits}f}}"
    mid, lo, hi = (f.format(summary[k]) for k in ("median", "min", "max"))
    return f"{mid}{suffix} [{lo}-{hi}]"


def cell(values: Sequence[float], digits: int = 0, suffix: str = "") -> str:
    """A table cell: `fmt` of the values' summary, or `-` when there are none."""
    return fmt(summary(values), digits, suffix) if values else "-"


def ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Side over side, per repeat: the sides ran back to back, so their ratio cancels slow
    drift of the machine."""
    return [a / b for a, b in zip(numerator, denominator, strict=False) if b]


def p50_p99(values: Sequence[float]) -> tuple[float, float]:
    """The 50th and 99th percentiles (inclusive method: they lie within the samples)."""
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[49], cuts[98]
