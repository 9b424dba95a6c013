//! One WebSocket connection's reader thread: the only thread a client costs while idle.
//!
//! The acceptor ([`crate::ws`]) spawns [`run_reader`] for each accepted socket. The reader does
//! the handshake, then turns every text frame into a command for the hub ([`crate::hub`]). It
//! never writes to the socket itself after the handshake: its answers (errors, pongs, the echo
//! of a close) go through the client's [`Connection`], like the hub's broadcasts, so one queue
//! decides the order of everything sent and only one thread writes at a time
//! ([`crate::connection`]).
//!
//! tungstenite's reading side writes by itself (auto-pongs, close echoes) at the start of its
//! next `read()`; if those bytes reached the socket they could land inside a frame another
//! thread is sending. So the reader's tungstenite object writes into a [`ReaderStream`] that
//! discards everything once the handshake is done, and the reader sends pongs and close echoes
//! through the connection instead.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use log::{debug, info};
use tungstenite::error::{CapacityError, ProtocolError};
use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::{Error as WsError, Message, WebSocket};

use crate::addresses::AddressSlot;
use crate::admission::Admission;
use crate::connection::{Connection, Offer, QueueLimits, CLOSE_POLICY};
use crate::handshake;
use crate::hub::{HubCommand, Join};
use crate::metrics::Refused;
use crate::protocol::{self, ClientFrame, ErrorCode, Refusal};
use crate::rate::TokenBucket;
use crate::room::ClientId;
use crate::shared::Shared;
use crate::wire::Frame;

/// Largest frame and largest message a client may send (64 KiB): beyond it, close 1009.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// The reader's read buffer. tungstenite's default (128 KiB) is zero-filled up front, so it would
/// be fully resident for every idle client. 1 KiB holds a typical chat frame; a bigger frame makes
/// tungstenite reserve room for its whole payload (at most 64 KiB) and read it in a few calls.
/// Measured at 1,000 idle clients: 4 KiB → 1 KiB saves 3 KiB of RSS per client.
const READ_BUFFER_BYTES: usize = 1024;
/// The reader's stack. Only touched pages cost memory, but an overflow aborts the whole server,
/// so this leaves room for serde_json and the handshake parser.
pub const READER_STACK_BYTES: usize = 256 * 1024;
/// Close codes the reader sends for bad input (RFC 6455, section 7.4.1).
const CLOSE_PROTOCOL: u16 = 1002;
const CLOSE_INVALID: u16 = 1007;
const CLOSE_TOO_BIG: u16 = 1009;
/// `typing` is relayed at most this often per client.
const TYPING_INTERVAL: Duration = Duration::from_secs(2);

/// What a reader thread needs besides its socket.
pub struct ReaderContext {
    pub shared: Arc<Shared>,
    pub hub: Sender<HubCommand>,
    pub admission: Arc<Admission>,
}

/// The reader's view of the socket for tungstenite: reads go to the socket; writes (its
/// auto-pongs and close echoes) are discarded, see the module comment.
struct ReaderStream(Arc<Connection>);

impl Read for ReaderStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.stream().read(buf)
    }
}

impl Write for ReaderStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Why no request head was read.
enum HeadError {
    /// A refusal, to be counted: a head too long, or too slow.
    Refused(Refused, &'static str),
    /// The peer closed or reset the connection first: it left (a port probe, a closed tab);
    /// nobody refused it.
    Left(String),
}

/// Reads the handshake's request head: at most [`handshake::MAX_HEAD_BYTES`], all of it
/// before `deadline` however slowly it drips (a socket timeout counts per read, so each read
/// gets only the time that is left). Returns the bytes read, the head and whatever followed.
fn read_head(stream: &TcpStream, deadline: Instant) -> Result<Vec<u8>, HeadError> {
    let too_slow = HeadError::Refused(Refused::HandshakeTimeout, "handshake too slow");
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while handshake::head_end(&head).is_none() {
        if head.len() >= handshake::MAX_HEAD_BYTES {
            return Err(HeadError::Refused(
                Refused::BadRequest,
                "request head too long",
            ));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(too_slow);
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| HeadError::Left(e.to_string()))?;
        let room = (handshake::MAX_HEAD_BYTES - head.len()).min(chunk.len());
        match (&*stream).read(&mut chunk[..room]) {
            Ok(0) => return Err(HeadError::Left("closed during the handshake".into())),
            Ok(n) => head.extend_from_slice(&chunk[..n]),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(too_slow)
            }
            Err(err) => return Err(HeadError::Left(err.to_string())),
        }
    }
    Ok(head)
}

