#!/usr/bin/env bash
# Make sure PostgreSQL and RabbitMQ are up on this machine, starting whichever is stopped.
set -euo pipefail

wait_for() { # name, seconds, command...
  local name=$1 seconds=$2; shift 2
  for _ in $(seq "$seconds"); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  echo "services: $name did not come up within ${seconds}s" >&2
  return 1
}

if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  echo "services: starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  wait_for PostgreSQL 60 pg_isready -q -h 127.0.0.1 -p 5432
fi

if ! rabbitmqctl -q status >/dev/null 2>&1; then
  echo "services: starting RabbitMQ"
  rabbitmq-server -detached || true
  sleep 2
fi
# await_startup also covers an app stopped with `rabbitmqctl stop_app`.
if ! rabbitmqctl -q await_startup --timeout 120 >/dev/null 2>&1; then
  rabbitmqctl -q start_app >/dev/null 2>&1 || true
  wait_for RabbitMQ 120 rabbitmqctl -q await_startup --timeout 5
fi
