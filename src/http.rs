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

use std::collections::HashMap;
use std::fs;
use std::io::{self, BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use log::{debug, error, warn};
use tiny_http::{Header, Method, Request, Response};

use crate::admission::{host_allowed, hostname};
use crate::config::Config;
use crate::room::{normalize_room_name, GENERAL_ROOM};
use crate::shared::{LiveServers, Shared};

mod assets {
    include!(concat!(env!("OUT_DIR"), "/assets.rs"));
}

/// Pause after a real accept error (e.g. out of file descriptors) before rebuilding.
const REBUILD_BACKOFF: Duration = Duration::from_millis(100);
const DRAIN_STACK_BYTES: usize = 256 * 1024;
/// The dispatcher wakes at least this often, to end idle responders and look at the accept
/// queue even when no request comes.
const TICK: Duration = Duration::from_millis(250);
/// How often [`AcceptWatch`] reads the accept queue. Reading it costs a `/proc` read of the
/// listening sockets only (they come first in the table); a dead accept thread is noticed after
/// two looks, so within about two seconds.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);
/// Requests of one connection waiting for its responder. Browsers do not pipeline; a client
/// with this many requests unanswered is not reading, and is cut off. tiny_http reads
/// pipelined requests as fast as they come, so this is also the most a pipelining client may
/// send ahead of its answers. Bounded memory: a request is well under 1 KiB here, so all
/// queues together hold at most about [`MAX_RESPONDERS`] x 128 KiB.
pub const QUEUE_PER_CONNECTION: usize = 128;
/// Responder threads at once: one per connection being answered. An answer from memory takes
/// microseconds, so only connections whose socket is full keep one; past this many, new
/// requests are dropped unanswered until one frees up. Well inside the threads that limits.rs
/// keeps for HTTP (`RESERVED_THREADS`).
pub const MAX_RESPONDERS: usize = 64;
/// A responder only formats a response from memory and writes it.
const RESPONDER_STACK_BYTES: usize = 128 * 1024;
/// How long the end of the HTTP thread waits for responders (each ends when its write does,
/// at the latest after `http_idle_timeout`; the process's exit ends the rest).
const RESPONDER_JOIN_LIMIT: Duration = Duration::from_millis(250);
/// At most one warning per this long about requests dropped unanswered.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(10);

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

/// The responders of the connections being answered, keyed by peer address. Used by the
/// dispatcher and the drain threads, each for a moment per request.
struct Responders {
    shared: Arc<Shared>,
    live: HashMap<SocketAddr, Responder>,
    /// Responders told to end (their sender dropped), joined once finished.
    ending: Vec<JoinHandle<()>>,
    last_sweep: Instant,
    /// Requests dropped unanswered since the last warning, and when that was.
    dropped: u64,
    last_drop_log: Option<Instant>,
}

/// One connection's responder thread, seen from the dispatcher.
struct Responder {
    /// Its queue. Only the dispatcher (under the [`Responders`] lock) sends; dropping the
    /// sender, which happens only when nothing is pending, ends the thread.
    queue: Sender<Request>,
    state: Arc<ResponderState>,
    thread: JoinHandle<()>,
}

struct ResponderState {
    /// Requests sent and not yet finished: +1 by the dispatcher before sending, -1 by the
    /// responder after answering (or dropping) one. Zero means the queue is empty and the
    /// thread idle, so ending it loses nothing.
    pending: AtomicUsize,
    /// Set when the connection stopped reading (a full queue, a failed write): its requests
    /// are then dropped unanswered.
    cut: AtomicBool,
}

impl Responders {
    fn new(shared: Arc<Shared>) -> Self {
        Responders {
            shared,
            live: HashMap::new(),
            ending: Vec::new(),
            last_sweep: Instant::now(),
            dropped: 0,
            last_drop_log: None,
        }
    }

    /// Queues a request for its connection's responder, starting one if needed. Never blocks
    /// on a client.
    fn dispatch(&mut self, request: Request) {
        // tiny_http knows the peer of every TCP connection; a missing one shares one key.
        let peer = request
            .remote_addr()
            .copied()
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let request = match self.live.get(&peer) {
            Some(responder) if responder.state.cut.load(Ordering::Acquire) => {
                return self.drop_unanswered(request, peer, "it stopped reading");
            }
            Some(responder) => {
                responder.state.pending.fetch_add(1, Ordering::AcqRel);
                match responder.queue.try_send(request) {
                    Ok(()) => return,
                    Err(TrySendError::Full(request)) => {
                        responder.state.pending.fetch_sub(1, Ordering::AcqRel);
                        responder.state.cut.store(true, Ordering::Release);
                        return self.drop_unanswered(request, peer, "its queue is full");
                    }
                    // The responder is gone (it panicked): start another.
                    Err(TrySendError::Disconnected(request)) => {
                        if let Some(gone) = self.live.remove(&peer) {
                            self.ending.push(gone.thread);
                        }
                        request
                    }
                }
            }
            None => request,
        };
        if self.live.len() >= MAX_RESPONDERS {
            self.sweep_now();
            if self.live.len() >= MAX_RESPONDERS {
                return self.drop_unanswered(request, peer, "every responder is busy");
            }
        }
        self.start(peer, request);
    }

    fn start(&mut self, peer: SocketAddr, request: Request) {
        let (queue, inbox) = crossbeam_channel::bounded(QUEUE_PER_CONNECTION);
        let state = Arc::new(ResponderState {
            pending: AtomicUsize::new(1),
            cut: AtomicBool::new(false),
        });
        // The request waits in the channel, not in the thread's closure: if the thread cannot
        // start, it is taken back and dropped without blocking.
        if let Err(err) = queue.try_send(request) {
            return abandon(err.into_inner());
        }
        let (thread_inbox, thread_state) = (inbox.clone(), Arc::clone(&state));
        let shared = Arc::clone(&self.shared);
        let spawned = thread::Builder::new()
            .name("http-responder".into())
            .stack_size(RESPONDER_STACK_BYTES)
            .spawn(move || respond_all(thread_inbox, &thread_state, &shared));
        match spawned {
            Ok(thread) => {
                self.live.insert(
                    peer,
                    Responder {
                        queue,
                        state,
                        thread,
                    },
                );
            }
            Err(err) => {
                warn!("no thread to answer an http request: {err}");
                if let Ok(request) = inbox.try_recv() {
                    abandon(request);
                }
            }
        }
    }

    fn drop_unanswered(&mut self, request: Request, peer: SocketAddr, why: &str) {
        abandon(request);
        self.dropped += 1;
        let now = Instant::now();
        if self
            .last_drop_log
            .is_some_and(|last| now.duration_since(last) < DROP_LOG_INTERVAL)
        {
            return;
        }
        warn!(
            "dropped {} http request(s) unanswered; latest from {peer}: {why}",
            self.dropped
        );
        self.dropped = 0;
        self.last_drop_log = Some(now);
    }

    /// Ends idle responders, at most once per [`TICK`].
    fn sweep(&mut self) {
        if self.last_sweep.elapsed() >= TICK {
            self.sweep_now();
        }
    }

    fn sweep_now(&mut self) {
        self.last_sweep = Instant::now();
        let idle: Vec<SocketAddr> = self
            .live
            .iter()
            .filter(|(_, r)| r.state.pending.load(Ordering::Acquire) == 0)
            .map(|(peer, _)| *peer)
            .collect();
        for peer in idle {
            if let Some(responder) = self.live.remove(&peer) {
                // Dropping its sender ends the thread's loop.
                self.ending.push(responder.thread);
            }
        }
        let mut i = 0;
        while i < self.ending.len() {
            if self.ending[i].is_finished() {
                let _ = self.ending.swap_remove(i).join();
            } else {
                i += 1;
            }
        }
    }

    /// Ends every responder: each finishes what it is writing (or drops it, when stopping)
    /// and is joined for at most [`RESPONDER_JOIN_LIMIT`].
    fn stop(&mut self) {
        self.ending
            .extend(self.live.drain().map(|(_, responder)| responder.thread));
        let deadline = Instant::now() + RESPONDER_JOIN_LIMIT;
        while self.ending.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        let left = self.ending.iter().filter(|t| !t.is_finished()).count();
        if left > 0 {
            debug!("{left} http responders still writing at shutdown");
        }
        for thread in self.ending.drain(..).filter(|t| t.is_finished()) {
            let _ = thread.join();
        }
    }
}

/// A responder thread: answers its connection's requests in order until the dispatcher drops
/// the sender.
fn respond_all(inbox: Receiver<Request>, state: &ResponderState, shared: &Shared) {
    for request in inbox.iter() {
        if state.cut.load(Ordering::Acquire) || shared.stopping.load(Ordering::Acquire) {
            abandon(request);
        } else if !respond(request, shared) {
            state.cut.store(true, Ordering::Release);
        }
        state.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Drops a request without answering it and without blocking. Dropping a `Request` would write
/// a 500, after waiting for the connection's earlier responses; taking its writer out first
/// skips that (tiny_http then goes on to the connection's next response).
fn abandon(request: Request) {
    drop(request.into_writer());
}

/// Watches the listener's accept queue: a live tiny_http accept thread empties it at once, so
/// connections that wait there across two looks (and do not get fewer) mean the thread is
/// gone. Linux only (`/proc/self/net/tcp`, `tcp6`); elsewhere it never fires.
///
/// Why this and not a panic hook or a probe: a hook is process-wide (and would have to
/// recognise tiny_http's panics by their file name); a probe connection needs a descriptor
/// exactly when they have run out. The queue needs nothing from the process but a brief read
/// of `/proc`, and sees what a client sees: connections nobody accepts.
struct AcceptWatch {
    /// The listening socket's inode, which names its row in `/proc/self/net/tcp*`.
    inode: Option<u64>,
    last_look: Instant,
    /// The queue at the last look.
    queued: usize,
}

impl AcceptWatch {
    fn new(listener: &TcpListener) -> Self {
        let inode = fs::read_link(format!("/proc/self/fd/{}", listener.as_raw_fd()))
            .ok()
            .and_then(|link| socket_inode(&link.to_string_lossy()));
        if inode.is_none() {
            debug!("no /proc: a silently dead http accept thread will not be noticed");
        }
        AcceptWatch {
            inode,
            last_look: Instant::now(),
            queued: 0,
        }
    }

    /// Starts afresh for a new server.
    fn restart(&mut self) {
        self.last_look = Instant::now();
        self.queued = 0;
    }

    /// `Some(queued)` when the accept queue has not been drained since the last look.
    fn stalled(&mut self) -> Option<usize> {
        let inode = self.inode?;
        if self.last_look.elapsed() < WATCH_INTERVAL {
            return None;
        }
        self.last_look = Instant::now();
        // Unreadable (out of descriptors, say): no verdict this time.
        let queued = accept_queue(inode).unwrap_or(0);
        let stalled = queued > 0 && self.queued > 0 && queued >= self.queued;
        self.queued = queued;
        stalled.then_some(queued)
    }
}

/// The inode in a `/proc/self/fd` link to a socket: `socket:[12345]`.
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Connections waiting to be accepted on the listening socket with this inode: the
/// `rx_queue` of its row (state `0A`, LISTEN) in `/proc/self/net/tcp` or `tcp6`.
fn accept_queue(inode: u64) -> Option<usize> {
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        let Ok(file) = fs::File::open(table) else {
            continue;
        };
        if let Some(queued) = listen_row_queue(BufReader::new(file), inode) {
            return Some(queued);
        }
    }
    None
}

/// Finds the LISTEN row with this inode. The kernel lists listening sockets before all
/// others, so reading stops at the first other row: with thousands of WebSocket clients the
/// rest of the table is large, and never needed.
fn listen_row_queue(table: impl BufRead, inode: u64) -> Option<usize> {
    for line in table.lines().skip(1) {
        let line = line.ok()?;
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(3) != Some(&"0A") {
            return None;
        }
        if fields.get(9).and_then(|f| f.parse::<u64>().ok()) == Some(inode) {
            let (_, rx) = fields.get(4)?.split_once(':')?;
            return usize::from_str_radix(rx, 16).ok();
        }
    }
    None
}

/// Wakes every thread blocked on a tiny_http server, so each sees that the server is stopping.
pub fn wake(shared: &Shared) {
    let servers: &LiveServers = &shared.http_servers;
    for server in lock(servers).iter() {
        server.unblock();
    }
}

/// What a path names.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Page(String),
    Asset(&'static str, &'static [u8]),
    Health,
    Metrics,
    NotFound,
}

fn route(path: &str) -> Route {
    let path = path.split(['?', '#']).next().unwrap_or("");
    match path {
        "/" => Route::Page(GENERAL_ROOM.to_owned()),
        "/healthz" => Route::Health,
        "/metrics" => Route::Metrics,
        _ => {
            if let Some(file) = path.strip_prefix("/static/") {
                // Only names in the embedded table: nothing on disk is ever read.
                return assets::ASSETS
                    .iter()
                    .find(|(name, _)| *name == file)
                    .map_or(Route::NotFound, |(name, bytes)| Route::Asset(name, bytes));
            }
            path.strip_prefix('/')
                .and_then(normalize_room_name)
                .map_or(Route::NotFound, Route::Page)
        }
    }
}

fn asset(name: &str) -> &'static [u8] {
    assets::ASSETS
        .iter()
        .find(|(n, _)| *n == name)
        .map_or(&[], |(_, bytes)| bytes)
}