/// Reads and answers the handshake. Returns the room and the bytes read after the head, or
/// why the connection is refused (its answer has been written).
fn handshake(
    connection: &Connection,
    address: &mut Option<AddressSlot>,
    ctx: &ReaderContext,
) -> Result<(String, Vec<u8>), String> {
    let stream = connection.stream();
    let peer = connection.peer;
    let deadline = Instant::now() + ctx.shared.config.handshake_timeout;
    let head = read_head(stream, deadline).map_err(|error| match error {
        HeadError::Refused(reason, why) => {
            ctx.admission
                .count_refusal(reason, || format!("{peer}: handshake: {why}"));
            why.to_owned()
        }
        HeadError::Left(why) => why,
    })?;
    let checked = handshake::parse(&head)
        .inspect_err(|refusal| {
            ctx.admission.count_refusal(Refused::BadRequest, || {
                format!("{peer}: handshake: {}", refusal.body.trim_end())
            })
        })
        .and_then(|opening| {
            let room = ctx.admission.check_request(&opening, peer, address)?;
            Ok((room, opening))
        });
    match checked {
        Ok((room, opening)) => {
            (&*stream)
                .write_all(handshake::accept(&opening).as_bytes())
                .map_err(|e| e.to_string())?;
            Ok((room, opening.rest))
        }
        Err(refusal) => {
            let _ = (&*stream).write_all(handshake::refuse(&refusal).as_bytes());
            Err(format!("refused with {}", refusal.status))
        }
    }
}

fn reader_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES))
}

/// The body of a reader thread: handshake, then read until the end.
/// `address` is the connection's place in its address's limits: taken by the acceptor, or
/// `None` for a connection from a trusted proxy until its handshake names the client.
pub fn run_reader(
    stream: TcpStream,
    peer: SocketAddr,
    id: ClientId,
    mut address: Option<AddressSlot>,
    ctx: ReaderContext,
) {
    let config = &ctx.shared.config;
    let _ = stream.set_nodelay(true);
    // Bounds each blocking write of a backlog writer: a peer that takes nothing this long is
    // dead.
    let _ = stream.set_write_timeout(Some(config.write_timeout));
    let limits = QueueLimits {
        frames: config.outbound_capacity,
        bytes: config.outbound_bytes,
    };
    let threads = Arc::clone(&ctx.shared.client_threads);
    let connection = Connection::new(id, peer, stream, limits, threads);
    ctx.shared.connections.add(&connection);
    let outcome = serve(&connection, &mut address, &ctx);
    ctx.shared.connections.remove(id);
    match outcome {
        // A close frame in the connection's queue still gets out (its writer holds the
        // connection); anything else has been cut already.
        Some((room, reason)) => {
            info!("disconnect id={id} peer={peer}: {reason}");
            debug!("disconnect id={id} room={room}");
        }
        None => {
            connection.kill();
            debug!("handshake with {peer} did not complete");
        }
    }
}

/// Runs one connection; returns the room and why it ended, or `None` if the handshake failed.
fn serve(
    connection: &Arc<Connection>,
    address: &mut Option<AddressSlot>,
    ctx: &ReaderContext,
) -> Option<(String, String)> {
    let peer = connection.peer;
    let (room, rest) = match handshake(connection, address, ctx) {
        Ok(opened) => opened,
        Err(why) => {
            debug!("handshake from {peer} failed: {why}");
            return None;
        }
    };
    let _ = connection
        .stream()
        .set_read_timeout(Some(ctx.shared.config.idle_timeout));
    let mut socket = WebSocket::from_partially_read(
        ReaderStream(Arc::clone(connection)),
        rest,
        Role::Server,
        Some(reader_config()),
    );
    connection.opened();
    ctx.shared
        .metrics
        .connections_opened
        .fetch_add(1, Ordering::Relaxed);
    // A room's name is its key (knowing it is being let in): never at info level, where
    // logs are kept and shipped; at debug for someone chasing a problem on their own host.
    info!("connect id={} peer={peer}", connection.id);
    debug!("connect id={} room={room}", connection.id);

    let reason = read_frames(&mut socket, &room, address.as_ref(), connection, ctx);
    let _ = ctx.hub.send(HubCommand::Leave {
        client: connection.id,
    });
    Some((room, reason))
}

/// Per-connection state of the reading loop.
struct Session<'a> {
    room: &'a str,
    /// The address's share of the say rate, across its connections.
    address: Option<&'a AddressSlot>,
    joined: bool,
    rate: Option<TokenBucket>,
    last_typing: Option<Instant>,
}

