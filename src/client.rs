//! One WebSocket connection: its reader thread and its writer thread.
//!
//! The acceptor ([`crate::ws`]) spawns [`run_reader`] for each accepted socket. The reader does
//! the handshake, then spawns [`run_writer`], then turns every text frame into a command for the
//! hub ([`crate::hub`]). The writer drains the client's bounded outbound queue, which the hub
//! (broadcasts) and the reader (errors, pongs, close echoes) fill.
//!
//! Invariant: **exactly one thread writes to each socket: the writer.** tungstenite's reading
//! side writes by itself (auto-pongs, close echoes); if those bytes reached the socket they could
//! land inside a frame the writer is sending. So the reader's tungstenite object writes into a
//! [`ReaderStream`] that discards everything once the handshake is done, and the reader forwards
//! pings and closes to the writer instead. Both threads share one `Arc<TcpStream>` (one file
//! descriptor); `shutdown(Both)` is the kill switch that ends a blocked read or write.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use log::{debug, info, warn};
use tungstenite::error::{CapacityError, ProtocolError};
use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::{Bytes, Error as WsError, Message, Utf8Bytes, WebSocket};

use crate::hub::{HubCommand, MemberLink};
use crate::outbox::{self, Inbox, Taken};
use crate::protocol::{self, ClientFrame, ErrorCode, Refusal};
use crate::rate::TokenBucket;
use crate::room::ClientId;
use crate::ws::Admission;
use crate::{Shared, ThreadGuard};

/// Largest frame and largest message a client may send (64 KiB): beyond it, close 1009.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// The reader's read buffer. tungstenite's default (128 KiB) is zero-filled up front, so it would
/// be fully resident for every idle client. 1 KiB holds a typical chat frame; a bigger frame makes
/// tungstenite reserve room for its whole payload (at most 64 KiB) and read it in a few calls.
/// Measured at 1,000 idle clients: 4 KiB → 1 KiB saves 3 KiB of RSS per client.
const READ_BUFFER_BYTES: usize = 1024;
/// The writer sends once this much is buffered, and always at the end of a batch.
const WRITE_BUFFER_BYTES: usize = 16 * 1024;
/// A client must finish its handshake this long after it was accepted, however slowly it
/// drips its bytes, or its slot is given back.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Stack sizes. Only touched pages cost memory, but an overflow aborts the whole server, so
/// these leave room for serde_json and the handshake parser.
pub const READER_STACK_BYTES: usize = 256 * 1024;
pub const WRITER_STACK_BYTES: usize = 128 * 1024;
/// `typing` is relayed at most this often per client.
const TYPING_INTERVAL: Duration = Duration::from_secs(2);

/// What the writer sends. Text frames come from the hub (shared, encoded once) and from the
/// reader (error frames); pongs and close frames come from the reader.
#[derive(Debug)]
pub enum Outbound {
    Text(Utf8Bytes),
    Pong(Bytes),
    Close(Option<CloseFrame>),
    /// Nothing to send: wakes the writer so it looks at its close code.
    Wake,
}

/// A client's outbound queue as its senders hold it (see [`crate::outbox`]).
pub type Outbox = crate::outbox::Outbox<Outbound>;

impl crate::outbox::Weigh for Outbound {
    fn bytes(&self) -> usize {
        match self {
            Outbound::Text(text) => text.len(),
            Outbound::Pong(payload) => payload.len(),
            Outbound::Close(_) | Outbound::Wake => 0,
        }
    }
}

/// Shared by a connection's two threads and the hub: who the peer is, the socket's kill switch,
/// and a close code set by whoever wants the connection gone.
pub struct ClientControl {
    pub id: ClientId,
    pub peer: SocketAddr,
    stream: Arc<TcpStream>,
    /// 0 = keep going; otherwise the close code the writer sends before it hangs up.
    close_code: AtomicU16,
}

