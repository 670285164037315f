#!/usr/bin/env bash
# Fetch the Apache Kafka broker jars (deploy/kafka/pom.xml) into the cache used
# by tests/brokers.py (ApacheKafka.ensure_jars), once.
#
#   bash .ci/kafka-jars.sh [CACHE_DIR]
#
# CACHE_DIR defaults to $WORKER_KAFKA_JARS, else ~/.cache/worker-tests/kafka-jars.
# Idempotent: when the cache holds the jars of the current pom (sha256 stamp in
# CACHE_DIR/.pom.sha256, same convention as ensure_jars) it returns at once
# without starting Maven. Prints the cache dir on stdout.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pom="$repo/deploy/kafka/pom.xml"
cache="${1:-${WORKER_KAFKA_JARS:-$HOME/.cache/worker-tests/kafka-jars}}"
digest="$(sha256sum "$pom" | cut -d' ' -f1)"

is_ready() {
  [[ -f "$cache/.pom.sha256" ]] &&
    [[ "$(tr -d '[:space:]' < "$cache/.pom.sha256")" == "$digest" ]] &&
    compgen -G "$cache/kafka_2.13-*.jar" > /dev/null
}

if is_ready; then
  echo "$cache"
  exit 0
fi

command -v mvn > /dev/null || { echo "kafka-jars: mvn not found on PATH" >&2; exit 1; }
command -v java > /dev/null || { echo "kafka-jars: java not found on PATH" >&2; exit 1; }

parent="$(dirname "$cache")"
mkdir -p "$parent"
# Same lock file as ensure_jars, so a concurrent test run waits for us.
exec 9> "$parent/.$(basename "$cache").lock"
flock -w 900 9 || { echo "kafka-jars: could not lock $parent" >&2; exit 1; }
if is_ready; then
  echo "$cache"
  exit 0
fi

tmp="$(mktemp -d "$parent/.$(basename "$cache").XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
start=$SECONDS
# Retry once: a registry hiccup should not fail CI outright.
for attempt in 1 2; do
  if timeout 600 mvn -B -q -Dstyle.color=never -f "$pom" dependency:copy-dependencies \
       -DoutputDirectory="$tmp" < /dev/null >&2; then
    break
  fi
  if [[ $attempt == 2 ]]; then
    echo "kafka-jars: mvn dependency:copy-dependencies failed" >&2
    exit 1
  fi
  echo "kafka-jars: mvn failed, retrying" >&2
  sleep 5
done
compgen -G "$tmp/kafka_2.13-*.jar" > /dev/null || { echo "kafka-jars: no kafka_2.13 jar fetched" >&2; exit 1; }
echo "$digest" > "$tmp/.pom.sha256"
rm -rf "$cache"
mv "$tmp" "$cache"
trap - EXIT
echo "kafka-jars: fetched $(ls "$cache"/*.jar | wc -l) jars into $cache in $((SECONDS - start))s" >&2
echo "$cache"
