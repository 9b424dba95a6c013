//! The HTTP side: tiny_http serves the page, its assets, `/healthz` and `/metrics` from memory.
//!
//! [`run_http`] is one thread, the dispatcher, that never writes to a socket: it takes each
//! request from tiny_http and hands it to the responder of the request's connection (keyed by
//! the peer address), a thread that writes the answer and ends once its connection has nothing
//! queued. A client that does not read blocks only its own responder; when its queue is full,
//! or a write to it failed (the listener's `SO_SNDTIMEO`, inherited by accepted sockets, ends a
//! write that cannot progress for `http_idle_timeout`), its further requests are dropped
//! unanswered and tiny_http closes the connection once it idles. Responders are bounded
//! ([`MAX_RESPONDERS`]), and so is each one's queue ([`QUEUE_PER_CONNECTION`]).
//!
//! The dispatcher also supervises tiny_http, whose accept thread ends for good on its first
//! accept error: when `recv()` reports that error, a new `tiny_http::Server` is built on a clone
//! of the same listener, and the old one is handed to a drain thread that dispatches its
//! remaining requests. The accept thread can also die without a word (at the fd limit it
//! panics on an `unwrap` of `try_clone` in tiny_http 0.12): [`AcceptWatch`] notices that from
//! the listener's accept queue and the server is rebuilt the same way.
//!
//! Idle connections: the listener carries `SO_RCVTIMEO`/`SO_SNDTIMEO`, which Linux copies to
//! every accepted socket, so tiny_http's per-connection thread gives up on a client that sends
//! nothing for `http_idle_timeout` (idle keep-alive, slow headers). The same timeout also ends a
//! quiet `accept()`, which is just one more accept error: the supervisor rebuilds and goes on.
//!
//! Four files: this one (the HTTP thread: dispatch and supervision), `responders.rs` (one
//! thread per connection being answered), `accept_watch.rs` (noticing a dead accept thread) and
//! `routes.rs` (what each path answers: page, assets, `/healthz`, `/metrics`).

use std::io;
use std::net::TcpListener;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::{debug, error, warn};

use crate::shared::{LiveServers, Shared};

mod accept_watch;
mod responders;
mod routes;

use accept_watch::AcceptWatch;
use responders::Responders;
pub use responders::{MAX_RESPONDERS, QUEUE_PER_CONNECTION};

/// Pause after a real accept error (e.g. out of file descriptors) before rebuilding.
const REBUILD_BACKOFF: Duration = Duration::from_millis(100);
const DRAIN_STACK_BYTES: usize = 256 * 1024;
/// The dispatcher wakes at least this often, to end idle responders and look at the accept
/// queue even when no request comes.
const TICK: Duration = Duration::from_millis(250);
/// Gives the listener the idle timeout that accepted sockets inherit.
pub fn set_idle_timeout(listener: &TcpListener, timeout: Duration) -> io::Result<()> {
    let socket = socket2::SockRef::from(listener);
    socket.set_read_timeout(Some(timeout))?;
    socket.set_write_timeout(Some(timeout))
}

/// The HTTP thread: dispatch requests, rebuild tiny_http after each accept error or death,
/// until stopping.
pub fn run_http(listener: TcpListener, shared: Arc<Shared>) {
    let responders = Arc::new(Mutex::new(Responders::new(Arc::clone(&shared))));
    let mut watch = AcceptWatch::new(&listener);
    let mut drains: Vec<JoinHandle<()>> = Vec::new();
    while !shared.stopping.load(Ordering::Acquire) {
        let Some(server) = build_server(&listener) else {
            thread::sleep(REBUILD_BACKOFF);
            continue;
        };
        lock(&shared.http_servers).push(Arc::clone(&server));
        if shared.stopping.load(Ordering::Acquire) {
            break;
        }
        let ended = serve(&server, &shared, &responders, &mut watch);
        if shared.stopping.load(Ordering::Acquire) {
            break;
        }
        match ended {
            // A quiet `accept()` timing out is the listener's idle timeout, not a failure.
            Ended::AcceptError(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                debug!("http accept idle; rebuilding tiny_http");
            }
            Ended::AcceptError(err) => {
                warn!("http accept failed: {err}; rebuilding tiny_http");
                shared.metrics.http_rebuilds.fetch_add(1, Ordering::Relaxed);
                thread::sleep(REBUILD_BACKOFF);
            }
            Ended::AcceptDied(queued) => {
                warn!(
                    "http accept thread is gone ({queued} connections wait unaccepted); \
                     rebuilding tiny_http"
                );
                shared.metrics.http_rebuilds.fetch_add(1, Ordering::Relaxed);
            }
            Ended::Woken => {}
        }
        drains.retain(|d| !d.is_finished());
        if let Some(drain) = retire(server, &shared, &responders) {
            drains.push(drain);
        }
    }
    // Stop listening now, for every clone of the listener: shutting a listening socket down
    // makes new connections fail and wakes tiny_http's accept thread, so the port is closed
    // when shutdown returns, not whenever that thread gets around to it.
    let _ = socket2::SockRef::from(&listener).shutdown(std::net::Shutdown::Both);
    lock(&shared.http_servers).clear();
    for drain in drains {
        let _ = drain.join();
    }
    lock(&responders).stop();
}