impl ClientControl {
    /// Asks the writer to send a close frame with `code` and end the connection. Used by the hub
    /// (slow consumer: 1008; shutdown: 1001); it never blocks.
    pub fn close(&self, code: CloseCode) {
        let _ = self.close_code.compare_exchange(
            0,
            u16::from(code),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    fn requested_close(&self) -> Option<CloseCode> {
        match self.close_code.load(Ordering::Acquire) {
            0 => None,
            code => Some(CloseCode::from(code)),
        }
    }

    /// Drops a slow consumer: its writer sends close 1008 if the client still reads at all (a
    /// client that reads nothing costs its writer at most the write timeout), and its reader
    /// ends now, so the connection stops counting against the cap at once.
    pub fn evict(&self) {
        self.close(CloseCode::Policy);
        let _ = self.stream.shutdown(Shutdown::Read);
    }

    /// Ends both directions now: a blocked read sees EOF, a blocked write fails.
    pub fn kill(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// Every connection of the server, so shutdown can reach those the hub does not know (no
/// `hello` yet). The reader adds its connection at the start and removes it at the end.
#[derive(Default)]
pub struct ConnectionRegistry {
    connections: Mutex<HashMap<ClientId, Registered>>,
}

enum Registered {
    /// Still in the handshake: no writer yet, so it can only be cut.
    Handshaking(Arc<TcpStream>),
    /// Open: its writer can send a close frame.
    Open(Arc<ClientControl>, Outbox),
}

impl ConnectionRegistry {
    fn lock(&self) -> MutexGuard<'_, HashMap<ClientId, Registered>> {
        self.connections
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn add(&self, id: ClientId, stream: &Arc<TcpStream>) {
        self.lock()
            .insert(id, Registered::Handshaking(Arc::clone(stream)));
    }

    fn opened(&self, control: &Arc<ClientControl>, outbox: &Outbox) {
        self.lock().insert(
            control.id,
            Registered::Open(Arc::clone(control), outbox.clone()),
        );
    }

    fn remove(&self, id: ClientId) {
        self.lock().remove(&id);
    }

    /// Asks every open connection's writer to close with 1001 and cuts every handshake.
    /// Returns how many connections there were.
    pub fn close_all(&self) -> usize {
        let connections = self.lock();
        for connection in connections.values() {
            match connection {
                Registered::Handshaking(stream) => {
                    let _ = stream.shutdown(Shutdown::Both);
                }
                Registered::Open(control, outbox) => {
                    control.close(CloseCode::Away);
                    // Wake a writer waiting for frames; a full queue means it is awake anyway.
                    outbox.offer(Outbound::Wake);
                }
            }
        }
        connections.len()
    }

    /// Cuts every connection now.
    pub fn kill_all(&self) {
        for connection in self.lock().values() {
            match connection {
                Registered::Handshaking(stream) => {
                    let _ = stream.shutdown(Shutdown::Both);
                }
                Registered::Open(control, _) => control.kill(),
            }
        }
    }
}

/// What a reader thread needs besides its socket.
pub struct ReaderContext {
    pub shared: Arc<Shared>,
    pub hub: Sender<HubCommand>,
    pub admission: Arc<Admission>,
}

/// The reader's view of the socket: reads go to the socket, writes go through only until the
/// handshake is done, then are discarded (see the module comment).
struct ReaderStream {
    stream: Arc<TcpStream>,
    discard_writes: bool,
    /// While the handshake runs: when it must be over. A socket timeout counts per read, so
    /// each read gets only the time that is left.
    handshake_deadline: Option<Instant>,
}

impl Read for ReaderStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(deadline) = self.handshake_deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            self.stream.set_read_timeout(Some(left))?;
        }
        (&*self.stream).read(buf)
    }
}

impl Write for ReaderStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.discard_writes {
            Ok(buf.len())
        } else {
            (&*self.stream).write(buf)
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The writer's view of the socket: it only ever writes.
struct WriterStream(Arc<TcpStream>);

impl Read for WriterStream {
    fn read(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        // The writer's tungstenite object never reads; the reader owns that direction.
        Ok(0)
    }
}

impl Write for WriterStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self.0).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        (&*self.0).flush()
    }
}

