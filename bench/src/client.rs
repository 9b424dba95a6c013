//! What every workload shares: the server under test ([`Target`]), opening a client (connect,
//! `hello`, `welcome`: [`join`]), bench messages and the cheap classification of server frames,
//! `GET /healthz`, and latency histograms with the errors beside them ([`Tally`]).
//!
//! Bench messages carry `b:<sender>:<seq>:<nanos>[:padding]` as their text, where `nanos` is the
//! send time on this process's monotonic clock ([`now_nanos`]); a receiver finds `"text":"b:`
//! with a precomputed substring search and reads three integers: no JSON parsing, no allocation.

use crate::results::Latency;
use crate::Args;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use memchr::memmem;
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::LazyLock;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{protocol::WebSocketConfig, Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// A connected client.
pub type Ws = WebSocketStream<TcpStream>;

/// A server under test: every workload's `--ws`, `--pid` (for /proc) and `--http` (for
/// `/healthz`; the Node peer serves it on its one port).
#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    pub pid: u32,
    pub http: Option<SocketAddr>,
}

impl Target {
    /// One server: `--ws`, `--pid` and `--http`.
    pub fn from_args(a: &Args) -> Result<Target, String> {
        match Target::several(a)? {
            (t, pids) if t.len() == 1 && pids.len() == 1 => Ok(t[0]),
            _ => Err("this workload takes one --ws address and one --pid".into()),
        }
    }

    /// Servers that share rooms: `--ws A,B,…` and `--pid P,Q,…`, one pid per address, then
    /// any more processes whose CPU and memory count as the servers' (their Redis); `--http`
    /// is the first server's. The servers, and every pid.
    pub fn several(a: &Args) -> Result<(Vec<Target>, Vec<u32>), String> {
        let (ws, pids, http) = (a.list("ws")?, a.list::<u32>("pid")?, a.opt("http")?);
        if ws.is_empty() || pids.len() < ws.len() {
            return Err("--ws and --pid are required, one pid per address".into());
        }
        let first = |i: usize| http.filter(|_| i == 0);
        let t = |(i, (&addr, &pid))| Target {
            addr,
            pid,
            http: first(i),
        };
        Ok((ws.iter().zip(&pids).enumerate().map(t).collect(), pids))
    }
}

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Starts the clock that message timestamps are relative to.
pub fn init_clock() {
    LazyLock::force(&EPOCH);
}

/// Nanoseconds since [`init_clock`] on the monotonic clock.
pub fn now_nanos() -> u64 {
    EPOCH.elapsed().as_nanos() as u64
}

/// How long opening a client may take: connect, handshake and welcome.
const JOIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Opens `ws://addr/ws/{room}` with TCP_NODELAY and tungstenite's read buffer of
/// `read_buffer` bytes (eagerly allocated per client). An HTTP answer other than 101 is `http_N`.
pub async fn connect(addr: SocketAddr, room: &str, read_buffer: usize) -> Result<Ws, String> {
    let why = |e: std::io::Error| format!("connect: {e}");
    let stream = TcpStream::connect(addr).await.map_err(why)?;
    stream.set_nodelay(true).map_err(why)?;
    let cfg = WebSocketConfig::default().read_buffer_size(read_buffer);
    let cfg = cfg.write_buffer_size(0);
    let url = format!("ws://{addr}/ws/{room}");
    match tokio_tungstenite::client_async_with_config(url, stream, Some(cfg)).await {
        Ok((ws, _)) => Ok(ws),
        Err(WsError::Http(resp)) => Err(format!("http_{}", resp.status().as_u16())),
        Err(e) => Err(format!("handshake: {e}")),
    }
}

/// Says `hello` as `name`.
pub async fn hello(ws: &mut Ws, name: &str) -> Result<(), String> {
    let hello = format!("{{\"type\":\"hello\",\"name\":\"{name}\"}}");
    let why = |e| format!("hello: {e}");
    ws.send(Message::text(hello)).await.map_err(why)
}

/// Connects, says `hello` as `name` and reads until the `welcome`, within [`JOIN_TIMEOUT`]; every
/// frame before it goes to `before`. The client and how long it took, in nanoseconds.
pub async fn join(
    addr: SocketAddr,
    room: &str,
    name: &str,
    read_buffer: usize,
    mut before: impl FnMut(Frame),
) -> Result<(Ws, u64), String> {
    let t = Instant::now();
    let setup = async {
        let mut ws = connect(addr, room, read_buffer).await?;
        hello(&mut ws, name).await?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => match classify(t.as_bytes()) {
                    Frame::Welcome => return Ok(ws),
                    f => before(f),
                },
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(format!("before welcome: {e}")),
                None => return Err("EOF before welcome".into()),
            }
        }
    };
    match tokio::time::timeout(JOIN_TIMEOUT, setup).await {
        Ok(r) => r.map(|ws| (ws, t.elapsed().as_nanos() as u64)),
        Err(_) => Err(format!("no welcome within {} s", JOIN_TIMEOUT.as_secs())),
    }
}