/// Why [`serve`] stopped taking requests from one tiny_http server.
enum Ended {
    /// tiny_http reported its accept error (its accept thread has ended).
    AcceptError(io::Error),
    /// The accept thread died without a word; this many connections wait in the queue.
    AcceptDied(usize),
    /// Shutdown woke the dispatcher.
    Woken,
}

/// Hands one server's requests to responders until its accept loop ends or shutdown wakes us.
fn serve(
    server: &tiny_http::Server,
    shared: &Shared,
    responders: &Mutex<Responders>,
    watch: &mut AcceptWatch,
) -> Ended {
    watch.restart();
    loop {
        match server.recv_timeout(TICK) {
            Ok(Some(request)) => lock(responders).dispatch(request),
            Ok(None) if shared.stopping.load(Ordering::Acquire) => return Ended::Woken,
            Ok(None) => {}
            Err(err) => return Ended::AcceptError(err),
        }
        lock(responders).sweep();
        if let Some(queued) = watch.stalled() {
            return Ended::AcceptDied(queued);
        }
    }
}

fn build_server(listener: &TcpListener) -> Option<Arc<tiny_http::Server>> {
    let clone = match listener.try_clone() {
        Ok(clone) => clone,
        Err(err) => {
            error!("cannot clone the http listener: {err}");
            return None;
        }
    };
    // tiny_http starts its accept thread with `thread::spawn`, which panics if the host has no
    // thread to give: catch that here rather than lose HTTP for good.
    match catch_unwind(AssertUnwindSafe(|| {
        tiny_http::Server::from_listener(clone, None)
    })) {
        Ok(Ok(server)) => Some(Arc::new(server)),
        Ok(Err(err)) => {
            error!("cannot start tiny_http: {err}");
            None
        }
        Err(_) => {
            error!("cannot start tiny_http: no thread for its accept loop");
            None
        }
    }
}

/// Answers what is still arriving on a retired server's connections, until it has been quiet
/// for longer than those connections may idle (by then they are all closed), or until shutdown
/// wakes it.
fn retire(
    server: Arc<tiny_http::Server>,
    shared: &Arc<Shared>,
    responders: &Arc<Mutex<Responders>>,
) -> Option<JoinHandle<()>> {
    let shared = Arc::clone(shared);
    let responders = Arc::clone(responders);
    let quiet_limit = shared.config.http_idle_timeout + Duration::from_secs(1);
    thread::Builder::new()
        .name("http-drain".into())
        .stack_size(DRAIN_STACK_BYTES)
        .spawn(move || {
            loop {
                match server.recv_timeout(quiet_limit) {
                    Ok(Some(request)) => lock(&responders).dispatch(request),
                    // Quiet for the whole limit, or woken by shutdown.
                    Ok(None) => break,
                    // tiny_http reports its accept error once; requests may still follow.
                    Err(_) => continue,
                }
            }
            lock(&shared.http_servers).retain(|live| !Arc::ptr_eq(live, &server));
        })
        .map_err(|err| warn!("no thread to drain a retired http server: {err}"))
        .ok()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Wakes every thread blocked on a tiny_http server, so each sees that the server is stopping.
pub fn wake(shared: &Shared) {
    let servers: &LiveServers = &shared.http_servers;
    for server in lock(servers).iter() {
        server.unblock();
    }
}