fn reader_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES))
}

fn writer_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(0)
        .write_buffer_size(WRITE_BUFFER_BYTES)
}

/// The body of a reader thread: handshake, spawn the writer, then read until the end.
/// `_guard` keeps the connection counted (and the thread tracked) until this returns.
pub fn run_reader(stream: TcpStream, peer: SocketAddr, id: ClientId, ctx: ReaderContext) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(ctx.shared.config.write_timeout));
    let stream = Arc::new(stream);
    ctx.shared.connections.add(id, &stream);
    let outcome = serve(&stream, peer, id, &ctx);
    ctx.shared.connections.remove(id);
    match outcome {
        // The writer (or the reader's own kill switch) ends the socket: a close frame handed to
        // the writer must get out before the connection is cut.
        Some((room, reason)) => info!("disconnect room={room} peer={peer}: {reason}"),
        None => {
            let _ = stream.shutdown(Shutdown::Both);
            debug!("handshake with {peer} did not complete");
        }
    }
}

/// Runs one connection; returns the room and why it ended, or `None` if the handshake failed.
// tungstenite's handshake `Callback` type fixes the closure's large `Err` type.
#[allow(clippy::result_large_err)]
fn serve(
    stream: &Arc<TcpStream>,
    peer: SocketAddr,
    id: ClientId,
    ctx: &ReaderContext,
) -> Option<(String, String)> {
    let config = &ctx.shared.config;
    let mut room = None;
    let callback = |request: &Request, response: Response| -> Result<Response, ErrorResponse> {
        room = Some(
            ctx.admission
                .check_request(request)
                .map_err(|refusal| *refusal)?,
        );
        Ok(response)
    };
    let reader_side = ReaderStream {
        stream: Arc::clone(stream),
        discard_writes: false,
        handshake_deadline: Some(Instant::now() + HANDSHAKE_TIMEOUT),
    };
    let mut socket =
        match tungstenite::accept_hdr_with_config(reader_side, callback, Some(reader_config())) {
            Ok(socket) => socket,
            Err(err) => {
                debug!("handshake from {peer} failed: {err}");
                return None;
            }
        };
    let room = room.expect("the callback ran and accepted");
    socket.get_mut().discard_writes = true;
    socket.get_mut().handshake_deadline = None;
    let _ = stream.set_read_timeout(Some(config.idle_timeout));
    info!("connect room={room} peer={peer}");

    let control = Arc::new(ClientControl {
        id,
        peer,
        stream: Arc::clone(stream),
        close_code: AtomicU16::new(0),
    });
    let (outbox, inbox) = outbox::outbox(config.outbound_capacity, config.outbound_bytes);
    let writer = {
        let control = Arc::clone(&control);
        let guard = ThreadGuard::new(&ctx.shared);
        let ping_interval = config.ping_interval;
        std::thread::Builder::new()
            .name(format!("ws-writer-{id}"))
            .stack_size(WRITER_STACK_BYTES)
            .spawn(move || {
                let _guard = guard;
                run_writer(inbox, control, ping_interval);
            })
    };
    if writer.is_ok() {
        ctx.shared.connections.opened(&control, &outbox);
    }
    if let Err(err) = writer {
        control.kill();
        warn!("cannot start a writer thread for {peer}: {err}; closing it");
        return Some((room, "no thread for its writer".into()));
    }

    let reason = read_frames(&mut socket, &room, &control, &outbox, ctx);
    let _ = ctx.hub.send(HubCommand::Leave { client: id });
    Some((room, reason))
}

