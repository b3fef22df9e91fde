"""Reading `/metrics` in tests: scrape, and sum the samples of one metric."""

from __future__ import annotations

import asyncio
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        return str(response.read().decode())


async def scrape(port: int, host: str = "127.0.0.1") -> Samples:
    """Every sample of `http://host:port/metrics`, by (sample name, labels)."""
    text = await asyncio.to_thread(_fetch, f"http://{host}:{port}/metrics")
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = float(sample.value)
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def values(samples: Samples, name: str, **labels: str) -> dict[frozenset[tuple[str, str]], float]:
    """`name`'s samples whose labels include `labels`, by their labels."""
    wanted = set(labels.items())
    return {ls: v for (n, ls), v in samples.items() if n == name and wanted <= ls}
