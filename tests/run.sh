#!/usr/bin/env bash
# Set up everything the tests need on a fresh machine, then run them.
#
#   ./tests/run.sh [pytest args...]
#
# Idempotent: installs the package with its test extras, fetches the Apache Kafka jars
# (Maven Central, cached), installs promtool for the deployment checks when apt is
# available, then runs pytest. Brokers are started by the test suite itself on free
# loopback ports and stopped when it ends. With CI=true a missing broker fails the run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "== installing the worker and its test dependencies"
python3 -m pip install -q --disable-pip-version-check -e ".[test,bench]"

echo "== fetching the Apache Kafka broker jars"
bash .ci/kafka-jars.sh >/dev/null

if ! command -v promtool >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "== installing promtool (Debian's prometheus package)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null) \
    || echo "warning: could not install prometheus (promtool); deployment checks will say so"
  # the package starts a server we do not need
  (command -v systemctl >/dev/null && systemctl stop prometheus 2>/dev/null) || true
fi

echo "== running the tests"
set +e
python3 -m pytest "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "pytest collected no tests" >&2
fi
exit "$rc"
