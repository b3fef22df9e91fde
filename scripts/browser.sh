#!/usr/bin/env bash
# Make sure Debian's chromium is installed for the console's browser tests (tests/console/).
# Idempotent and quick when it is there. Playwright drives /usr/bin/chromium; never
# `playwright install`, which downloads a browser build of its own.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
echo "browser: installing chromium"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium >/dev/null
/usr/bin/chromium --version