/// Per-connection state of the reading loop.
struct Session<'a> {
    room: &'a str,
    joined: bool,
    rate: Option<TokenBucket>,
    last_typing: Option<Instant>,
}

/// Reads frames until the connection ends; returns why it ended.
fn read_frames(
    socket: &mut WebSocket<ReaderStream>,
    room: &str,
    control: &Arc<ClientControl>,
    outbox: &Outbox,
    ctx: &ReaderContext,
) -> String {
    let mut session = Session {
        room,
        joined: false,
        rate: ctx
            .shared
            .config
            .rate_limit
            .map(|limit| TokenBucket::new(limit, Instant::now())),
        last_typing: None,
    };
    let close_with = |code: CloseCode, reason: &str| {
        outbox.offer(Outbound::Close(Some(CloseFrame {
            code,
            reason: reason.to_owned().into(),
        })));
    };
    loop {
        match socket.read() {
            Ok(Message::Text(text)) => {
                if let Err(refusal) = handle_text(text.as_str(), &mut session, control, outbox, ctx)
                {
                    outbox.offer(Outbound::Text(protocol::encode_error(&refusal)));
                }
            }
            Ok(Message::Binary(_)) => {
                let refusal = Refusal::new(
                    ErrorCode::BadRequest,
                    "Binary frames are not understood; send JSON text.",
                );
                outbox.offer(Outbound::Text(protocol::encode_error(&refusal)));
            }
            Ok(Message::Ping(payload)) => {
                outbox.offer(Outbound::Pong(payload));
            }
            Ok(Message::Pong(_)) | Ok(Message::Frame(_)) => {}
            Ok(Message::Close(frame)) => {
                outbox.offer(Outbound::Close(frame));
                return "closed by client".into();
            }
            Err(WsError::Capacity(CapacityError::MessageTooLong { .. })) => {
                close_with(CloseCode::Size, "message too big");
                return "message too big".into();
            }
            Err(WsError::Utf8(_)) => {
                close_with(CloseCode::Invalid, "invalid UTF-8");
                return "invalid UTF-8".into();
            }
            // The hub asked this connection to close (slow consumer: it shut our reading side):
            // the writer sends the close frame and ends the socket.
            Err(_) if control.requested_close().is_some() => {
                return "closed by the server".into();
            }
            Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => {
                control.kill();
                return "connection reset".into();
            }
            Err(WsError::Protocol(err)) => {
                close_with(CloseCode::Protocol, "protocol error");
                return format!("protocol error: {err}");
            }
            Err(WsError::Io(err))
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                control.kill();
                return "silent for too long".into();
            }
            Err(err) => {
                control.kill();
                return format!("connection lost: {err}");
            }
        }
    }
}

/// Handles one text frame: a refusal becomes an error frame for this client only.
fn handle_text(
    text: &str,
    session: &mut Session<'_>,
    control: &Arc<ClientControl>,
    outbox: &Outbox,
    ctx: &ReaderContext,
) -> Result<(), Refusal> {
    let client = control.id;
    match protocol::parse_client_frame(text)? {
        ClientFrame::Hello {
            name,
            since,
            epoch,
            session: person,
        } => {
            if session.joined {
                return Err(Refusal::new(
                    ErrorCode::BadRequest,
                    "You have already said hello on this connection.",
                ));
            }
            session.joined = true;
            let link = MemberLink {
                outbox: outbox.clone(),
                control: Arc::clone(control),
            };
            let _ = ctx.hub.send(HubCommand::Join {
                client,
                room: session.room.to_owned(),
                name,
                session: person,
                since,
                epoch,
                link,
            });
        }
        ClientFrame::Say { text } => {
            if !session.joined {
                return Err(not_joined());
            }
            if let Some(rate) = &mut session.rate {
                if !rate.try_take(Instant::now()) {
                    return Err(Refusal::new(
                        ErrorCode::RateLimited,
                        "You are sending messages too fast; this one was not sent.",
                    )
                    .of_text(&text));
                }
            }
            let _ = ctx.hub.send(HubCommand::Say { client, text });
        }
        ClientFrame::Typing => {
            if !session.joined {
                return Err(not_joined());
            }
            let now = Instant::now();
            let due = session
                .last_typing
                .is_none_or(|last| now.duration_since(last) >= TYPING_INTERVAL);
            if due {
                session.last_typing = Some(now);
                let _ = ctx.hub.send(HubCommand::Typing { client });
            }
        }
    }
    Ok(())
}

