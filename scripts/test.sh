#!/usr/bin/env bash
# The test command: virtualenv, services, chromium (for tests/console/), pgbouncer (for
# tests/test_pooler.py), lint, types, the docs site, then the whole suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k outbox
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
scripts/services.sh
scripts/browser.sh
scripts/pgbouncer.sh
.venv/bin/ruff check src tests examples benchmarks
.venv/bin/ruff format --check src tests examples benchmarks
.venv/bin/mypy
# Architecture: layers, which package may import aio-pika or asyncpg, no cycles (pyproject.toml).
.venv/bin/lint-imports
# The docs site: a broken link or anchor, or an API reference entry naming nothing, fails.
# (NO_MKDOCS_2_WARNING silences mkdocs-material's banner about a future MkDocs 2. Not --quiet:
# it hides the link warnings from --strict, which then passes.)
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict
exec .venv/bin/pytest "$@"
