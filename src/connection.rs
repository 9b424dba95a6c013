//! One client's connection as every thread but its reader sees it: the socket's sending side,
//! the frames waiting for it, and its kill switch. Also the registry of every connection, and
//! the count of client threads.
//!
//! **Write without blocking; block only on a backlog.** Whoever has frames for a client (the
//! hub's fan-out, the client's reader with an error or a pong, the heartbeat with a ping)
//! queues them with [`Connection::offer`] and then calls [`Connection::flush`], which writes the
//! queue into the socket with one `sendmsg(MSG_DONTWAIT)` under the connection's lock: it never
//! waits, and the lock makes it the only writer at that moment, so frames leave in queue order
//! and never interleave. The kernel's send buffer takes a chat message at once, so almost
//! always the queue is empty again right away and no thread was woken. Only when the kernel
//! takes less than everything does a **backlog writer** thread start for this client: it owns
//! the sending side (every other thread only queues) and makes blocking writes until the queue
//! is empty, then ends. A client costs one thread, its reader, plus a writer only while it
//! has a backlog.
//!
//! The hub queues a burst of broadcasts first and flushes each touched connection once at the
//! end, so a burst costs each client one system call.
//!
//! **Bounded.** A connection holds at most `capacity` frames or `byte_limit` bytes (queued and
//! being written): beyond that [`Connection::offer`] says [`Offer::Full`], and the hub drops the
//! client as a slow consumer instead of waiting. A backlog writer that cannot be started is
//! treated the same way: the connection is closed, never the process aborted.
//!
//! Closing: [`Connection::close`] queues a close frame (dropping what was queued but not
//! started, when the server closes) and refuses everything after it; once the close frame is
//! out, the sending side is shut (FIN) while the reader goes on to read the client's answer.
//! [`Connection::kill`] (`shutdown(Both)`) ends a blocked read or write at once.

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::Instant;

use log::{debug, warn};
use socket2::SockRef;

use crate::limits;
use crate::room::ClientId;
use crate::wire::Frame;

/// Stack of a backlog writer: it only copies frames into the socket.
const WRITER_STACK_BYTES: usize = 64 * 1024;
/// Slices handed to one `sendmsg` (two per frame: header and payload). They live on the
/// caller's stack, so a flush allocates nothing; a longer queue takes more than one call.
const SLICES_PER_SEND: usize = 128;

/// A close code, as RFC 6455 numbers them.
pub type CloseCode = u16;
pub const CLOSE_AWAY: CloseCode = 1001;
pub const CLOSE_POLICY: CloseCode = 1008;

/// What became of an offered frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Offer {
    /// Queued; `flush` tells whether the caller now owes this connection a
    /// [`Connection::flush`] (nobody else does: the queue was empty and no writer runs).
    Queued { flush: bool },
    /// The client is not keeping up: its limits are reached.
    Full,
    /// The connection is closing or gone; the frame was dropped.
    Gone,
}

/// The limits of one connection's queue.
#[derive(Clone, Copy, Debug)]
pub struct QueueLimits {
    pub frames: usize,
    pub bytes: usize,
}

/// Frames not yet (wholly) in the socket, oldest first, and how much of the first one is.
#[derive(Default)]
struct Frames {
    frames: VecDeque<Frame>,
    front_sent: usize,
    bytes: usize,
}

impl Frames {
    fn push(&mut self, frame: Frame) {
        self.bytes += frame.len();
        self.frames.push_back(frame);
    }

    fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Writes as much as one `sendmsg` takes. Returns true once a close frame has been sent.
    fn send_once(&mut self, stream: &TcpStream, flags: i32) -> io::Result<bool> {
        let mut slices = [IoSlice::new(&[]); SLICES_PER_SEND];
        let mut used = 0;
        let mut offset = self.front_sent;
        for frame in self.frames.iter().take(SLICES_PER_SEND / 2) {
            let (head, payload) = frame.parts_from(offset);
            offset = 0;
            for part in [head, payload].into_iter().filter(|s| !s.is_empty()) {
                slices[used] = IoSlice::new(part);
                used += 1;
            }
        }
        let sent = SockRef::from(stream).send_vectored_with_flags(&slices[..used], flags)?;
        Ok(self.advance(sent))
    }

