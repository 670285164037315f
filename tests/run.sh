#!/usr/bin/env bash
# Set up everything the tests need on a fresh machine, then run them.
#
#   ./tests/run.sh [pytest args...]
#
# Idempotent: installs the package with its test extras, fetches the Apache Kafka jars
# (Maven Central, cached), installs promtool for the deployment checks and rabbitmq-server
# for the RabbitMQ tests when apt is available (no system service is left running), then
# runs pytest. Brokers are started by the test suite itself on free loopback ports and
# stopped when it ends. With CI=true a missing broker fails the run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "== installing the worker and its test dependencies"
python3 -m pip install -q --disable-pip-version-check -e ".[test,bench]"

echo "== fetching the Apache Kafka broker jars"
bash .ci/kafka-jars.sh >/dev/null

# Debian packages: promtool (prometheus) for the deployment checks, rabbitmq-server (and the
# Erlang it pulls in) for the RabbitMQ tests. One `apt-get update` for both; nothing when present.
apt_pkgs=()
command -v promtool >/dev/null 2>&1 || apt_pkgs+=(prometheus)
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || [ -n "${RABBITMQ_HOME:-}" ] || apt_pkgs+=(rabbitmq-server)
if [ "${#apt_pkgs[@]}" -gt 0 ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "== installing ${apt_pkgs[*]} (Debian packages)"
  # The packages' postinst would start system services (a prometheus server, a rabbitmq node
  # and epmd on their default ports); the tests start their own on free ports. A policy-rc.d
  # that denies every init-script action keeps them from starting; ours is removed afterwards.
  own_policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\n# tests/run.sh: no service starts during its apt-get install\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    own_policy=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_pkgs[@]}" >/dev/null) \
    || echo "warning: could not install ${apt_pkgs[*]}; the tests that need them will say so"
  if [ -n "$own_policy" ]; then
    rm -f /usr/sbin/policy-rc.d
    trap - EXIT
  fi
  # Should a service have started anyway (a machine with systemd), stop it.
  if command -v systemctl >/dev/null 2>&1; then
    systemctl stop prometheus rabbitmq-server 2>/dev/null || true
  fi
  if [ -x /etc/init.d/rabbitmq-server ] && [ -e /var/run/rabbitmq/pid ]; then
    timeout 60 /etc/init.d/rabbitmq-server stop >/dev/null 2>&1 || true
  fi
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