fn content_type(name: &str) -> &'static str {
    match name.rsplit('.').next().unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "js" => "text/javascript; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "json" => "application/json",
        "webmanifest" => "application/manifest+json",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// A response header. A value HTTP cannot carry (only a configured value could be one: the
/// flags are checked, but a library user's `Config` is not) becomes empty instead of
/// panicking the thread that serves every request.
fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes())
        .or_else(|_| Header::from_bytes(name.as_bytes(), &b""[..]))
        .unwrap_or_else(|_| unreachable!("header names are static and valid"))
}

/// Answers one request; false when the answer could not be written (the connection is then
/// not worth answering again).
fn respond(request: Request, shared: &Shared) -> bool {
    let response = match request.method() {
        Method::Get | Method::Head => build_response(&request, shared),
        _ => Response::from_data(b"method not allowed\n".to_vec())
            .with_status_code(405)
            .with_header(header("Allow", "GET, HEAD"))
            .with_header(header("Content-Type", "text/plain; charset=utf-8")),
    };
    let response = response
        .with_header(header("X-Content-Type-Options", "nosniff"))
        .with_header(header("Referrer-Policy", "no-referrer"));
    match request.respond(response) {
        Ok(()) => {
            shared.metrics.http_requests.fetch_add(1, Ordering::Relaxed);
            true
        }
        Err(err) => {
            debug!("http response not delivered: {err}");
            false
        }
    }
}

