"""txflow's pytest plugin (entry point `pytest11`): the `txflow_harness` fixture.

Loaded by every pytest run in an environment with txflow installed, so it imports nothing
of txflow until a test asks for the fixture.

Where the harness runs comes from the command line or the environment, the command line
first: `--txflow-broker-url` (`TXFLOW_TEST_BROKER_URL`), `--txflow-database-url`
(`TXFLOW_TEST_DATABASE_URL`), `--txflow-broker-isolation` (`TXFLOW_TEST_BROKER_ISOLATION`),
`--txflow-database-isolation` (`TXFLOW_TEST_DATABASE_ISOLATION`) and `--txflow-rabbitmqctl`
(`TXFLOW_TEST_RABBITMQCTL`). Neither URL given: the embedded
broker and SQLite.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from txflow import TxFlow
    from txflow.testing import Harness

try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - the fixture then explains what is missing
    pytest_asyncio = None  # type: ignore[assignment]

# (option, environment variable, Harness argument, help)
_OPTIONS = (
    (
        "--txflow-broker-url",
        "TXFLOW_TEST_BROKER_URL",
        "broker_url",
        "run the txflow_harness fixture's apps on this RabbitMQ (amqp://...), under names of "
        "each run's own",
    ),
    (
        "--txflow-database-url",
        "TXFLOW_TEST_DATABASE_URL",
        "database_url",
        "create the txflow_harness fixture's databases (or schemas) on this PostgreSQL "
        "(postgresql://...)",
    ),
    (
        "--txflow-broker-isolation",
        "TXFLOW_TEST_BROKER_ISOLATION",
        "broker_isolation",
        "on RabbitMQ: 'prefix' (queues and exchange of the run's own, the default) or 'vhost' "
        "(a vhost of its own, made with rabbitmqctl)",
    ),
    (
        "--txflow-database-isolation",
        "TXFLOW_TEST_DATABASE_ISOLATION",
        "database_isolation",
        "on PostgreSQL: 'database' (a database per app, needs CREATEDB; the default) or "
        "'schema' (a schema per app in the URL's database)",
    ),
    (
        "--txflow-rabbitmqctl",
        "TXFLOW_TEST_RABBITMQCTL",
        "rabbitmqctl",
        "the command that creates vhosts, e.g. 'docker exec rabbitmq rabbitmqctl'",
    ),
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("txflow", "txflow test harness")
    for option, env, _argument, help_ in _OPTIONS:
        group.addoption(option, default=None, help=f"{help_} (or ${env})")


@pytest.fixture
def txflow_harness_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The `Harness` arguments the command line or environment chose: servers to run on.

    Empty when none was given (the embedded broker and SQLite). Pass them on to a harness of
    your own with `Harness(*apps, **txflow_harness_options)`, or override the fixture.
    """
    options: dict[str, Any] = {}
    for option, env, argument, _help in _OPTIONS:
        value = request.config.getoption(option) or os.environ.get(env)
        if value:
            options[argument] = value
    return options


@pytest.fixture
def txflow_apps() -> Sequence[TxFlow]:
    """The apps `txflow_harness` runs: override this fixture in your conftest.py."""
    raise pytest.UsageError(
        "the txflow_harness fixture needs your apps: define a `txflow_apps` fixture "
        "returning them, e.g. `return [create_app()]`"
    )


if pytest_asyncio is not None:

    @pytest_asyncio.fixture
    async def txflow_harness(
        txflow_apps: Sequence[TxFlow], txflow_harness_options: dict[str, Any]
    ) -> AsyncIterator[Harness]:
        """A started `Harness` on the apps of the `txflow_apps` fixture, closed after the test.

        On the servers of `txflow_harness_options` if any were given.
        """
        from txflow.testing import Harness

        async with Harness(*txflow_apps, **txflow_harness_options) as harness:
            yield harness

else:  # pragma: no cover

    @pytest.fixture
    def txflow_harness() -> None:
        """Needs pytest-asyncio."""
        raise pytest.UsageError("the txflow_harness fixture needs pytest-asyncio installed")