fn not_joined() -> Refusal {
    Refusal::new(ErrorCode::NotJoined, "Say hello (choose a name) first.")
}

/// The body of a writer thread: sends everything queued, pings on a clock, and is the only
/// thread that writes to the socket.
fn run_writer(inbox: Inbox<Outbound>, control: Arc<ClientControl>, ping_interval: Duration) {
    let mut socket = WebSocket::from_raw_socket(
        WriterStream(Arc::clone(&control.stream)),
        Role::Server,
        Some(writer_config()),
    );
    let mut next_ping = Instant::now() + ping_interval;
    let result: Result<(), WsError> = loop {
        // Checked after every batch too: a client that only listens to a busy room must still
        // be pinged, or its silence would look like a dead peer to its reader.
        if Instant::now() >= next_ping {
            next_ping = Instant::now() + ping_interval;
            if let Err(err) = socket.send(Message::Ping(Bytes::new())) {
                break Err(err);
            }
        }
        match inbox.take_all(next_ping) {
            Taken::Frames(frames) => match write_batch(&mut socket, frames, &control) {
                Ok(true) => {}
                Ok(false) => break Ok(()),
                Err(err) => break Err(err),
            },
            Taken::TimedOut => {}
            // Reader, hub and registry are all done with this client.
            Taken::Closed => break Err(WsError::ConnectionClosed),
        }
    };
    match result {
        // A close frame went out. Send FIN but keep reading: the reader takes the client's
        // answering close frame (data arriving after a full shutdown would make Linux reset
        // the connection) and ends on the EOF that follows.
        Ok(()) => {
            let _ = control.stream.shutdown(Shutdown::Write);
        }
        Err(err) => {
            debug!("writer for {} stopped: {err}", control.peer);
            control.kill();
        }
    }
}

/// Writes a batch of frames into tungstenite's buffer, then flushes once: one write system call
/// for a burst of messages is what makes fan-out fast. Returns `false` once a close frame has
/// been sent.
fn write_batch(
    socket: &mut WebSocket<WriterStream>,
    frames: VecDeque<Outbound>,
    control: &ClientControl,
) -> Result<bool, WsError> {
    for frame in frames {
        if control.requested_close().is_some() {
            break; // What is still queued is dropped; the close frame goes next.
        }
        match frame {
            Outbound::Text(text) => socket.write(Message::Text(text))?,
            Outbound::Pong(payload) => socket.write(Message::Pong(payload))?,
            Outbound::Wake => {}
            Outbound::Close(frame) => {
                send_close(socket, frame)?;
                return Ok(false);
            }
        }
    }
    if let Some(code) = control.requested_close() {
        let reason = match code {
            CloseCode::Policy => "too slow: messages were piling up",
            _ => "server shutting down",
        };
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        send_close(socket, Some(frame))?;
        return Ok(false);
    }
    socket.flush()?;
    Ok(true)
}

/// Sends a close frame (a fresh one, or the echo of the client's) and flushes.
fn send_close(
    socket: &mut WebSocket<WriterStream>,
    frame: Option<CloseFrame>,
) -> Result<(), WsError> {
    match socket.close(frame) {
        Ok(()) | Err(WsError::ConnectionClosed) | Err(WsError::AlreadyClosed) => {}
        Err(err) => return Err(err),
    }
    socket.flush()
}