/// Whether `/metrics` may be shown to this peer (`--metrics-allow`).
fn metrics_allowed(config: &Config, peer: Option<&SocketAddr>) -> bool {
    peer.is_some_and(|peer| config.metrics_allow.iter().any(|r| r.contains(peer.ip())))
}

/// The request's `Host` header, or "" without one.
fn host_of(request: &Request) -> &str {
    request
        .headers()
        .iter()
        .find(|h| h.field.equiv("Host"))
        .map_or("", |h| h.value.as_str())
}

fn build_response(request: &Request, shared: &Shared) -> Response<io::Cursor<Vec<u8>>> {
    let host = host_of(request);
    if !host_allowed(&shared.config, host) {
        // 421 Misdirected Request: this server does not answer for that name (DNS rebinding).
        let host: String = host.chars().take(100).collect();
        let body = format!(
            "This chatroom server does not answer for the host {host:?}.\nIf that is its name, \
             start it with --allowed-host {}\n",
            hostname(&host)
        );
        return Response::from_data(body.into_bytes())
            .with_status_code(421)
            .with_header(header("Content-Type", "text/plain; charset=utf-8"))
            .with_header(header("Cache-Control", "no-store"));
    }
    match route(request.url()) {
        Route::Page(room) => {
            let page = render_page(&room, shared);
            html(page.into_bytes(), 200, request, shared)
        }
        Route::NotFound => html(asset("404.html").to_vec(), 404, request, shared),
        Route::Health => {
            let (code, body) = shared.health_report();
            Response::from_data(body.into_bytes())
                .with_status_code(code)
                .with_header(header("Content-Type", "application/json"))
                .with_header(header("Cache-Control", "no-store"))
        }
        Route::Metrics if !metrics_allowed(&shared.config, request.remote_addr()) => {
            Response::from_data(b"metrics are served only to --metrics-allow addresses\n".to_vec())
                .with_status_code(403)
                .with_header(header("Content-Type", "text/plain; charset=utf-8"))
                .with_header(header("Cache-Control", "no-store"))
        }
        Route::Metrics => {
            let body = crate::metrics::render(&shared.metrics, &shared.gauges());
            Response::from_data(body.into_bytes())
                .with_header(header(
                    "Content-Type",
                    "text/plain; version=0.0.4; charset=utf-8",
                ))
                .with_header(header("Cache-Control", "no-store"))
        }
        Route::Asset(name, bytes) => Response::from_data(bytes.to_vec())
            .with_header(header("Content-Type", content_type(name)))
            .with_header(header("Cache-Control", "no-cache")),
    }
}

