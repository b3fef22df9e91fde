"""txflow's pytest plugin (entry point `pytest11`): the `txflow_harness` fixture.

Loaded by every pytest run in an environment with txflow installed, so it imports nothing
of txflow until a test asks for the fixture.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from txflow import TxFlow
    from txflow.testing import Harness

try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - the fixture then explains what is missing
    pytest_asyncio = None  # type: ignore[assignment]


@pytest.fixture
def txflow_apps() -> Sequence[TxFlow]:
    """The apps `txflow_harness` runs: override this fixture in your conftest.py."""
    raise pytest.UsageError(
        "the txflow_harness fixture needs your apps: define a `txflow_apps` fixture "
        "returning them, e.g. `return [create_app()]`"
    )


if pytest_asyncio is not None:

    @pytest_asyncio.fixture
    async def txflow_harness(txflow_apps: Sequence[TxFlow]) -> AsyncIterator[Harness]:
        """A started `Harness` on the apps of the `txflow_apps` fixture, closed after the test."""
        from txflow.testing import Harness

        async with Harness(*txflow_apps) as harness:
            yield harness

else:  # pragma: no cover

    @pytest.fixture
    def txflow_harness() -> None:
        """Needs pytest-asyncio."""
        raise pytest.UsageError("the txflow_harness fixture needs pytest-asyncio installed")
