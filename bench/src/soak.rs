//! Workload 8 (soak): for `--duration`, `--workers` tasks each open one bad client after
//! another: clients that connect and leave, send garbage after the handshake, never say hello,
//! drip their handshake, stop reading, send huge or broken frames, mixed with normal clients
//! that join, say one message and wait for its echo. The server's threads, fds and RSS are
//! sampled (`/proc/PID/status`, `/proc/PID/fd`) all along; after a warm-up, the mean of the
//! last third must stay within a bound of the first third's (see bench/NOTES.md), and once
//! the churn stops threads and fds must return to their idle baseline.

use crate::churn::settle;
use crate::client::{bench_say, connect, echo, healthz_status, join, padding, round, Target};
use crate::procfs;
use crate::results::{Flat, Sample, Soak};
use futures_util::{SinkExt, StreamExt};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{sleep, timeout};

/// The kinds of client, and how often a worker's dice pick each: the slow kinds (seconds
/// each) less often than the quick ones, so that connections keep coming and going.
const KINDS: [(&str, u64); 7] = [
    ("connect_and_leave", 4),
    ("garbage", 4),
    ("no_hello", 1),
    ("drip_handshake", 1),
    ("stops_reading", 1),
    ("bad_frame", 8),
    ("normal", 4),
];
/// The longest life of one client: past the server's hello deadline (30 s).
const CLIENT_LIMIT: Duration = Duration::from_secs(45);
/// The longest wait, after the churn, for threads and fds to return to the baseline.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(15);

/// A small deterministic generator (xorshift64): each worker's sequence of clients repeats.
struct Dice(u64);

impl Dice {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
    /// An index into `KINDS`, by weight.
    fn kind(&mut self) -> usize {
        let mut roll = self.below(KINDS.iter().map(|k| k.1).sum());
        let past = |&(_, w): &(&str, u64)| roll.checked_sub(w).map(|r| roll = r).is_none();
        KINDS.iter().position(past).unwrap_or(0)
    }
    fn bytes(&mut self, n: u64) -> Vec<u8> {
        let len = self.below(n) + 1;
        (0..len).map(|_| self.below(256) as u8).collect()
    }
}

const HEAD: &str = "GET /ws/soak HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

fn io(e: std::io::Error) -> String {
    e.to_string()
}

/// A handshake by hand; the bare socket after the 101's head.
async fn raw_ws(t: Target) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect(t.addr).await.map_err(io)?;
    s.write_all(HEAD.as_bytes()).await.map_err(io)?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await.map_err(|e| format!("head: {e}"))?);
    }
    match head.starts_with(b"HTTP/1.1 101") {
        true => Ok(s),
        false => Err(String::from_utf8_lossy(&head[..12.min(head.len())]).into()),
    }
}

/// Writes `bytes` (the server may already be gone), then reads until the server ends it.
async fn send_and_drain(mut s: TcpStream, bytes: &[u8]) {
    let _ = s.write_all(bytes).await;
    let mut buf = [0u8; 4096];
    while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
}

/// One client of kind `kind`. Only a normal client's failure is an error.
async fn client(kind: usize, t: Target, dice: &mut Dice, id: u32) -> Result<(), String> {
    match KINDS[kind].0 {
        "connect_and_leave" => drop(TcpStream::connect(t.addr).await),
        "garbage" => send_and_drain(raw_ws(t).await?, &dice.bytes(2048)).await,
        "no_hello" => {
            // Some leave before the hello deadline, some are closed by it.
            let mut ws = connect(t.addr, "soak", 4096).await?;
            let hold = Duration::from_secs(1 + dice.below(40));
            let _ = timeout(hold, async { while let Some(Ok(_)) = ws.next().await {} }).await;
        }
        "drip_handshake" => {
            let mut s = TcpStream::connect(t.addr).await.map_err(io)?;
            for b in HEAD.bytes() {
                if s.write_all(&[b]).await.is_err() {
                    break;
                }
                sleep(Duration::from_millis(100 + dice.below(300))).await;
            }
            send_and_drain(s, b"").await;
        }
        "stops_reading" => {
            let room = format!("soak-slow-{}", dice.below(4));
            let (mut ws, _) = join(t.addr, &room, &format!("s{id}"), 4096, |_| {}).await?;
            let pad = padding(3900, false);
            for seq in 0..300 {
                let sent = timeout(Duration::from_secs(2), ws.send(bench_say(id, seq, &pad)));
                if sent.await.is_err() {
                    break;
                }
            }
        }
        "bad_frame" => {
            // A masked frame declaring over 64 KiB, reserved bits, binary, a bad opcode, an
            // unexpected continuation; invalid UTF-8 for the text frames that get that far.
            let len: u64 = [70_000, 1 << 40, u64::MAX >> 1, 4, 4, 4, 4][dice.below(7) as usize];
            let first = [0x81, 0x81, 0x81, 0xc1, 0x82, 0x83, 0x00][dice.below(7) as usize];
            let mut bytes = vec![first, 0x80 | 127];
            bytes.extend(len.to_be_bytes());
            bytes.extend([0, 0, 0, 0, 0xff, 0xfe, 0xfd, 0xfc]);
            send_and_drain(raw_ws(t).await?, &bytes).await
        }
        _ => {
            let (mut ws, _) = join(t.addr, "soak", &format!("n{id}"), 4096, |_| {}).await?;
            echo(&mut ws, id).await?;
            ws.close(None).await.map_err(|e| format!("close: {e}"))?;
        }
    }
    Ok(())
}

