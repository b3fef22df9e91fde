#!/usr/bin/env bash
# The order/inventory example end to end. With no arguments: SQLite + the in-memory broker.
# With --broker amqp://... --database postgresql://... it runs the services as `txflow run`
# processes on RabbitMQ and PostgreSQL. See examples/order_inventory/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python -m examples.order_inventory.demo "$@"
