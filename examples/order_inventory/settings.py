"""Where a service connects, read from the environment when its module is imported.

So `txflow run examples.order_inventory.inventory:app` works without code changes, and each
service gets its own database:

- `ORDERS_DATABASE_URL`, `INVENTORY_DATABASE_URL`, `PAYMENT_DATABASE_URL`: the service's
  database; unset falls back to txflow's `TXFLOW_DATABASE_URL`, then `sqlite:///txflow-<name>.db`
  (the CLI's `--database` overrides all of them);
- `ORDERS_LISTEN_URL`, `INVENTORY_LISTEN_URL`, `PAYMENT_LISTEN_URL`: a direct connection to the
  service's database for its relay's LISTEN, when the database URL goes through a
  transaction pooler (`?pool_mode=transaction`); unset falls back to `TXFLOW_LISTEN_URL`;
- `TXFLOW_QUEUE_PREFIX`: prepended to every queue name, so runs on one broker do not share
  queues;
- `TXFLOW_CONCURRENCY`: messages each handler works on at once (its prefetch). Each one holds
  a database connection, so processes x handlers x concurrency must fit PostgreSQL's
  `max_connections`;
- `TXFLOW_BATCH`: above 1, every handler (and the flow's tracker) handles up to that many of
  its waiting deliveries in one transaction (`TxFlow(batch=...)`, group commit); at most
  its concurrency. The fault scenarios run with it set to show the guarantees hold batched;
- `TXFLOW_STATS_INTERVAL`: seconds between the workers' log lines of running counters;
- `TXFLOW_QUORUM_QUEUES`: `1` to declare quorum queues (replicated across a RabbitMQ
  cluster) instead of classic ones;
- `TXFLOW_EXCHANGE`: the events exchange. Queues are bound to the exchange by event type, so a
  prefix alone does not isolate two runs: both would receive each other's events. Give each
  isolated environment its own exchange too (or its own RabbitMQ vhost);
- `EXAMPLE_SPANS_DIR`: where the traced services (`examples.order_inventory.traced:<service>`)
  write their spans, one JSON-lines file per process.
"""

from __future__ import annotations

import os
from typing import Any

from txflow import RetryPolicy

QUEUE_PREFIX_ENV = "TXFLOW_QUEUE_PREFIX"
EXCHANGE_ENV = "TXFLOW_EXCHANGE"
CONCURRENCY_ENV = "TXFLOW_CONCURRENCY"
BATCH_ENV = "TXFLOW_BATCH"
STATS_INTERVAL_ENV = "TXFLOW_STATS_INTERVAL"
QUORUM_QUEUES_ENV = "TXFLOW_QUORUM_QUEUES"
SPANS_DIR_ENV = "EXAMPLE_SPANS_DIR"

# The handlers are deterministic, so what fails an attempt is the infrastructure (a database
# restart, a full connection pool): worth a few tries spread over several seconds.
RETRY = RetryPolicy.exponential(5, base=0.5, cap=4.0)


def database_url_env(service: str) -> str:
    """The name of the variable holding `service`'s database URL, e.g. `ORDERS_DATABASE_URL`."""
    return f"{service.upper()}_DATABASE_URL"


def listen_url_env(service: str) -> str:
    """The name of the variable holding `service`'s LISTEN URL, e.g. `ORDERS_LISTEN_URL`."""
    return f"{service.upper()}_LISTEN_URL"


def service_options(service: str, **overrides: Any) -> dict[str, Any]:
    """`TxFlow(...)` keyword arguments for `service` from the environment, then `overrides`."""
    options: dict[str, Any] = {
        "database_url": os.environ.get(database_url_env(service)),
        "listen_url": os.environ.get(listen_url_env(service)),
        "queue_prefix": os.environ.get(QUEUE_PREFIX_ENV, ""),
        "retry": RETRY,
    }
    concurrency = os.environ.get(CONCURRENCY_ENV)
    if concurrency:
        options["concurrency"] = int(concurrency)
    batch = os.environ.get(BATCH_ENV)
    if batch:
        options["batch"] = int(batch)
    exchange = os.environ.get(EXCHANGE_ENV)
    if exchange:
        options["exchange"] = exchange
    if os.environ.get(QUORUM_QUEUES_ENV) == "1":
        options["quorum_queues"] = True
    stats_interval = os.environ.get(STATS_INTERVAL_ENV)
    if stats_interval:
        options["stats_interval"] = float(stats_interval)
    options.update(overrides)
    return options
