//! WebSocket client plumbing shared by the workloads: connecting, `hello`, and cheap frame
//! classification that parses only what the measurement needs.
//!
//! Bench messages carry `b:<sender>:<seq>:<nanos>[:padding]` as their text, where `nanos` is the
//! send time on this process's monotonic clock ([`now_nanos`]); a receiver finds `"text":"b:`
//! with a precomputed substring search and reads three integers: no JSON parsing, no allocation.

use futures_util::SinkExt;
use memchr::memmem::Finder;
use std::net::SocketAddr;
use std::sync::LazyLock;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// A connected client.
pub type Ws = WebSocketStream<TcpStream>;

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Starts the clock that message timestamps are relative to.
pub fn init_clock() {
    LazyLock::force(&EPOCH);
}

/// Nanoseconds since [`init_clock`] on the monotonic clock.
pub fn now_nanos() -> u64 {
    EPOCH.elapsed().as_nanos() as u64
}

/// How to open a connection.
#[derive(Clone, Copy, Debug)]
pub struct ConnectOpts {
    /// tungstenite's read buffer (eagerly allocated per client).
    pub read_buffer: usize,
    /// SO_RCVBUF for the socket (a small one makes a stalled reader stall sooner).
    pub rcvbuf: Option<usize>,
    /// Give up on connect + handshake after this long.
    pub timeout: Duration,
}

impl Default for ConnectOpts {
    fn default() -> Self {
        ConnectOpts {
            read_buffer: 64 * 1024,
            rcvbuf: None,
            timeout: Duration::from_secs(10),
        }
    }
}

/// Why a connection attempt failed.
#[derive(Debug)]
pub enum ConnectError {
    /// The handshake got an HTTP status other than 101.
    Status(u16),
    /// Connect + handshake took longer than [`ConnectOpts::timeout`].
    Timeout,
    /// Anything else (refused, reset, protocol error).
    Other(String),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Status(s) => write!(f, "HTTP {s}"),
            ConnectError::Timeout => write!(f, "timeout"),
            ConnectError::Other(e) => write!(f, "{e}"),
        }
    }
}

/// Opens `ws://addr/ws/{room}` with TCP_NODELAY.
pub async fn connect(addr: SocketAddr, room: &str, opts: ConnectOpts) -> Result<Ws, ConnectError> {
    let fut = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| ConnectError::Other(format!("connect: {e}")))?;
        stream
            .set_nodelay(true)
            .map_err(|e| ConnectError::Other(format!("nodelay: {e}")))?;
        if let Some(n) = opts.rcvbuf {
            socket2::SockRef::from(&stream)
                .set_recv_buffer_size(n)
                .map_err(|e| ConnectError::Other(format!("rcvbuf: {e}")))?;
        }
        let cfg = WebSocketConfig::default()
            .read_buffer_size(opts.read_buffer)
            .write_buffer_size(0);
        let url = format!("ws://{addr}/ws/{room}");
        match tokio_tungstenite::client_async_with_config(url, stream, Some(cfg)).await {
            Ok((ws, _resp)) => Ok(ws),
            Err(WsError::Http(resp)) => Err(ConnectError::Status(resp.status().as_u16())),
            Err(e) => Err(ConnectError::Other(format!("handshake: {e}"))),
        }
    };
    match tokio::time::timeout(opts.timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Timeout),
    }
}

/// Sends `{"type":"hello","name":NAME}` (NAME must need no JSON escaping).
pub async fn hello(ws: &mut Ws, name: &str) -> Result<(), WsError> {
    ws.send(Message::text(format!(
        "{{\"type\":\"hello\",\"name\":\"{name}\"}}"
    )))
    .await
}

/// A `say` whose text is `b:<sender>:<seq>:<now>` followed by `pad` (which must need no escaping).
pub fn bench_say(sender: u32, seq: u64, pad: &str) -> Message {
    Message::text(format!(
        "{{\"type\":\"say\",\"text\":\"b:{sender}:{seq}:{}{pad}\"}}",
        now_nanos()
    ))
}

/// What a server frame is, as far as the benchmark cares.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A `message` carrying a bench text.
    Bench {
        /// Sender id.
        sender: u32,
        /// Sender's sequence number.
        seq: u64,
        /// Send time, [`now_nanos`] clock.
        nanos: u64,
    },
    /// The reply to `hello`.
    Welcome,
    /// `joined`.
    Joined,
    /// `left`, with the raw (JSON-escaped) name.
    Left(&'a [u8]),
    /// `error`.
    Error,
    /// Anything else (typing, non-bench messages).
    Other,
}

static TEXT_B: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"text\":\"b:"));
static T_MESSAGE: LazyLock<Finder<'static>> =
    LazyLock::new(|| Finder::new(b"\"type\":\"message\""));
