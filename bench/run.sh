#!/usr/bin/env bash
# Benchmark suite for chatroom (owned by bench/): `make bench` / `make bench-quick` call this.
#
#   bench/run.sh [--quick] [suite flags…]
#
# Builds chatroom and the load generator in release mode, and the "before" chatroom: commit
# a74e0fd (the last one before issue 10's one-thread-per-client design), checked out with
# `git worktree add` into target/bench-before/src and built there with a CARGO_TARGET_DIR of its
# own (reused once built). Installs the Node peer's locked dependencies, raises the open-files
# limit to the hard limit (W3 holds 15,500 sockets in the load generator), then runs
# `chatroom-bench suite --before-bin …`, which starts every server it measures on free ports
# (`chatroom`, `chatroom_before`, `chatroom_store`, `chatroom_redis`, `node`), runs the nine
# workloads (W8, the 10-minute soak, once) against them, stops what it started (by pid) and
# writes BENCHMARKS.md and bench/results.json (quick: target/bench-quick/). Both chatroom builds
# run with `--data none` (history in memory), and `chatroom_store` (the current build) with
# `--data DIR` for W1, W2 and W7 (DIR: a fresh directory under $TMPDIR or /tmp per run, removed
# after it). W9 (`chatroom_redis`) starts a redis-server on a free port of 127.0.0.1 for each
# run (no persistence, its own directory there too) and two chatroom processes on it; without
# `redis-server` on the PATH it is left out, and the suite says so. Suite flags: --reps N
# (default 3), --store-reps N (default 7: more memory/store pairs for W1 and W2), --only w1,w3,
# --servers chatroom,chatroom_before,chatroom_store,chatroom_redis,node, --data-root DIR,
# --redis-server PATH, --out-md FILE, --out-json FILE (see bench/src/suite.rs). Exit status: 0 when every target check passes, 1 when one fails
# (after writing both files; the failed checks are listed last), 2 on any other error. Each
# run's output is also in target/bench-logs/<tag>.json.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v node >/dev/null || { echo "bench/run.sh: node (Node.js ≥ 18) is needed for the peer" >&2; exit 1; }
command -v npm >/dev/null || { echo "bench/run.sh: npm is needed to install the peer's ws package" >&2; exit 1; }

# W3 holds 15,000 clients plus 500 refused ones in the load generator, 15,000 in the server.
hard=$(ulimit -Hn)
if [ "$hard" = unlimited ] || [ "$hard" -ge 20000 ]; then ulimit -n 20000; else ulimit -n "$hard"; fi
if [ "$(ulimit -n)" -lt 16500 ]; then
  echo "bench/run.sh: warning: open-file limit $(ulimit -n) is below 16500; W3 will fail" >&2
fi

echo "bench/run.sh: building (release)…" >&2
cargo build --release --quiet -p chatroom -p chatroom-bench

before_rev=a74e0fd
before_dir=target/bench-before
before_bin=$before_dir/target/release/chatroom
if [ ! -x "$before_bin" ]; then
  echo "bench/run.sh: building the before build ($before_rev) in $before_dir…" >&2
  [ -d "$before_dir/src" ] || git worktree add --detach "$before_dir/src" "$before_rev" >/dev/null
  (cd "$before_dir/src" && CARGO_TARGET_DIR="$PWD/../target" cargo build --release --quiet -p chatroom)
fi

echo "bench/run.sh: installing the Node peer (npm ci)…" >&2
(cd bench/peers/node-ws && npm ci --no-audit --no-fund --loglevel=error >/dev/null)

exec target/release/chatroom-bench suite --before-bin "$before_bin" "$@"
