//! The WebSocket door: the accept loop, the connection cap, and the handshake checks.
//!
//! [`run_acceptor`] owns the WebSocket `TcpListener`. For each connection it first counts it
//! against the cap ([`Admission::try_admit`]) — before any thread exists — then spawns the
//! connection's reader ([`crate::client::run_reader`]), which does the handshake and calls
//! [`Admission::check_request`] on the request line and headers. Connections over the cap go
//! to one refuser thread that answers `503` and hangs up.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use log::{error, warn};

use crate::client::{self, ReaderContext, READER_STACK_BYTES};
use crate::handshake::{Opening, Refusal};
use crate::hub::HubCommand;
use crate::limits::{HostLimits, RESERVED_THREADS, THREADS_PER_CLIENT};
use crate::room::{normalize_room_name, GENERAL_ROOM};
use crate::Shared;

/// Over-cap connections waiting for their 503; beyond this they are simply closed.
pub const REFUSAL_QUEUE: usize = 64;
/// How long the refuser waits for an over-cap client's request before answering anyway.
const REFUSAL_READ_TIMEOUT: Duration = Duration::from_millis(500);
/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Decides who may connect: the connection cap, and the handshake's room and Origin checks.
pub struct Admission {
    shared: Arc<Shared>,
    /// Connections allowed at once (the configured cap, lowered to what the host can hold).
    max_clients: usize,
    /// Threads this process may have before a new one could fail to start (see limits.rs).
    thread_budget: usize,
    allowed_origins: Vec<String>,
}

impl Admission {
    pub fn new(shared: Arc<Shared>, max_clients: usize, limits: &HostLimits) -> Self {
        Admission {
            allowed_origins: shared
                .config
                .allowed_origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
            shared,
            max_clients,
            thread_budget: limits.safe_threads(),
        }
    }

    /// Counts a new connection against the cap, or says no. Counts every thread of the process
    /// (HTTP's too), so WebSocket clients can never take the last threads the host allows.
    fn try_admit(&self) -> bool {
        let counter = &self.shared.clients;
        let admitted = counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_clients).then_some(n + 1)
            })
            .is_ok();
        if admitted
            && crate::limits::process_threads() + THREADS_PER_CLIENT + RESERVED_THREADS
                > self.thread_budget
        {
            counter.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        admitted
    }

    /// The handshake check: a valid room in the path, and an acceptable Origin. Returns the
    /// room, or the refusal to send as the handshake's HTTP response.
    pub fn check_request(&self, opening: &Opening) -> Result<String, Refusal> {
        let path = opening.path.split(['?', '#']).next().unwrap_or("");
        let room = match path {
            "/ws" | "/ws/" => Some(GENERAL_ROOM.to_owned()),
            _ => path.strip_prefix("/ws/").and_then(normalize_room_name),
        };
        let Some(room) = room else {
            warn!("refused handshake: invalid room path {path:?}");
            return Err(Refusal::new(404, "no such room\n"));
        };
        if let Some(origin) = &opening.origin {
            let host = opening.host.as_deref().unwrap_or("");
            if !self.origin_allowed(origin, host) {
                warn!("refused handshake: foreign origin {origin:?}");
                return Err(Refusal::new(403, "origin not allowed\n"));
            }
        }
        Ok(room)
    }

    fn origin_allowed(&self, origin: &str, host: &str) -> bool {
        let origin = origin.trim_end_matches('/').to_ascii_lowercase();
        if self.allowed_origins.contains(&origin) {
            return true;
        }
        let origin_host = origin
            .split_once("://")
            .map(|(_, rest)| hostname(rest))
            .unwrap_or_default();
        !origin_host.is_empty() && origin_host == hostname(&host.to_ascii_lowercase())
    }
}

/// The hostname of `host[:port]`, `[v6]:port` included.
pub fn hostname(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    authority.split(':').next().unwrap_or("")
}

/// The accept loop. It never ends on an error (it backs off and goes on); it ends when the
/// server is stopping, after [`crate::ServerHandle::shutdown`] shuts the listening socket down.
pub fn run_acceptor(
    listener: TcpListener,
    shared: Arc<Shared>,
    hub: Sender<HubCommand>,
    admission: Arc<Admission>,
    refuser: Sender<TcpStream>,
) {
    let mut next_id: u64 = 0;
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(err) => {
                if shared.stopping.load(Ordering::Acquire) {
                    return;
                }
                error!("websocket accept failed: {err}; retrying");
                thread::sleep(ACCEPT_ERROR_BACKOFF);
                continue;
            }
        };
        if shared.stopping.load(Ordering::Acquire) {
            return;
        }
        if !admission.try_admit() {
            warn!("refused handshake from {peer}: server full");
            let _ = refuser.try_send(stream);
            continue;
        }
        next_id += 1;
        spawn_reader(stream, peer, next_id, &shared, &hub, &admission);
    }
}

fn spawn_reader(
    stream: TcpStream,
    peer: SocketAddr,
    id: u64,
    shared: &Arc<Shared>,
    hub: &Sender<HubCommand>,
    admission: &Arc<Admission>,
) {
    let slot = ClientSlot(Arc::clone(shared));
    let guard = shared.client_threads.guard();
    let ctx = ReaderContext {
        shared: Arc::clone(shared),
        hub: hub.clone(),
        admission: Arc::clone(admission),
    };
    let spawned = thread::Builder::new()
        .name(format!("ws-reader-{id}"))
        .stack_size(READER_STACK_BYTES)
        .spawn(move || {
            let _slot = slot;
            let _guard = guard;
            client::run_reader(stream, peer, id, ctx);
        });
    // On failure the closure, and with it the slot, the guard and the socket, is dropped.
    if let Err(err) = spawned {
        error!("cannot start a reader thread for {peer}: {err}");
    }
}

/// One connection counted against the cap; dropping it (when the reader ends) frees the slot.
struct ClientSlot(Arc<Shared>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The refuser thread: reads what an over-cap client sent (briefly), answers 503, hangs up.
/// Reading first matters: closing a socket with unread input makes the kernel send a reset,
/// which can destroy the 503 before the client reads it.
pub fn run_refuser(queue: Receiver<TcpStream>) {
    for mut stream in queue {
        let _ = stream.set_read_timeout(Some(REFUSAL_READ_TIMEOUT));
        let _ = stream.set_write_timeout(Some(REFUSAL_READ_TIMEOUT));
        let mut request = Vec::with_capacity(1024);
        let mut buf = [0u8; 1024];
        while request.len() < 16 * 1024 && !request.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
        let body = "server full, try again later\n";
        let response = format!(
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nRetry-After: 5\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(response.as_bytes());
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }
}
