//! One responder thread per HTTP connection being answered: the dispatcher ([`super::run_http`])
//! hands each request to its connection's responder, which writes the answers in order, so a
//! client that does not read blocks only its own thread. Bounded: [`MAX_RESPONDERS`] threads,
//! [`QUEUE_PER_CONNECTION`] requests each; a connection over its queue, or whose write failed,
//! has its further requests dropped unanswered (without writing).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use log::{debug, warn};
use tiny_http::Request;

use super::routes::respond;
use super::TICK;
use crate::shared::Shared;

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

/// The responders of the connections being answered, keyed by peer address. Used by the
/// dispatcher and the drain threads, each for a moment per request.
pub(super) struct Responders {
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
    pub(super) fn new(shared: Arc<Shared>) -> Self {
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
    pub(super) fn dispatch(&mut self, request: Request) {
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
    pub(super) fn sweep(&mut self) {
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
    pub(super) fn stop(&mut self) {
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
