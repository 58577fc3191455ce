#!/usr/bin/env bash
# Run the test suite: `scripts/test.sh` (everything) or `scripts/test.sh --unit` (no services).
# Extra arguments go to pytest.
#
# For the full suite, Kafka and Redis come from CRM_EVENTS_TEST_KAFKA and
# CRM_EVENTS_TEST_REDIS_URL when set; otherwise this script starts the stack's own kafka and
# redis parts (crm-events-stack, default ports) and exports those variables. Parts it started
# are stopped again at the end; parts that were already running are left alone. The tests
# start their own ingest, edge and nginx processes.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BIN="$ROOT/.venv/bin"
STACK="$BIN/crm-events-stack"

say() { printf '[test] %s\n' "$*"; }

# pytest exits 5 when it collected nothing; report it as a failure with a clear reason.
run_pytest() {
    local rc=0
    "$BIN/pytest" "$@" || rc=$?
    if ((rc == 5)); then
        say "pytest collected no tests"
    fi
    return "$rc"
}

if [[ ${1:-} == --unit ]]; then
    shift
    run_pytest tests/unit "$@"
    exit
fi

started=()
stop_started() {
    if ((${#started[@]})); then
        say "stopping what this run started: ${started[*]}"
        "$STACK" stop "${started[@]}" || true
    fi
}
trap stop_started EXIT

# Ports come from the CRM_EVENTS_* settings the stack itself reads.
stack_vars=$("$BIN/python" - <<'PY'
import os
import shlex
import sys

from devtools.stack import SettingsError, StackSettings

try:
    s = StackSettings.from_env(os.environ)
except SettingsError as exc:
    sys.exit(f"[test] error: {exc}")
print(
    f"stack_kafka={shlex.quote(s.kafka_bootstrap)} stack_redis={shlex.quote(s.redis_url)} "
    f"stack_mode={shlex.quote(s.redis_mode)}"
)
PY
)
eval "$stack_vars"

# The suites take one plain Redis and start their own Sentinel groups and Redis Clusters.
if [[ -z ${CRM_EVENTS_TEST_REDIS_URL:-} && $stack_mode != single ]]; then
    say "error: the stack runs Redis in $stack_mode mode, and the tests need a single Redis"
    say "(they start their own Sentinels and Clusters): run 'make down' first, or point"
    say "CRM_EVENTS_TEST_REDIS_URL at a single Redis"
    exit 2
fi

need=()
[[ -n ${CRM_EVENTS_TEST_KAFKA:-} ]] || need+=(kafka)
[[ -n ${CRM_EVENTS_TEST_REDIS_URL:-} ]] || need+=(redis)
for part in "${need[@]}"; do
    if ! "$STACK" status "$part" >/dev/null; then
        started+=("$part")
    fi
done
if ((${#need[@]})); then
    say "starting ${need[*]} (already running ones are reused)"
    "$STACK" start "${need[@]}"
fi
export CRM_EVENTS_TEST_KAFKA="${CRM_EVENTS_TEST_KAFKA:-$stack_kafka}"
export CRM_EVENTS_TEST_REDIS_URL="${CRM_EVENTS_TEST_REDIS_URL:-$stack_redis}"
say "Kafka $CRM_EVENTS_TEST_KAFKA, Redis $CRM_EVENTS_TEST_REDIS_URL"

run_pytest "$@"
