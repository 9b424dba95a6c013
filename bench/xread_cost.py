#!/usr/bin/env python3
"""What one follower XREAD costs Redis as the rooms a process serves grow (bench/NOTES.md).

Starts a throwaway redis-server on a free port of 127.0.0.1 (no persistence), and for N rooms
issues the follower's read: XREAD over N log streams and N presence streams, with one new entry
in one log each time, as when one message wakes a follower. Prints the round trip seen here and
Redis' own CPU per XREAD (INFO commandstats). Stops the server by its pid.

    python3 bench/xread_cost.py [redis-server]
"""
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOMS = [20, 200, 1000, 5000]
CALLS = 300


def encode(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def read(f):
    line = f.readline()
    kind, rest = line[:1], line[1:]
    if kind in b"+-:":
        return line
    if kind == b"$":
        n = int(rest)
        return None if n < 0 else f.read(n + 2)[:-2]
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [read(f) for _ in range(n)]
    raise RuntimeError(f"unexpected reply {line!r}")


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else "redis-server"
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    data = tempfile.mkdtemp(prefix="xread-cost-")
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", data]
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                conn = socket.create_connection(("127.0.0.1", port))
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError("redis-server did not answer within 10 s")
        f = conn.makefile("rb")

        def cmd(*a):
            conn.sendall(encode(*a))
            return read(f)

        for n in ROOMS:
            logs = [f"chatroom:{{r{i}}}:log" for i in range(n)]
            presence = [f"chatroom:{{r{i}}}:presence" for i in range(n)]
            for k in logs:
                cmd("XADD", k, "1-0", "m", "x")
            cmd("CONFIG", "RESETSTAT")
            t = time.perf_counter()
            for j in range(CALLS):
                cmd("XADD", logs[0], f"{j + 2}-0", "m", "x")
                ids = [f"{j + 1}-0"] + ["1-0"] * (n - 1) + ["0-0"] * n
                cmd("XREAD", "COUNT", 64, "STREAMS", *logs, *presence, *ids)
            round_trip = (time.perf_counter() - t) / CALLS * 1e6
            stats = cmd("INFO", "commandstats").decode().split("\r\n")
            xread = next(l for l in stats if l.startswith("cmdstat_xread:"))
            per_call = float(xread.split("usec_per_call=")[1].split(",")[0])
            print(f"{n:5} rooms: Redis {per_call:7.1f} µs per XREAD; round trip here {round_trip:7.0f} µs")
            cmd("DEL", *logs)
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
