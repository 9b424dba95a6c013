#!/usr/bin/env bash
# Heap per idle chatroom client, by allocation site (owned by bench/; not part of `make bench`).
#
#   bench/massif.sh [CLIENTS]      (default 300; needs valgrind and python3)
#
# Runs target/release/chatroom under valgrind's massif, connects CLIENTS idle clients with
# chatroom-bench, stops the server, and prints the bytes each allocation site holds per client
# at the peak (minus the idle server's first snapshot). Massif counts requested bytes, not RSS:
# compare with the smaps breakdown in BENCHMARKS.md to see malloc's own overhead.
set -euo pipefail
cd "$(dirname "$0")/.."
clients=${1:-300}
command -v valgrind >/dev/null || { echo "bench/massif.sh: needs valgrind" >&2; exit 1; }
cargo build --release --quiet -p chatroom -p chatroom-bench
dir=$(mktemp -d)
valgrind --tool=massif --max-threads=$((2 * clients + 100)) --threshold=0.1 --max-snapshots=60 \
  --massif-out-file="$dir/massif.out" \
  target/release/chatroom --addr 127.0.0.1:0 --ws-addr 127.0.0.1:0 --rate-limit off --log-level warn \
  >"$dir/out.txt" 2>"$dir/err.txt" &
pid=$!
for _ in $(seq 1 100); do grep -q listening "$dir/out.txt" 2>/dev/null && break; sleep 0.2; done
ws=$(sed -n 's/.*ws=\([^ ]*\).*/\1/p' "$dir/out.txt")
[ -n "$ws" ] || { echo "bench/massif.sh: server did not start" >&2; kill -TERM "$pid"; exit 1; }
target/release/chatroom-bench capacity --ws "$ws" --clients "$clients" --extra 0 \
  --checkpoint "$clients" --concurrency 4 | python3 -c 'import json,sys; d=json.load(sys.stdin); print("connected:", d["connected"], "failed:", d["failed"])'
kill -TERM "$pid"
wait "$pid" || true
python3 - "$dir/massif.out" "$clients" <<'PY'
import re, sys
path, clients = sys.argv[1], int(sys.argv[2])
lines = open(path).read().split('\n')
snaps, peak = [], None
for i, l in enumerate(lines):
    if l.startswith('snapshot='):
        n = int(l.split('=')[1])
        j = i + 1
        while not lines[j].startswith('heap_tree='):
            j += 1
        kind = lines[j].split('=')[1]
        if kind != 'empty':
            snaps.append((n, j + 1))
        if kind == 'peak':
            peak = (n, j + 1)
def leaves(start):
    stack, res = [], {}
    for l in lines[start:]:
        m = re.match(r'^( *)n(\d+): (\d+) (.*)$', l)
        if not m:
            break
        depth = len(m.group(1))
        stack = stack[:depth] + [m.group(4)]
        if int(m.group(2)) == 0:
            frames = [re.sub(r'^0x[0-9A-F]+: ', '', s) for s in stack[1:]]
            frames = [f for f in frames if not re.search(r'UnknownInlinedFun|alloc\.rs|raw_vec|vec/mod\.rs|boxed\.rs', f)]
            key = ' <- '.join(f[:70] for f in frames[:6])
            res[key] = res.get(key, 0) + int(m.group(3))
    return res
base, top = leaves(snaps[0][1]), leaves(peak[1])
rows = sorted(((top.get(k, 0) - base.get(k, 0)) / clients, k) for k in set(base) | set(top))
print(f"useful heap per client at the peak: {sum(r[0] for r in rows):.0f} B")
for b, k in reversed(rows):
    if abs(b) >= 40:
        print(f"{b:8.0f} B  {k}")
PY
rm -rf "$dir"