static T_WELCOME: LazyLock<Finder<'static>> =
    LazyLock::new(|| Finder::new(b"\"type\":\"welcome\""));
static T_JOINED: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"type\":\"joined\""));
static T_LEFT: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"type\":\"left\""));
static T_ERROR: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"type\":\"error\""));
static HISTORY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"history\":"));
static NAME: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"name\":\""));

const MESSAGE_PREFIX: &[u8] = b"{\"type\":\"message\"";

/// Classifies one text frame. Fast path: a frame that starts with `{"type":"message"`.
pub fn classify(b: &[u8]) -> Frame<'_> {
    if b.starts_with(MESSAGE_PREFIX) || (T_MESSAGE.find(b).is_some() && HISTORY.find(b).is_none()) {
        return match TEXT_B.find(b) {
            Some(i) => parse_bench(&b[i + 10..]).unwrap_or(Frame::Other),
            None => Frame::Other,
        };
    }
    if T_WELCOME.find(b).is_some() {
        return Frame::Welcome;
    }
    if T_JOINED.find(b).is_some() {
        return Frame::Joined;
    }
    if T_LEFT.find(b).is_some() {
        if let Some(i) = NAME.find(b) {
            let rest = &b[i + 8..];
            let end = memchr::memchr(b'"', rest).unwrap_or(rest.len());
            return Frame::Left(&rest[..end]);
        }
        return Frame::Other;
    }
    if T_ERROR.find(b).is_some() {
        return Frame::Error;
    }
    Frame::Other
}

fn parse_bench(b: &[u8]) -> Option<Frame<'static>> {
    let (sender, b) = parse_u64(b)?;
    let b = b.strip_prefix(b":")?;
    let (seq, b) = parse_u64(b)?;
    let b = b.strip_prefix(b":")?;
    let (nanos, _) = parse_u64(b)?;
    Some(Frame::Bench {
        sender: u32::try_from(sender).ok()?,
        seq,
        nanos,
    })
}

fn parse_u64(b: &[u8]) -> Option<(u64, &[u8])> {
    let mut v: u64 = 0;
    let mut n = 0;
    for &c in b {
        if !c.is_ascii_digit() {
            break;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
        n += 1;
    }
    (n > 0).then_some((v, &b[n..]))
}

/// Padding text of `n` bytes: `:` then `x`s (plain ASCII, nothing to escape or trim).
pub fn padding(n: usize) -> String {
    if n == 0 {
        return String::new();
    }
    let mut s = String::with_capacity(n);
    s.push(':');
    s.extend(std::iter::repeat_n('x', n - 1));
    s
}

/// Padding of `n` characters, three bytes each (`€`): big frames without passing the server's
/// 4,000-character limit (JSON carries non-ASCII as raw UTF-8).
pub fn padding_wide(n: usize) -> String {
    if n == 0 {
        return String::new();
    }
    let mut s = String::with_capacity(3 * n);
    s.push(':');
    s.extend(std::iter::repeat_n('\u{20ac}', n - 1));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_frames() {
        let m = br#"{"type":"message","id":3,"room":"r","name":"c1","text":"b:7:42:123456:xxx","ts":1}"#;
        assert_eq!(
            classify(m),
            Frame::Bench {
                sender: 7,
                seq: 42,
                nanos: 123456
            }
        );
        let reordered = br#"{"id":3,"text":"b:1:2:3","type":"message"}"#;
        assert_eq!(
            classify(reordered),
            Frame::Bench {
                sender: 1,
                seq: 2,
                nanos: 3
            }
        );
        let w = br#"{"type":"welcome","room":"r","name":"a","epoch":"e","users":["a"],"history":[{"type":"message","id":1,"room":"r","name":"b","text":"b:1:1:1","ts":1}]}"#;
        assert_eq!(classify(w), Frame::Welcome);
        let l = br#"{"type":"left","name":"slow","ts":1}"#;
        assert_eq!(classify(l), Frame::Left(b"slow"));
        assert_eq!(
            classify(br#"{"type":"joined","name":"x","ts":1}"#),
            Frame::Joined
        );
        assert_eq!(
            classify(br#"{"type":"message","id":1,"room":"r","name":"b","text":"hi","ts":1}"#),
            Frame::Other
        );
        assert_eq!(
            classify(br#"{"type":"error","code":"x","message":"y"}"#),
            Frame::Error
        );
    }

    #[test]
    fn say_roundtrip() {
        let Message::Text(t) = bench_say(5, 9, &padding(10)) else {
            panic!()
        };
        assert!(t.as_str().contains("\"text\":\"b:5:9:"));
        assert!(t.as_str().ends_with(":xxxxxxxxx\"}"));
    }
}
