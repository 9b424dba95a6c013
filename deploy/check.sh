#!/usr/bin/env bash
# Checks deploy/chatroom.service with `systemd-analyze verify` (CI runs this when the tool is
# present). The unit is verified as installed, but with ExecStart pointing at the binary built
# here, since /usr/local/bin/chatroom does not exist on a build machine. verify only warns about
# unknown or misspelt options, so any line it prints about the unit counts as a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v systemd-analyze >/dev/null 2>&1; then
  echo "deploy/check.sh: systemd-analyze not found; the unit file was not checked"
  exit 0
fi
# Any build will do: verify only needs ExecStart to name an executable. CI has the debug one.
binary="$PWD/target/debug/chatroom"
[ -x "$binary" ] || cargo build --quiet -p chatroom

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
sed "s#/usr/local/bin/chatroom#$binary#" deploy/chatroom.service > "$work/chatroom.service"
status=0
output="$(systemd-analyze verify "$work/chatroom.service" 2>&1)" || status=$?
if [ "$status" -ne 0 ] || grep -q "chatroom.service" <<<"$output"; then
  echo "deploy/check.sh: systemd-analyze verify found problems in deploy/chatroom.service:"
  echo "$output"
  exit 1
fi
echo "deploy/check.sh: deploy/chatroom.service passes systemd-analyze verify"
