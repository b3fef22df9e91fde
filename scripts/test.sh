#!/usr/bin/env bash
# The test command: virtualenv, services, lint, types, then the whole suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k outbox
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
scripts/services.sh
.venv/bin/ruff check src tests examples benchmarks
.venv/bin/ruff format --check src tests examples benchmarks
.venv/bin/mypy
exec .venv/bin/pytest "$@"