    /// Drops what `sent` bytes completed. Returns true if a close frame was among them.
    fn advance(&mut self, mut sent: usize) -> bool {
        let mut closed = false;
        while let Some(front) = self.frames.front() {
            let left = front.len() - self.front_sent;
            if sent < left {
                self.front_sent += sent;
                break;
            }
            sent -= left;
            closed |= front.is_close();
            self.bytes -= front.len();
            self.front_sent = 0;
            self.frames.pop_front();
        }
        closed
    }

    /// Drops every frame that has not started to go out (a half-sent one must be finished, or
    /// the stream would be corrupt).
    fn drop_unstarted(&mut self) {
        let keep = usize::from(self.front_sent > 0);
        for frame in self.frames.drain(keep..) {
            self.bytes -= frame.len();
        }
    }
}

/// Where the sending side is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    Open,
    /// A close frame is queued: nothing more is accepted.
    Closing,
    /// The close frame has gone and the sending side is shut (FIN).
    Closed,
    /// The socket was cut or failed.
    Dead,
}

struct Outgoing {
    queue: Frames,
    /// Frames the backlog writer has taken and is writing (still counted against the limits).
    in_flight: (usize, usize),
    writer_running: bool,
    flow: Flow,
}

/// One client's connection. Shared (`Arc`) by its reader, the hub (as a room member), the
/// registry, the heartbeat and, while there is a backlog, its writer.
pub struct Connection {
    pub id: ClientId,
    pub peer: SocketAddr,
    stream: TcpStream,
    outgoing: Mutex<Outgoing>,
    limits: QueueLimits,
    threads: Arc<ClientThreads>,
    /// Set once the handshake is done: from then on a close frame can be sent.
    handshake_done: AtomicBool,
    /// The close code the server asked for (0 = none): the reader reports it as its reason.
    server_close: AtomicU16,
}

impl Connection {
    pub fn new(
        id: ClientId,
        peer: SocketAddr,
        stream: TcpStream,
        limits: QueueLimits,
        threads: Arc<ClientThreads>,
    ) -> Arc<Connection> {
        Arc::new(Connection {
            id,
            peer,
            stream,
            outgoing: Mutex::new(Outgoing {
                queue: Frames::default(),
                in_flight: (0, 0),
                writer_running: false,
                flow: Flow::Open,
            }),
            limits,
            threads,
            handshake_done: AtomicBool::new(false),
            server_close: AtomicU16::new(0),
        })
    }

    /// The socket, for the reader (which only reads; see [`crate::client`]).
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    fn lock(&self) -> MutexGuard<'_, Outgoing> {
        // Every change under this lock leaves the state consistent, even if a panic follows.
        self.outgoing
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Marks the handshake as done: closing now sends a close frame instead of cutting.
    pub fn opened(&self) {
        self.handshake_done.store(true, Ordering::Release);
    }

    /// The close code the server asked for, if it asked (slow consumer, shutdown).
    pub fn server_close(&self) -> Option<CloseCode> {
        match self.server_close.load(Ordering::Acquire) {
            0 => None,
            code => Some(code),
        }
    }

    /// Frames waiting or being written right now.
    pub fn backlog(&self) -> usize {
        let out = self.lock();
        out.queue.frames.len() + out.in_flight.0
    }

    /// Queues a frame unless the connection is full, closing or gone; never blocks. When the
    /// answer says so, the caller must [`Connection::flush`] (now, or at the end of its burst).
    pub fn offer(&self, frame: Frame) -> Offer {
        // Before the handshake's response is out, nothing else may touch the socket.
        if !self.handshake_done.load(Ordering::Acquire) {
            return Offer::Gone;
        }
        let mut out = self.lock();
        if out.flow != Flow::Open {
            return Offer::Gone;
        }
        let frames = out.queue.frames.len() + out.in_flight.0;
        let bytes = out.queue.bytes + out.in_flight.1;
        // A single frame is always let into an empty queue, whatever its size.
        if frames > 0 && (frames >= self.limits.frames || bytes + frame.len() > self.limits.bytes) {
            return Offer::Full;
        }
        let flush = out.queue.is_empty() && !out.writer_running;
        out.queue.push(frame);
        Offer::Queued { flush }
    }

