#!/usr/bin/env bash
# Real-browser end-to-end tests: builds the server, then runs tests/e2e/*.test.mjs in headless Chromium.
# Without Chromium or Node this prints a loud banner and exits 0, unless E2E_REQUIRED=1 (then 1).
# Without redis-server the cluster test (cluster.test.mjs) is left out with a loud banner, unless
# CHATROOM_REQUIRE_REDIS=1 (then 1), as the Rust tests of the Redis bus do.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
chromium="${CHROMIUM:-/usr/bin/chromium}"

skip() {
  echo "==================================================================="
  echo "E2E SKIPPED: $1"
  echo "  (install with: apt-get install -y chromium nodejs npm)"
  echo "==================================================================="
  if [ "${E2E_REQUIRED:-0}" = "1" ]; then echo "E2E_REQUIRED=1, so this is a failure."; exit 1; fi
  exit 0
}
[ -x "$chromium" ] || skip "$chromium not found"
command -v node >/dev/null 2>&1 || skip "node not found"
command -v npm >/dev/null 2>&1 || skip "npm not found"

tests=(chat.test.mjs features.test.mjs limits.test.mjs restart.test.mjs history.test.mjs)
if command -v redis-server >/dev/null 2>&1; then
  tests+=(cluster.test.mjs)
else
  echo "==================================================================="
  echo "E2E CLUSTER TEST SKIPPED: redis-server not found, so several processes"
  echo "sharing rooms through Redis are NOT tested in the browser"
  echo "  (install with: apt-get install -y redis-server)"
  echo "==================================================================="
  if [ "${CHATROOM_REQUIRE_REDIS:-0}" = "1" ]; then echo "CHATROOM_REQUIRE_REDIS=1, so this is a failure."; exit 1; fi
fi

cd "$here"
if [ ! -d node_modules/playwright-core ]; then
  npm ci --no-audit --no-fund
fi
(cd "$root" && cargo build)
export CHATROOM_BIN="${CHATROOM_BIN:-$root/target/debug/chatroom}"
export CHROMIUM="$chromium"
exec node --test --test-concurrency=1 --test-timeout=120000 "${tests[@]}" "$@"