/// A `say` whose text is `b:<sender>:<seq>:<now>` followed by `pad` (which must need no escaping).
pub fn bench_say(sender: u32, seq: u64, pad: &str) -> Message {
    let now = now_nanos();
    Message::text(format!(
        "{{\"type\":\"say\",\"text\":\"b:{sender}:{seq}:{now}{pad}\"}}"
    ))
}

/// Says one bench message as sender `id` and reads until its echo comes back.
pub async fn echo(ws: &mut Ws, id: u32) -> Result<(), String> {
    let why = |e| format!("say: {e}");
    ws.send(bench_say(id, 1, "")).await.map_err(why)?;
    while let Some(Ok(m)) = ws.next().await {
        if matches!(classify(m.to_text().unwrap_or("").as_bytes()), Frame::Bench { sender, .. } if sender == id)
        {
            return Ok(());
        }
    }
    Err("closed before echo".into())
}

/// Padding of `n` characters after a `:`: `x`s, or `€`s (three bytes each: big frames without
/// passing the server's 4,000-character limit).
pub fn padding(n: usize, wide: bool) -> String {
    let c = if wide { '\u{20ac}' } else { 'x' };
    (0..n).map(|i| if i == 0 { ':' } else { c }).collect()
}

/// What a server frame is, as far as the benchmark cares.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A `message` carrying a bench text: sender id, its sequence number, send time.
    Bench {
        sender: u32,
        seq: u64,
        nanos: u64,
    },
    Welcome,
    Joined,
    /// `left`, with the raw (JSON-escaped) name.
    Left(&'a [u8]),
    /// Anything else (typing, errors, non-bench messages).
    Other,
}

/// The hot search, in every delivery: built once.
static TEXT_B: LazyLock<memmem::Finder> = LazyLock::new(|| memmem::Finder::new(b"\"text\":\"b:"));

/// Classifies one text frame. Fast path: a frame that starts with `{"type":"message"`.
pub fn classify(b: &[u8]) -> Frame<'_> {
    let has = |s: &str| memmem::find(b, s.as_bytes());
    let message = b.starts_with(b"{\"type\":\"message\"")
        || (has("\"type\":\"message\"").is_some() && has("\"history\":").is_none());
    if message {
        let bench = TEXT_B.find(b).and_then(|i| parse_bench(&b[i + 10..]));
        return bench.unwrap_or(Frame::Other);
    }
    if has("\"type\":\"welcome\"").is_some() {
        return Frame::Welcome;
    }
    if has("\"type\":\"joined\"").is_some() {
        return Frame::Joined;
    }
    match (has("\"type\":\"left\""), has("\"name\":\"")) {
        (Some(_), Some(i)) => {
            let rest = &b[i + 8..];
            Frame::Left(&rest[..memchr::memchr(b'"', rest).unwrap_or(rest.len())])
        }
        _ => Frame::Other,
    }
}

fn parse_bench(b: &[u8]) -> Option<Frame<'static>> {
    let number = |d: &[u8]| std::str::from_utf8(d).ok()?.parse().ok();
    let mut it = b.split(|c| !c.is_ascii_digit()).map(number);
    let (sender, seq, nanos) = (it.next()??, it.next()??, it.next()??);
    Some(Frame::Bench {
        sender: u32::try_from(sender).ok()?,
        seq,
        nanos,
    })
}

/// `GET /healthz` over a fresh connection (`Connection: close`): the status and the JSON body
/// (`Null` for a body that is not JSON, e.g. the Node peer's plain `ok`).
pub async fn healthz(http: SocketAddr) -> Result<(u16, Value), String> {
    let fut = async {
        let io = |e: std::io::Error| e.to_string();
        let mut s = TcpStream::connect(http).await.map_err(io)?;
        let req = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
        s.write_all(req.as_bytes()).await.map_err(io)?;
        // The server closes after its answer; 64 KiB is far more than a health report.
        let mut buf = Vec::new();
        s.take(64 * 1024).read_to_end(&mut buf).await.map_err(io)?;
        let text = String::from_utf8_lossy(&buf);
        let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok());
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        // A chunked body still holds the object between its first `{` and last `}`.
        let json = match (body.find('{'), body.rfind('}')) {
            (Some(a), Some(b)) if b > a => serde_json::from_str(&body[a..=b]).unwrap_or_default(),
            _ => Value::Null,
        };
        Ok((status.ok_or("no status line")?, json))
    };
    let timeout = tokio::time::timeout(Duration::from_secs(5), fut).await;
    timeout.unwrap_or(Err("healthz: timeout".into()))
}