/// Reads frames until the connection ends; returns why it ended.
fn read_frames(
    socket: &mut WebSocket<ReaderStream>,
    room: &str,
    address: Option<&AddressSlot>,
    connection: &Arc<Connection>,
    ctx: &ReaderContext,
) -> String {
    let mut session = Session {
        room,
        address,
        joined: false,
        rate: ctx
            .shared
            .config
            .rate_limit
            .map(|limit| TokenBucket::new(limit, Instant::now())),
        last_typing: None,
    };
    // What the reader sends goes through the connection's queue; if the client lets that
    // fill, the frame is dropped (the hub will find the client full and drop it).
    let send_error = |refusal: &Refusal| {
        let _: Offer = connection.send(Frame::text(protocol::encode_error(refusal)));
    };
    let config = &ctx.shared.config;
    // Until `hello`, reads wait no longer than the hello deadline; then the idle timeout.
    let hello_deadline = Instant::now() + config.hello_timeout;
    let peer = connection.peer;
    let no_hello = || {
        ctx.admission
            .count_refusal(Refused::NoHello, || format!("{peer}: no hello in time"));
        connection.close_with(CLOSE_POLICY, "no hello in time");
        String::from("no hello in time")
    };
    let mut waiting_for_hello = true;
    loop {
        if waiting_for_hello {
            let wait = if session.joined {
                waiting_for_hello = false;
                config.idle_timeout
            } else {
                let left = hello_deadline.saturating_duration_since(Instant::now());
                // Checked here too: frames that keep coming would never let a read time out.
                if left.is_zero() {
                    return no_hello();
                }
                left.min(config.idle_timeout)
            };
            let _ = connection.stream().set_read_timeout(Some(wait));
        }
        match socket.read() {
            Ok(Message::Text(text)) => {
                if let Err(refusal) = handle_text(text.as_str(), &mut session, connection, ctx) {
                    send_error(&refusal);
                }
            }
            Ok(Message::Binary(_)) => {
                let refusal = Refusal::new(
                    ErrorCode::BadRequest,
                    "Binary frames are not understood; send JSON text.",
                );
                send_error(&refusal);
            }
            Ok(Message::Ping(payload)) => {
                connection.send(Frame::pong(payload));
            }
            Ok(Message::Pong(_)) | Ok(Message::Frame(_)) => {}
            Ok(Message::Close(frame)) => {
                let echo = frame.map(|f| (u16::from(f.code), f.reason));
                let echo = echo.as_ref().map(|(code, reason)| (*code, reason.as_str()));
                connection.close(Frame::close(echo), None);
                return "closed by client".into();
            }
            Err(WsError::Capacity(CapacityError::MessageTooLong { .. })) => {
                connection.close_with(CLOSE_TOO_BIG, "message too big");
                return "message too big".into();
            }
            Err(WsError::Utf8(_)) => {
                connection.close_with(CLOSE_INVALID, "invalid UTF-8");
                return "invalid UTF-8".into();
            }
            // The hub asked this connection to close (slow consumer: it shut our reading side):
            // the writer sends the close frame and ends the socket.
            Err(_) if connection.server_close().is_some() => {
                return "closed by the server".into();
            }
            Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => {
                connection.kill();
                return "connection reset".into();
            }
            Err(WsError::Protocol(err)) => {
                connection.close_with(CLOSE_PROTOCOL, "protocol error");
                return format!("protocol error: {err}");
            }
            Err(WsError::Io(err))
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if !session.joined && Instant::now() >= hello_deadline {
                    return no_hello();
                }
                connection.kill();
                return "silent for too long".into();
            }
            Err(err) => {
                connection.kill();
                return format!("connection lost: {err}");
            }
        }
    }
}

/// Handles one text frame: a refusal becomes an error frame for this client only.
fn handle_text(
    text: &str,
    session: &mut Session<'_>,
    connection: &Arc<Connection>,
    ctx: &ReaderContext,
) -> Result<(), Refusal> {
    let client = connection.id;
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
            let link = Arc::clone(connection);
            let _ = ctx.hub.send(HubCommand::Join(Join {
                client,
                room: session.room.to_owned(),
                name,
                session: person,
                since,
                epoch,
                link,
            }));
        }
        ClientFrame::Say { text, cid } => {
            if !session.joined {
                return Err(not_joined());
            }
            if !session.within_rate(ctx) {
                return Err(Refusal::new(
                    ErrorCode::RateLimited,
                    "You are sending messages too fast; this one was not sent.",
                )
                .of_text(&text));
            }
            let _ = ctx.hub.send(HubCommand::Say { client, text, cid });
        }
        ClientFrame::History { before, limit } => {
            if !session.joined {
                return Err(not_joined());
            }
            // Each page costs a read of the disk: limited like says, from the same bucket.
            if !session.within_rate(ctx) {
                return Err(Refusal::new(
                    ErrorCode::RateLimited,
                    "You are asking for history too fast; try again in a moment.",
                ));
            }
            let _ = ctx.hub.send(HubCommand::History {
                client,
                before,
                limit,
            });
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

impl Session<'_> {
    /// Takes a token from the client's bucket, then (only if that allowed it: a client over
    /// its own limit must not spend its neighbours' share) from its address's.
    fn within_rate(&mut self, ctx: &ReaderContext) -> bool {
        let now = Instant::now();
        let client_ok = self.rate.as_mut().is_none_or(|rate| rate.try_take(now));
        if client_ok && self.address.is_none_or(|slot| slot.try_say(now)) {
            return true;
        }
        ctx.shared
            .metrics
            .says_rate_limited
            .fetch_add(1, Ordering::Relaxed);
        false
    }
}

fn not_joined() -> Refusal {
    Refusal::new(ErrorCode::NotJoined, "Say hello (choose a name) first.")
}
