#!/usr/bin/env bash
# A local demo of several chatroom processes sharing rooms through one Redis (`make cluster`):
# a redis-server on a free port of 127.0.0.1, then two chatroom processes, A with its page on
# 127.0.0.1:5000 (WebSocket 5001) and B on 127.0.0.1:5002 (WebSocket 5003), both with
# `--redis`. Open a room on each page and chat across them. Ctrl-C stops all three, and so does
# any one of them exiting; each is stopped by its PID (SIGTERM, then SIGKILL after 5 s).
#
# Redis runs without persistence (`--save '' --appendonly no`): the demo's history lives as
# long as this redis-server and nothing is written to disk. Every start is a fresh conversation.
set -euo pipefail
cd "$(dirname "$0")/.."

HOST=127.0.0.1
A_HTTP=5000 A_WS=5001 B_HTTP=5002 B_WS=5003
# How long a process may take to listen, and to go once asked to stop.
START_LIMIT_S=30
STOP_LIMIT_S=5

die() { echo "cluster: $*" >&2; exit 1; }

# `wait -n` with PIDs and `-p` (below) need bash 5.1 (Debian 11, Ubuntu 22.04 and later).
if ((BASH_VERSINFO[0] < 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] < 1))); then
  die "needs bash 5.1 or later (this is $BASH_VERSION)"
fi
command -v redis-server >/dev/null 2>&1 \
  || die "redis-server is not installed (Debian/Ubuntu: sudo apt-get install redis-server)"
command -v cargo >/dev/null 2>&1 || die "cargo is not installed (https://rustup.rs)"

# Whether something accepts TCP connections on HOST:$1 (bash's /dev/tcp: no curl or nc needed).
listening() { { exec 3<>"/dev/tcp/$HOST/$1"; } 2>/dev/null || return 1; exec 3<&-; }
# Whether a Redis on HOST:$1 answers PING.
redis_pong() {
  local reply=''
  { exec 3<>"/dev/tcp/$HOST/$1"; } 2>/dev/null || return 1
  printf 'PING\r\n' >&3
  IFS= read -r -t 2 reply <&3 || true
  exec 3<&-
  [[ $reply == +PONG* ]]
}
# Copies stdin to stdout with `$1` before each line, so the three logs can be told apart. It
# ignores Ctrl-C (the terminal sends SIGINT to every process of the group): it ends when its
# process closes its output, so the shutdown's last lines are shown (and never written into a
# closed pipe).
prefix() {
  trap '' INT
  while IFS= read -r line; do printf '%s %s\n' "$1" "$line"; done
}

for port in $A_HTTP $A_WS $B_HTTP $B_WS; do
  if listening "$port"; then
    die "port $port on $HOST is already in use (another chatroom, e.g. make run?); stop it first"
  fi
done

echo "== cargo build --release"
cargo build --release --bin chatroom
bin=target/release/chatroom

# Every process this script started, by name; stopped in reverse order (chatrooms, then Redis).
pids=()
names=()
stop_all() {
  trap - INT TERM EXIT
  local i pid deadline
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    pid=${pids[i]}
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + STOP_LIMIT_S))
    # bash reaps its children as they exit, so `kill -0` fails once one is gone.
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "cluster: ${names[i]} (pid $pid) did not stop within ${STOP_LIMIT_S} s: SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  done
  ((${#pids[@]} == 0)) || echo "== stopped: ${names[*]}"
}
trap 'echo; stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM
trap stop_all EXIT

# Redis: a free port above 20000, found by trying (another program could take a port between
# our look and redis-server's bind, so a redis-server that exits at once is tried again).
redis_port=
for _ in 1 2 3 4 5 6 7 8 9 10; do
  port=$((20000 + RANDOM % 20000))
  listening "$port" && continue
  redis-server --bind "$HOST" --port "$port" --save '' --appendonly no --loglevel warning \
    > >(prefix "[redis]") 2>&1 &
  pid=$!
  for _ in $(seq 50); do
    redis_pong "$port" && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if redis_pong "$port"; then
    pids+=("$pid") names+=("redis-server:$port")
    redis_port=$port
    break
  fi
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
done
[ -n "$redis_port" ] || die "redis-server did not start on any of 10 ports (its log is above)"
redis_url="redis://$HOST:$redis_port"

# Starts chatroom `$1` with its page on port $2 and its WebSocket on port $3.
start_chatroom() {
  local name=$1 http=$2 ws=$3 pid
  "$bin" --addr "$HOST:$http" --ws-addr "$HOST:$ws" --data none --redis "$redis_url" \
    > >(prefix "[$name]") 2>&1 &
  pid=$!
  pids+=("$pid") names+=("chatroom-$name:$http")
  local deadline=$((SECONDS + START_LIMIT_S))
  until listening "$http" && listening "$ws"; do
    kill -0 "$pid" 2>/dev/null || die "chatroom $name exited at start (its log is above)"
    ((SECONDS < deadline)) || die "chatroom $name did not listen on $http and $ws within ${START_LIMIT_S} s"
    sleep 0.1
  done
}
start_chatroom A "$A_HTTP" "$A_WS"
start_chatroom B "$B_HTTP" "$B_WS"

cat <<EOF

== chatroom cluster: two processes sharing rooms through $redis_url
   A: http://$HOST:$A_HTTP/room2
   B: http://$HOST:$B_HTTP/room2
   Open one in each browser tab (or two browsers) and chat across them.
   State: curl -s http://$HOST:$A_HTTP/healthz (and :$B_HTTP). Ctrl-C stops all three.

EOF

# Until Ctrl-C (the trap) or one of the three exiting, whichever comes first.
set +e
wait -n -p gone "${pids[@]}"
status=$?
set -e
for i in "${!pids[@]}"; do
  if [ "${pids[i]}" = "${gone:-}" ]; then
    echo "cluster: ${names[i]} (pid $gone) exited with status $status: stopping the others" >&2
  fi
done
exit 1
