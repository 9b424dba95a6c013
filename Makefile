# The commands a developer and CI use; `.ci/run` calls `lint` then `test`, one to one.
.PHONY: run cluster test unit e2e lint fmt bench bench-quick

# Start the server on 127.0.0.1:5000 (page) and 127.0.0.1:5001 (WebSocket).
run:
	cargo run --release --bin chatroom --

# A local demo of two processes sharing rooms through Redis: a redis-server on a free port, pages
# on 127.0.0.1:5000 and 127.0.0.1:5002 (needs redis-server). Ctrl-C stops all three.
cluster:
	bash deploy/cluster.sh

# Everything: unit and integration tests, then the real-browser tests (skipped, loudly,
# when Chromium or Node is missing; CI installs them and requires them).
test: unit e2e

# The shutdown test holds 10,000 sockets: raise the soft open-files limit to the hard one.
unit:
	ulimit -n "$$(ulimit -Hn)" 2>/dev/null || true; cargo test -p chatroom
	cargo test -p chatroom-bench

e2e:
	bash tests/e2e/run.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

bench:
	bash bench/run.sh

bench-quick:
	bash bench/run.sh --quick
