//! Integration tests for chatroom: real servers in this process on `127.0.0.1:0`, real
//! WebSocket and HTTP clients, synchronised on protocol events rather than sleeps.
//!
//! One test crate (matklad's "one integration-test crate") so everything compiles once:
//! - `support`: server start-up, `TestClient`, raw frames, a hand-written HTTP client;
//! - `http`: routes, assets, headers, 404/405/HEAD, `/healthz`, idle HTTP connections;
//! - `ws_protocol`: one connection against PROTOCOL.md, bad input and frame-level rules;
//! - `rooms`: isolation, joined/left, names, sessions, history, ordering across clients;
//! - `limits`: rate limit, Origin, connection cap, slow consumer;
//! - `lifecycle`: disconnects, heartbeat, thread accounting, shutdown;
//! - `failures`: a service thread that dies is reported, `/healthz` 503, no room left waiting;
//! - `write_path`: one thread per client: backlog writers, frame order, 10,000 clients shut down;
//! - `store`: history on disk: restarts, a kill, retention, start-up errors, a locked
//!   database, `/healthz`'s store report, backup, room names as data;
//! - `addresses`: per-address connection cap and handshake rate, `--trust-proxy`;
//! - `http_hardening`: the HTTP side under fd exhaustion, slow readers, `/metrics`;
//! - `budgets`: history memory and disk within their byte budgets;
//! - `history`: pages of older history (memory, store, limits), `cid` resends answered once;
//! - `fuzz`: random and mutated frames for the decoder and the reader (proptest);
//! - `history`: pages of older history (memory, store, limits), `cid` resends answered once;
//! - `redis_support`: a real redis-server on a free port (skipped loudly when missing, required
//!   with `CHATROOM_REQUIRE_REDIS=1`), restarted on the same port; a server sharing rooms via it;
//! - `redis_bus`: the Redis bus against a real redis-server: ids in order from concurrent
//!   appenders, append tokens, epochs, reads, the follower's wake-ups, keys, connect errors;
//! - `cluster`: several servers sharing rooms through one real redis-server (`--redis`): one
//!   order, presence, names and sessions, resume and pages across servers, a server stopped or
//!   killed, Redis restarted with and without its data, key prefixes, start-up errors;
//! - `redis_tls`: `--redis rediss://…` to a real redis-server over TLS; certificates refused;
//! - `tidy`: house rules on the files themselves: no HTML sinks in static/, HTML that needs
//!   no exception to the CSP, `//!` atop every Rust file, no `dbg!`.

mod addresses;
mod budgets;
mod cluster;
mod failures;
mod fuzz;
mod history;
mod http;
mod http_hardening;
mod lifecycle;
mod limits;
mod redis_bus;
mod redis_support;
mod redis_tls;
mod rooms;
mod store;
mod support;
mod tidy;
mod write_path;
mod ws_protocol;