/// The page with its three placeholders filled in. Room names are `[a-z0-9_-]` and the port
/// is a number, so only the operator's `--ws-url` needs escaping.
fn render_page(room: &str, shared: &Shared) -> String {
    let template = String::from_utf8_lossy(asset("index.html"));
    template
        .replace("{{ROOM}}", room)
        .replace(
            "{{WS_URL}}",
            &escape_html(shared.config.ws_url.as_deref().unwrap_or("")),
        )
        .replace("{{WS_PORT}}", &shared.ws_port.to_string())
}

fn escape_html(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn html(
    body: Vec<u8>,
    status: u16,
    request: &Request,
    shared: &Shared,
) -> Response<io::Cursor<Vec<u8>>> {
    let csp = format!(
        "default-src 'self'; connect-src 'self' {}; img-src 'self' data:; style-src 'self'; \
         script-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
        websocket_sources(request, shared)
    );
    Response::from_data(body)
        .with_status_code(status)
        .with_header(header("Content-Type", "text/html; charset=utf-8"))
        .with_header(header("Cache-Control", "no-cache"))
        .with_header(header("Content-Security-Policy", &csp))
}

/// The WebSocket endpoint the page will use, as CSP sources.
fn websocket_sources(request: &Request, shared: &Shared) -> String {
    if let Some(url) = &shared.config.ws_url {
        // The origin part of the configured URL: scheme://host[:port].
        let origin_end = url
            .find("://")
            .map(|i| i + 3)
            .and_then(|start| url[start..].find('/').map(|i| start + i))
            .unwrap_or(url.len());
        return url[..origin_end].to_owned();
    }
    let host = host_of(request);
    let name = hostname(host);
    let plain = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b':');
    let name = if host.starts_with('[') && plain {
        format!("[{name}]")
    } else if plain {
        name.to_owned()
    } else {
        "*".to_owned()
    };
    let port = shared.ws_port;
    format!("ws://{name}:{port} wss://{name}:{port}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("/"), Route::Page("general".into()));
        assert_eq!(route("/Room2?x=1"), Route::Page("room2".into()));
        assert_eq!(route("/healthz"), Route::Health);
        assert_eq!(route("/metrics"), Route::Metrics);
        assert_eq!(route("/metrics?x=1"), Route::Metrics);
        assert!(matches!(route("/static/app.js"), Route::Asset("app.js", _)));
        for bad in [
            "/static",
            "/static/",
            "/static/../Cargo.toml",
            "/static/nope.js",
            "/a/b",
            "/a.b",
            "/..%2f..%2fetc%2fpasswd",
            "/%2e%2e",
            "/ws",
            "/healthz/x",
            "/metrics/x",
            "//",
            "/api",
        ] {
            assert_eq!(route(bad), Route::NotFound, "{bad}");
        }
    }

    #[test]
    fn every_asset_has_a_content_type() {
        for (name, _) in assets::ASSETS {
            assert_ne!(content_type(name), "application/octet-stream", "{name}");
        }
    }

    #[test]
    fn metrics_only_for_allowed_peers() {
        let config = Config::default();
        let peer = |text: &str| Some(text.parse::<SocketAddr>().unwrap());
        assert!(metrics_allowed(&config, peer("127.0.0.1:9").as_ref()));
        assert!(metrics_allowed(&config, peer("[::1]:9").as_ref()));
        assert!(metrics_allowed(
            &config,
            peer("[::ffff:127.0.0.1]:9").as_ref()
        ));
        assert!(!metrics_allowed(&config, peer("10.0.0.1:9").as_ref()));
        assert!(!metrics_allowed(&config, None));
        let config = Config {
            metrics_allow: vec![crate::config::AddressRange::parse("10.0.0.0/8").unwrap()],
            ..Config::default()
        };
        assert!(metrics_allowed(&config, peer("10.1.2.3:9").as_ref()));
        assert!(!metrics_allowed(&config, peer("127.0.0.1:9").as_ref()));
    }

    #[test]
    fn the_accept_queue_is_read_from_the_listen_row() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1388 00000000:0000 0A 00000000:00000003 00:00000000 00000000     0        0 4242 1 0 100 0 0 10 0
   1: 0100007F:1389 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4243 1 0 100 0 0 10 0
   2: 0100007F:1388 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 4244 1 0 20 4 30 10 -1
";
        assert_eq!(listen_row_queue(table.as_bytes(), 4242), Some(3));
        assert_eq!(listen_row_queue(table.as_bytes(), 4243), Some(0));
        // Not a listening socket, and past the listening rows: not looked at.
        assert_eq!(listen_row_queue(table.as_bytes(), 4244), None);
        assert_eq!(socket_inode("socket:[4242]"), Some(4242));
        assert_eq!(socket_inode("pipe:[4242]"), None);
    }

    #[test]
    fn this_process_can_see_its_accept_queue() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let watch = AcceptWatch::new(&listener);
        let Some(inode) = watch.inode else {
            return; // no /proc here
        };
        assert_eq!(accept_queue(inode), Some(0));
        let _waiting = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        assert_eq!(accept_queue(inode), Some(1));
    }
}
