//! Workload 4: `clients` connect to one room at the same instant; time until every one has its
//! `welcome`, and whether every earlier member heard every later `joined`.

use crate::args::Args;
use crate::procfs;
use crate::results::JoinStorm;
use crate::stats::{delta, latency, new_hist, record, round};
use crate::ws::{classify, connect, hello, ConnectError, ConnectOpts, Frame};
use futures_util::StreamExt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};
use tokio::time::{sleep, timeout};
use tokio_tungstenite::tungstenite::Message;

/// What to run.
#[derive(Clone, Debug)]
pub struct Params {
    /// WebSocket address.
    pub addr: SocketAddr,
    /// Server pid.
    pub pid: u32,
    /// Clients joining at once.
    pub clients: usize,
    /// Room name.
    pub room: String,
    /// Client read buffer.
    pub read_buffer: usize,
}

impl Params {
    /// From the `joinstorm` subcommand's flags.
    pub fn from_args(a: &Args) -> Result<Params, String> {
        Ok(Params {
            addr: a.required("ws")?,
            pid: a.required("pid")?,
            clients: a.get("clients", 1000)?,
            room: a.opt_str("room").unwrap_or_else(|| "storm".to_string()),
            read_buffer: a.get("read-buffer", 8 * 1024)?,
        })
    }
}

async fn joiner(
    id: usize,
    p: Arc<Params>,
    t0: Instant,
    joined: Arc<AtomicU64>,
    mut done_rx: watch::Receiver<bool>,
    tx: oneshot::Sender<Result<u64, ConnectError>>,
) {
    let opts = ConnectOpts {
        read_buffer: p.read_buffer,
        timeout: Duration::from_secs(20),
        ..Default::default()
    };
    let setup = async {
        let mut ws = connect(p.addr, &p.room, opts).await?;
        hello(&mut ws, &format!("j{id}"))
            .await
            .map_err(|e| ConnectError::Other(format!("hello: {e}")))?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => match classify(t.as_bytes()) {
                    Frame::Welcome => return Ok(ws),
                    Frame::Joined => {
                        joined.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                },
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(ConnectError::Other(format!("before welcome: {e}"))),
                None => return Err(ConnectError::Other("EOF before welcome".to_string())),
            }
        }
    };
    let mut ws = match timeout(Duration::from_secs(30), setup).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            let _ = tx.send(Err(e));
            return;
        }
        Err(_) => {
            let _ = tx.send(Err(ConnectError::Timeout));
            return;
        }
    };
    let _ = tx.send(Ok(t0.elapsed().as_nanos() as u64));
    // One `changed()` future for the whole loop (not one per frame).
    let done = async move {
        let _ = done_rx.changed().await;
    };
    tokio::pin!(done);
    loop {
        tokio::select! {
            biased;
            _ = &mut done => return,
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    if classify(t.as_bytes()) == Frame::Joined {
                        joined.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Some(Ok(_)) => {}
                _ => return,
            }
        }
    }
}

/// Runs the workload and returns its figures.
pub async fn run(p: Params) -> JoinStorm {
    let p = Arc::new(p);
    let joined = Arc::new(AtomicU64::new(0));
    let (done_tx, done_rx) = watch::channel(false);
    let cpu0 = procfs::cpu_secs(Some(p.pid));
    let t0 = Instant::now();
    let mut waits = Vec::with_capacity(p.clients);
    for id in 0..p.clients {
        let (tx, rx) = oneshot::channel();
        tokio::spawn(joiner(
            id,
            p.clone(),
            t0,
            joined.clone(),
            done_rx.clone(),
            tx,
        ));
        waits.push(rx);
    }
    let mut hist = new_hist();
    let mut welcomed = 0u64;
    let mut error_samples: Vec<String> = Vec::new();
    for rx in waits {
        match rx.await {
            Ok(Ok(ns)) => {
                welcomed += 1;
                record(&mut hist, ns);
            }
            Ok(Err(e)) if error_samples.len() < 5 => error_samples.push(e.to_string()),
            _ => {}
        }
    }
    let all_s = t0.elapsed().as_secs_f64();
    let cpu1 = procfs::cpu_secs(Some(p.pid));
    // Every member hears every later join: n(n-1)/2 `joined` frames in all.
    let expected_joined = welcomed * welcomed.saturating_sub(1) / 2;
    let jd = Instant::now() + Duration::from_secs(5);
    while joined.load(Ordering::Relaxed) < expected_joined && Instant::now() < jd {
        sleep(Duration::from_millis(10)).await;
    }
    let joined_s = t0.elapsed().as_secs_f64();
    let server_after = procfs::sample(p.pid).unwrap_or_default();
    let _ = done_tx.send(true);
    JoinStorm {
        clients: p.clients as u64,
        welcomed,
        error_samples,
        all_welcomed_s: round(all_s, 4),
        welcome_latency: latency(&hist),
        joined_frames: joined.load(Ordering::Relaxed),
        joined_frames_expected: expected_joined,
        all_joined_seen_s: round(joined_s, 4),
        server_cpu_s: round(delta(cpu0, cpu1), 3),
        server_after,
    }
}
