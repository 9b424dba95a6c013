#!/usr/bin/env bash
# Benchmark suite for chatroom (owned by bench/): `make bench` / `make bench-quick` call this.
#
#   bench/run.sh [--quick] [suite flags…]
#
# Builds chatroom and the load generator in release mode, installs the Node peer's locked
# dependencies, then runs `chatroom-bench suite`, which starts every server it measures on free
# ports, runs the seven workloads against each, stops what it started (by pid) and writes
# BENCHMARKS.md and bench/results.json. chatroom runs with `--data none` (history in memory), and
# for W1, W2 and W7 also with `--data DIR` (the SQLite store; DIR is a fresh directory under
# $TMPDIR or /tmp per run, removed after it). Suite flags: --reps N (default 3), --store-reps N
# (default 7: more memory/store pairs for W1 and W2), --only w1,w3,
# --servers chatroom,chatroom_store,node, --data-root DIR, --out-md FILE, --out-json FILE
# (see bench/src/suite.rs). Exit status: 0 when every target check passes, 1 when one fails (after
# writing both files; the failed checks are listed last), 2 on any other error. Each run's
# figures are also in target/bench-logs/<tag>.json.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v node >/dev/null || { echo "bench/run.sh: node (Node.js ≥ 18) is needed for the peer" >&2; exit 1; }
command -v npm >/dev/null || { echo "bench/run.sh: npm is needed to install the peer's ws package" >&2; exit 1; }

# The capacity workload holds 7,500 sockets in the load generator and 7,000 in the server.
hard=$(ulimit -Hn)
if [ "$hard" = unlimited ] || [ "$hard" -ge 20000 ]; then ulimit -n 20000; else ulimit -n "$hard"; fi
if [ "$(ulimit -n)" -lt 16000 ]; then
  echo "bench/run.sh: warning: open-file limit $(ulimit -n) is below 16000; the capacity workload will fail" >&2
fi

echo "bench/run.sh: building (release)…" >&2
cargo build --release --quiet -p chatroom -p chatroom-bench

echo "bench/run.sh: installing the Node peer (npm ci)…" >&2
(cd bench/peers/node-ws && npm ci --no-audit --no-fund --loglevel=error >/dev/null)

exec target/release/chatroom-bench suite "$@"