    /// Offers a frame and flushes at once if that is owed: for senders that do not batch.
    pub fn send(self: &Arc<Self>, frame: Frame) -> Offer {
        let offer = self.offer(frame);
        if offer == (Offer::Queued { flush: true }) {
            self.flush();
        }
        offer
    }

    /// Writes what is queued without blocking; starts a backlog writer for what the kernel did
    /// not take. Does nothing while a writer runs (it will write the queue).
    pub fn flush(self: &Arc<Self>) {
        let mut out = self.lock();
        if out.writer_running || out.queue.is_empty() || out.flow == Flow::Dead {
            return;
        }
        loop {
            match out
                .queue
                .send_once(&self.stream, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
            {
                Ok(closed) => {
                    if closed {
                        self.finish_close(&mut out);
                        return;
                    }
                    if out.queue.is_empty() {
                        return;
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) => {
                    debug!("write to {} failed: {err}", self.peer);
                    self.cut(&mut out);
                    return;
                }
            }
        }
        self.start_writer(&mut out);
    }

    /// Starts the backlog writer (the caller holds the lock and has seen a backlog).
    fn start_writer(self: &Arc<Self>, out: &mut Outgoing) {
        let guard = match self.threads.try_reserve() {
            Some(guard) => guard,
            None => {
                warn!(
                    "no thread can be started to write to {}; closing it like a slow consumer",
                    self.peer
                );
                self.cut(out);
                return;
            }
        };
        let connection = Arc::clone(self);
        let spawned = thread::Builder::new()
            .name(format!("ws-writer-{}", self.id))
            .stack_size(WRITER_STACK_BYTES)
            .spawn(move || {
                let _guard = guard;
                connection.write_backlog();
            });
        match spawned {
            Ok(_) => out.writer_running = true,
            Err(err) => {
                warn!(
                    "cannot start a writer thread for {}: {err}; closing it like a slow consumer",
                    self.peer
                );
                self.cut(out);
            }
        }
    }

    /// The backlog writer's body: takes the queue, writes it blocking (each write bounded by
    /// the socket's send timeout), and ends when the queue is empty.
    fn write_backlog(&self) {
        loop {
            let mut batch = {
                let mut out = self.lock();
                if out.queue.is_empty() || out.flow == Flow::Dead {
                    out.writer_running = false;
                    return;
                }
                let batch = std::mem::take(&mut out.queue);
                out.in_flight = (batch.frames.len(), batch.bytes);
                batch
            };
            let mut result = Ok(false);
            while !batch.is_empty() {
                result = match batch.send_once(&self.stream, libc::MSG_NOSIGNAL) {
                    Ok(closed) => Ok(closed),
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                    Err(err) => Err(err),
                };
                if !matches!(result, Ok(false)) {
                    break;
                }
            }
            let mut out = self.lock();
            out.in_flight = (0, 0);
            match result {
                Ok(false) => {}
                Ok(true) => {
                    self.finish_close(&mut out);
                    out.writer_running = false;
                    return;
                }
                Err(err) => {
                    // A send timeout (EAGAIN) means the peer took nothing for that long.
                    debug!("writer for {} stopped: {err}", self.peer);
                    self.cut(&mut out);
                    out.writer_running = false;
                    return;
                }
            }
        }
    }

    /// The close frame is out: shut the sending side (FIN) but keep reading, so the reader
    /// takes the client's answering close and ends on the EOF after it (data arriving after a
    /// full shutdown would make Linux reset the connection).
    fn finish_close(&self, out: &mut Outgoing) {
        out.flow = Flow::Closed;
        out.queue = Frames::default();
        let _ = self.stream.shutdown(Shutdown::Write);
    }

    fn cut(&self, out: &mut Outgoing) {
        out.flow = Flow::Dead;
        out.queue = Frames::default();
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// Ends the connection with a close frame. The server's own closes (`code` set with
    /// `from_server`: slow consumer, shutdown, bad input) drop what was queued and not
    /// started; the echo of the client's close keeps it. Before the handshake is done there is
    /// no WebSocket to close: the connection is cut.
    pub fn close(self: &Arc<Self>, frame: Frame, from_server: Option<CloseCode>) {
        if !self.handshake_done.load(Ordering::Acquire) {
            self.kill();
            return;
        }
        {
            let mut out = self.lock();
            if out.flow != Flow::Open {
                return;
            }
            if let Some(code) = from_server {
                self.server_close.store(code, Ordering::Release);
                out.queue.drop_unstarted();
            }
            out.flow = Flow::Closing;
            out.queue.push(frame);
        }
        self.flush();
    }

    /// The server ends the connection with `code` and a reason.
    pub fn close_with(self: &Arc<Self>, code: CloseCode, reason: &str) {
        self.close(Frame::close(Some((code, reason))), Some(code));
    }

    /// Drops a slow consumer: close 1008 goes out if the client still reads at all (a client
    /// that reads nothing costs its writer at most the send timeout), and its reader ends now,
    /// so the connection stops counting against the cap at once.
    pub fn evict(self: &Arc<Self>) {
        self.close_with(CLOSE_POLICY, "too slow: messages were piling up");
        let _ = self.stream.shutdown(Shutdown::Read);
    }

    /// Ends both directions now: a blocked read sees EOF, a blocked write fails.
    pub fn kill(&self) {
        self.cut(&mut self.lock());
    }
}

/// Client threads alive (readers and backlog writers), so shutdown can wait for none, and the
/// thread budget that a new one must fit.
pub struct ClientThreads {
    live: Mutex<usize>,
    changed: Condvar,
    /// Threads this process may have in all (see limits.rs).
    budget: usize,
}

/// Counts one client thread as alive until it is dropped at the thread's end.
pub struct ThreadGuard(Arc<ClientThreads>);

impl ClientThreads {
    pub fn new(budget: usize) -> Arc<ClientThreads> {
        Arc::new(ClientThreads {
            live: Mutex::new(0),
            changed: Condvar::new(),
            budget,
        })
    }

    fn lock(&self) -> MutexGuard<'_, usize> {
        self.live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts a thread about to start.
    pub fn guard(self: &Arc<Self>) -> ThreadGuard {
        *self.lock() += 1;
        ThreadGuard(Arc::clone(self))
    }

    /// Whether the process can start `threads` more threads and still keep the reserve
    /// (HTTP's threads and ours) within the budget. Counts every thread of the process.
    pub fn room_for(&self, threads: usize) -> bool {
        limits::process_threads() + threads + limits::RESERVED_THREADS <= self.budget
    }

    /// Counts a thread about to start, if the process has room for one more thread.
    fn try_reserve(self: &Arc<Self>) -> Option<ThreadGuard> {
        self.room_for(1).then(|| self.guard())
    }

    pub fn live(&self) -> usize {
        *self.lock()
    }

    /// Waits until no client thread is left, or until `deadline`; returns how many are left.
    pub fn wait_for_none(&self, deadline: Instant) -> usize {
        let mut live = self.lock();
        while *live > 0 {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            live = self
                .changed
                .wait_timeout(live, deadline - now)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|poisoned| poisoned.into_inner().0);
        }
        *live
    }
}

impl Drop for ThreadGuard {
    fn drop(&mut self) {
        *self.0.lock() -= 1;
        self.0.changed.notify_all();
    }
}

/// Every connection of the server, so shutdown and the heartbeat can reach those the hub does
/// not know (no `hello` yet). The reader adds its connection at the start and removes it at the
/// end.
#[derive(Default)]
pub struct ConnectionRegistry {
    connections: Mutex<HashMap<ClientId, Arc<Connection>>>,
}

impl ConnectionRegistry {
    fn lock(&self) -> MutexGuard<'_, HashMap<ClientId, Arc<Connection>>> {
        self.connections
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn add(&self, connection: &Arc<Connection>) {
        self.lock().insert(connection.id, Arc::clone(connection));
    }

    pub fn remove(&self, id: ClientId) {
        self.lock().remove(&id);
    }

    /// Every connection right now (taken under the lock, used after it is released).
    pub fn all(&self) -> Vec<Arc<Connection>> {
        self.lock().values().cloned().collect()
    }

    /// Closes every connection with 1001 (handshakes in progress are cut). Returns how many
    /// connections there were.
    pub fn close_all(&self) -> usize {
        let connections = self.all();
        for connection in &connections {
            connection.close_with(CLOSE_AWAY, "server shutting down");
        }
        connections.len()
    }

    /// Cuts every connection now.
    pub fn kill_all(&self) {
        for connection in self.all() {
            connection.kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;
    use tungstenite::Utf8Bytes;

    fn pair(limits: QueueLimits) -> (Arc<Connection>, TcpStream) {
        pair_with_budget(limits, usize::MAX)
    }

    /// A connection whose process may have at most `budget` threads.
    fn pair_with_budget(limits: QueueLimits, budget: usize) -> (Arc<Connection>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = listener.accept().unwrap();
        let connection = Connection::new(1, peer, server, limits, ClientThreads::new(budget));
        connection.opened();
        (connection, client)
    }

    fn text(s: &str) -> Frame {
        Frame::text(Utf8Bytes::from(s.to_owned()))
    }

    const ROOMY: QueueLimits = QueueLimits {
        frames: 1024,
        bytes: 1 << 20,
    };

    #[test]
    fn frames_queued_in_a_burst_leave_with_the_first_flush() {
        let (connection, mut client) = pair(ROOMY);
        assert_eq!(connection.offer(text("a")), Offer::Queued { flush: true });
        assert_eq!(connection.offer(text("b")), Offer::Queued { flush: false });
        connection.flush();
        assert_eq!(connection.backlog(), 0);
        let mut wire = [0u8; 6];
        client.read_exact(&mut wire).unwrap();
        assert_eq!(wire, [0x81, 1, b'a', 0x81, 1, b'b']);
    }

    #[test]
    fn limits_count_frames_and_bytes_and_let_one_big_frame_in() {
        let limits = QueueLimits {
            frames: 2,
            bytes: 100,
        };
        let (connection, _client) = pair(limits);
        let big = "x".repeat(500);
        assert_eq!(connection.offer(text(&big)), Offer::Queued { flush: true });
        assert_eq!(connection.offer(text("y")), Offer::Full);
        let (connection, _client) = pair(limits);
        connection.offer(text("1"));
        connection.offer(text("2"));
        assert_eq!(connection.offer(text("3")), Offer::Full);
    }

    #[test]
    fn a_backlog_without_a_thread_for_its_writer_closes_the_connection() {
        // No thread may start, so the first backlog ends the connection instead of aborting.
        let (connection, _client) = pair_with_budget(ROOMY, 0);
        let big = "z".repeat(60_000);
        let mut offers = 0;
        loop {
            offers += 1;
            assert!(offers < 10_000, "the socket never filled");
            match connection.offer(text(&big)) {
                Offer::Queued { .. } => connection.flush(),
                Offer::Gone => break,
                Offer::Full => panic!("cut before full: {offers}"),
            }
        }
        assert_eq!(connection.threads.live(), 0);
    }

    #[test]
    fn nothing_is_accepted_after_a_close_and_a_killed_connection_refuses() {
        let (connection, mut client) = pair(ROOMY);
        connection.offer(text("dropped: not started when the server closed"));
        connection.close_with(CLOSE_AWAY, "bye");
        assert_eq!(connection.offer(text("late")), Offer::Gone);
        let mut wire = Vec::new();
        client.read_to_end(&mut wire).unwrap(); // the FIN follows the close frame
        assert_eq!(wire[0], 0x88);
        assert_eq!(&wire[2..4], &1001u16.to_be_bytes());
        assert_eq!(connection.server_close(), Some(CLOSE_AWAY));

        let (connection, _client) = pair(ROOMY);
        connection.kill();
        assert_eq!(connection.offer(text("x")), Offer::Gone);
    }
}