/// Means of the samples taken from `from` to `to` seconds.
fn mean<'a>(samples: &'a [(f64, Sample)], from: f64, to: f64) -> Flat {
    let within = |(at, s): &'a (f64, Sample)| (*at >= from && *at < to).then_some(s);
    let s: Vec<&Sample> = samples.iter().filter_map(within).collect();
    let n = s.len().max(1) as f64;
    let avg = |f: fn(&Sample) -> u64| round(s.iter().map(|x| f(x) as f64).sum::<f64>() / n, 1);
    Flat {
        samples: s.len() as u64,
        threads: avg(|x| x.threads),
        fds: avg(|x| x.fds),
        rss_kib: avg(|x| x.rss_kib),
    }
}

/// One worker: a client of a kind its dice pick, then the next, until `deadline`. How many of
/// each kind it opened, and the normal clients' errors.
async fn worker(w: usize, t: Target, deadline: Instant) -> (BTreeMap<String, u64>, Vec<String>) {
    let mut dice = Dice(0x9e37_79b9_7f4a_7c15 ^ (w as u64 + 1) << 32);
    let (mut counts, mut errors) = (BTreeMap::<String, u64>::new(), Vec::new());
    for n in 1u32.. {
        if Instant::now() >= deadline {
            break;
        }
        let (kind, id) = (dice.kind(), (w as u32) << 20 | n);
        let r = timeout(CLIENT_LIMIT, client(kind, t, &mut dice, id)).await;
        *counts.entry(KINDS[kind].0.into()).or_default() += 1;
        match r.unwrap_or_else(|_| Err("client time limit".into())) {
            Err(e) if KINDS[kind].0 == "normal" => errors.push(e),
            _ => {}
        }
    }
    (counts, errors)
}

/// Workload 8: `workers` clients at a time for `duration`, the samples, and the server after.
pub async fn run(t: Target, duration: Duration, workers: usize) -> Soak {
    let (pid, t0) = (t.pid, Instant::now());
    let (baseline, deadline) = (procfs::sample(pid).unwrap_or_default(), t0 + duration);
    let spawn = |w: usize| tokio::spawn(worker(w, t, deadline));
    let tasks: Vec<_> = (0..workers).map(spawn).collect();
    // About 120 samples over the run.
    let every = duration.div_f64(120.0).max(Duration::from_millis(100));
    let mut samples = Vec::new();
    while Instant::now() < deadline {
        samples.extend(procfs::sample(pid).map(|s| (t0.elapsed().as_secs_f64(), s)));
        sleep(every).await;
    }
    let (mut by_kind, mut errors) = (BTreeMap::new(), Vec::new());
    for task in tasks {
        let (counts, e) = task.await.unwrap_or_default();
        for (k, c) in counts {
            *by_kind.entry(k).or_insert(0u64) += c;
        }
        errors.extend(e);
    }
    // Every client has ended: the server must let go of their threads (judged on the
    // connection threads, as in W6: the HTTP side's come and go) and fds.
    let t_settle = Instant::now();
    let back = |s: &Sample, conn: u64| conn == 0 && s.fds <= baseline.fds;
    let every = Duration::from_millis(100);
    let (after, connection_threads_after, back) = settle(pid, (SETTLE_TIMEOUT, every), back).await;
    // Warm-up: the first 30% of the run, while malloc's arenas grow (bench/NOTES.md).
    let (d, warm) = (duration.as_secs_f64(), duration.as_secs_f64() * 0.3);
    let third = (d - warm) / 3.0;
    let tenth = |i: usize| mean(&samples, d * i as f64 / 10.0, d * (i + 1) as f64 / 10.0);
    Soak {
        duration_s: round(d, 1),
        workers: workers as u64,
        clients: by_kind.values().sum(),
        by_kind,
        normal_errors: errors.len() as u64,
        error_samples: errors.into_iter().take(5).collect(),
        baseline,
        warmup_s: round(warm, 1),
        rss_kib_by_tenth: (0..10).map(|i| tenth(i).rss_kib as u64).collect(),
        first_third: mean(&samples, warm, warm + third),
        last_third: mean(&samples, d - third, d + 1.0),
        back_to_baseline: back,
        after,
        connection_threads_after,
        settle_s: round(t_settle.elapsed().as_secs_f64(), 2),
        healthz_status: healthz_status(t.http).await,
    }
}
