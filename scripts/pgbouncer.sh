#!/usr/bin/env bash
# Make sure Debian's pgbouncer is installed for the pooler tests (tests/test_pooler.py).
# Idempotent and quick when it is there. Only the binary is used: the tests start their own
# pgbouncer on a free port with a config of their own, never the package's service.
set -euo pipefail
if [ -x /usr/sbin/pgbouncer ]; then
  exit 0
fi
echo "pgbouncer: installing pgbouncer"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# The package starts its own service on 6432 where services may start; the tests never use it.
apt-get install -y -qq pgbouncer >/dev/null
/usr/sbin/pgbouncer --version