/// `/healthz`'s status, if it answered.
pub async fn healthz_status(http: Option<SocketAddr>) -> Option<u16> {
    Some(healthz(http?).await.ok()?.0)
}

/// The store's counters from `/healthz` at one moment. Accepted = written + unwritten + dropped.
#[derive(Clone, Copy, Debug)]
pub struct StoreCounters {
    pub written: u64,
    pub unwritten: u64,
    pub dropped: u64,
    /// The store keeps history in memory only (`--data none`).
    pub memory: bool,
    pub at: Instant,
}

impl StoreCounters {
    pub fn accepted(&self) -> u64 {
        self.written + self.unwritten + self.dropped
    }

    /// `None` without an HTTP address, or from a server that reports no store.
    pub async fn read(http: Option<SocketAddr>) -> Option<StoreCounters> {
        let s = &healthz(http?).await.ok()?.1["store"];
        Some(StoreCounters {
            written: s["written"].as_u64()?,
            unwritten: s["unwritten"].as_u64()?,
            dropped: s["dropped"].as_u64().unwrap_or(0),
            memory: s["state"] == "memory",
            at: Instant::now(),
        })
    }
}

/// A latency histogram in nanoseconds (1 ns … 60 s, two significant figures: ~1% error).
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 2).expect("valid histogram bounds")
}

/// p50/p90/p99/max in microseconds, plus the count (all 0 for an empty histogram).
pub fn latency(h: &Histogram<u64>) -> Latency {
    let us = |ns: u64| ns as f64 / 1000.0;
    let q = |q: f64| us(h.value_at_quantile(q));
    match h.is_empty() {
        true => Latency::default(),
        false => Latency {
            count: h.len(),
            p50_us: q(0.5),
            p90_us: q(0.9),
            p99_us: q(0.99),
            max_us: us(h.max()),
        },
    }
}

/// Connect (or welcome) times in nanoseconds, how many succeeded and failed, and the first
/// few errors.
pub struct Tally {
    pub hist: Histogram<u64>,
    pub ok: u64,
    pub failed: u64,
    pub errors: Vec<String>,
}

impl Tally {
    pub fn new() -> Tally {
        Tally {
            hist: new_hist(),
            ok: 0,
            failed: 0,
            errors: Vec::new(),
        }
    }

    /// A success that took `ns`, or a failure.
    pub fn add(&mut self, r: Result<u64, String>) {
        match r {
            Ok(ns) => {
                self.ok += 1;
                self.hist.saturating_record(ns.max(1));
            }
            Err(e) => self.error(e),
        }
    }

    /// A failure; the first five are kept as samples.
    pub fn error(&mut self, e: String) {
        self.failed += 1;
        if self.errors.len() < 5 {
            self.errors.push(e);
        }
    }
}

/// Rounds to `d` decimals (for readable JSON).
pub fn round(x: f64, d: i32) -> f64 {
    let p = 10f64.powi(d);
    (x * p).round() / p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_frames() {
        let bench = |sender, seq, nanos| Frame::Bench { sender, seq, nanos };
        let m = br#"{"type":"message","id":3,"room":"r","name":"c1","text":"b:7:42:123456:xxx","ts":1}"#;
        assert_eq!(classify(m), bench(7, 42, 123456));
        let reordered = br#"{"id":3,"text":"b:1:2:3","type":"message"}"#;
        assert_eq!(classify(reordered), bench(1, 2, 3));
        let w = br#"{"type":"welcome","room":"r","name":"a","epoch":"e","users":["a"],"history":[{"type":"message","id":1,"room":"r","name":"b","text":"b:1:1:1","ts":1}]}"#;
        assert_eq!(classify(w), Frame::Welcome);
        let left = br#"{"type":"left","name":"slow","ts":1}"#;
        assert_eq!(classify(left), Frame::Left(b"slow"));
        assert_eq!(
            classify(br#"{"type":"joined","name":"x","ts":1}"#),
            Frame::Joined
        );
        let plain = br#"{"type":"message","id":1,"room":"r","name":"b","text":"hi","ts":1}"#;
        assert_eq!(classify(plain), Frame::Other);
    }

    #[test]
    fn say_roundtrip() {
        let Message::Text(t) = bench_say(5, 9, &padding(10, false)) else {
            panic!()
        };
        assert!(t.as_str().contains("\"text\":\"b:5:9:"));
        assert!(t.as_str().ends_with(":xxxxxxxxx\"}"));
        assert_eq!(padding(3, true), ":€€");
    }
}
