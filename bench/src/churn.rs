//! Workload 6: rounds of clients that connect, each say one message, wait for its echo and
//! leave with a close handshake. After each round the server's threads and fds must return to
//! their idle baseline; RSS is recorded per round (it must not grow round over round).

use crate::args::Args;
use crate::procfs;
use crate::results::{Churn, Round};
use crate::stats::{delta, latency, new_hist, record, round};
use crate::ws::{bench_say, classify, connect, hello, ConnectError, ConnectOpts, Frame};
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Semaphore};
use tokio::time::{sleep, timeout, timeout_at};
use tokio_tungstenite::tungstenite::Message;

/// What to run.
#[derive(Clone, Debug)]
pub struct Params {
    /// WebSocket address.
    pub addr: SocketAddr,
    /// Server pid.
    pub pid: u32,
    /// Rounds.
    pub rounds: usize,
    /// Clients per round.
    pub clients: usize,
    /// Clients per room.
    pub room_size: usize,
    /// Connections opened at once.
    pub concurrency: usize,
    /// Longest wait for threads and fds to come back after a round.
    pub settle_timeout: Duration,
}

impl Params {
    /// From the `churn` subcommand's flags.
    pub fn from_args(a: &Args) -> Result<Params, String> {
        Ok(Params {
            addr: a.required("ws")?,
            pid: a.required("pid")?,
            rounds: a.get("rounds", 10)?,
            clients: a.get("clients", 1000)?,
            room_size: a.get("room-size", 100)?,
            concurrency: a.get("concurrency", 200)?,
            settle_timeout: a.secs("settle-timeout", 10.0)?,
        })
    }
}

#[derive(Default)]
struct Outcome {
    connect_ns: Option<u64>,
    echoed: bool,
    closed_cleanly: bool,
    error: Option<String>,
}

async fn churner(
    id: u32,
    room: String,
    p: Arc<Params>,
    sem: Arc<Semaphore>,
    ready: Arc<AtomicUsize>,
    mut go: watch::Receiver<bool>,
) -> Outcome {
    let mut out = Outcome::default();
    let opts = ConnectOpts {
        read_buffer: 8192,
        ..Default::default()
    };
    let permit = sem.acquire_owned().await.ok();
    let t = Instant::now();
    let setup = async {
        let mut ws = connect(p.addr, &room, opts).await?;
        hello(&mut ws, &format!("u{id}"))
            .await
            .map_err(|e| ConnectError::Other(format!("hello: {e}")))?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) if classify(t.as_bytes()) == Frame::Welcome => {
                    return Ok(ws)
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(ConnectError::Other(format!("before welcome: {e}"))),
                None => return Err(ConnectError::Other("EOF before welcome".to_string())),
            }
        }
    };
    let mut ws = match timeout(Duration::from_secs(30), setup).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            out.error = Some(e.to_string());
            ready.fetch_add(1, Ordering::SeqCst);
            return out;
        }
        Err(_) => {
            out.error = Some("no welcome in 30 s".to_string());
            ready.fetch_add(1, Ordering::SeqCst);
            return out;
        }
    };
    out.connect_ns = Some(t.elapsed().as_nanos() as u64);
    drop(permit);
    ready.fetch_add(1, Ordering::SeqCst);
    // Keep reading while the others join.
    let started = async move {
        let _ = go.wait_for(|g| *g).await;
    };
    tokio::pin!(started);
    loop {
        tokio::select! {
            biased;
            _ = &mut started => break,
            m = ws.next() => match m {
                Some(Ok(_)) => {}
                _ => {
                    out.error = Some("closed while waiting".to_string());
                    return out;
                }
            }
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    if let Err(e) = ws.send(bench_say(id, 1, "")).await {
        out.error = Some(format!("send: {e}"));
        return out;
    }
    loop {
        match timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                if let Frame::Bench { sender, .. } = classify(t.as_bytes()) {
                    if sender == id {
                        out.echoed = true;
                        break;
                    }
                }
            }
            Ok(Some(Ok(_))) => {}
            Ok(_) => {
                out.error = Some("closed before echo".to_string());
                return out;
            }
            Err(_) => {
                out.error = Some("no echo in 10 s".to_string());
                break;
            }
        }
    }
    // Leave politely: close, then read until the server ends the connection.
    if ws.close(None).await.is_ok() {
        let cd = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match timeout_at(cd, ws.next()).await {
                Ok(None) | Ok(Some(Err(_))) => {
                    out.closed_cleanly = true;
                    break;
                }
                Ok(Some(Ok(_))) => {}
                Err(_) => break,
            }
        }
    }
    out
}

/// Runs the workload and returns its figures.
pub async fn run(p: Params) -> Churn {
    let pid = p.pid;
    let p = Arc::new(p);
    sleep(Duration::from_millis(300)).await;
    let base = procfs::sample(pid).unwrap_or_default();
    let base_tids: Vec<u32> = procfs::threads(pid).into_iter().map(|t| t.0).collect();
    let cpu0 = procfs::cpu_secs(Some(pid));
    let mut rounds: Vec<Round> = Vec::new();
    let (mut all_back, mut named_conn_threads) = (true, false);
    let mut hist = new_hist();
    let mut errors = 0u64;
    let mut error_samples: Vec<String> = Vec::new();
    let t_all = Instant::now();
    for r in 0..p.rounds {
        let sem = Arc::new(Semaphore::new(p.concurrency.max(1)));
        let ready = Arc::new(AtomicUsize::new(0));
        let (go_tx, go_rx) = watch::channel(false);
        let mut handles = Vec::with_capacity(p.clients);
        for k in 0..p.clients {
            let id = (r * p.clients + k) as u32;
            let room = format!("churn{}", k / p.room_size.max(1));
            let task = churner(
                id,
                room,
                p.clone(),
                sem.clone(),
                ready.clone(),
                go_rx.clone(),
            );
            handles.push(tokio::spawn(task));
        }
        let rd = Instant::now() + Duration::from_secs(60);
        while ready.load(Ordering::SeqCst) < p.clients && Instant::now() < rd {
            sleep(Duration::from_millis(5)).await;
        }
        let peak = procfs::sample(pid).unwrap_or_default();
        // A server that names its per-connection threads (chatroom: `ws-reader-N`,
        // `ws-writer-N`) is judged on those; other threads (chatroom's HTTP side rebuilds
        // tiny_http every idle 10 s) may come and go. Otherwise: all threads.
        named_conn_threads |= conn_threads(pid) > 0;
        let _ = go_tx.send(true);
        for h in handles {
            let o = h.await.unwrap_or_else(|e| Outcome {
                error: Some(format!("task: {e}")),
                ..Default::default()
            });
            if let Some(ns) = o.connect_ns {
                record(&mut hist, ns);
            }
            errors += u64::from(o.error.is_some());
            error_samples.extend(o.error.filter(|_| error_samples.len() < 5));
        }
        // Wait for the server to let go of every thread and descriptor.
        let t_settle = Instant::now();
        let now = || (procfs::sample(pid).unwrap_or_default(), conn_threads(pid));
        let back = |(s, conn): (procfs::Sample, u64)| {
            s.fds <= base.fds
                && if named_conn_threads {
                    conn == 0
                } else {
                    s.threads <= base.threads
                }
        };
        let mut last = now();
        while !back(last) && t_settle.elapsed() < p.settle_timeout {
            sleep(Duration::from_millis(20)).await;
            last = now();
        }
        all_back &= back(last);
        // Which threads outlived their connections, and where they wait.
        if !back(last) && error_samples.len() < 5 {
            let lingering = procfs::threads(pid)
                .into_iter()
                .filter(|t| !base_tids.contains(&t.0))
                .take(5);
            let names: Vec<String> = lingering
                .map(|(tid, name, wchan)| format!("{tid} {name} ({wchan})"))
                .collect();
            error_samples.push(format!(
                "round {}: threads left: {}",
                r + 1,
                names.join(", ")
            ));
        }
        rounds.push(Round {
            round: r as u64 + 1,
            peak_threads: peak.threads,
            connection_threads: last.1,
            threads: last.0.threads,
            fds: last.0.fds,
            rss_kib: last.0.rss_kib,
            settle_ms: round(t_settle.elapsed().as_secs_f64() * 1000.0, 1),
        });
    }
    let cpu1 = procfs::cpu_secs(Some(pid));
    let rss: Vec<u64> = rounds.iter().map(|r| r.rss_kib).collect();
    // glibc keeps freed memory (and up to 40 MiB of exited threads' stacks) after the first
    // rounds: judge the trend as a least-squares slope from round 3 on.
    let from = if rss.len() >= 5 { 2 } else { 1.min(rss.len()) };
    let growth = match rss.len() {
        0 | 1 => 0,
        2 => rss[1] as i64 - rss[0] as i64,
        n => rss[n - 1] as i64 - rss[1] as i64,
    };
    Churn {
        all_back_to_baseline: all_back,
        judged_on: match named_conn_threads {
            true => "fds and ws-reader/ws-writer threads",
            false => "fds and all threads",
        }
        .to_string(),
        errors,
        error_samples,
        baseline: base,
        connect_latency: latency(&hist),
        rss_growth_kib_round2_to_last: growth,
        rss_slope_kib_per_round: round(slope(&rss[from..]), 1),
        rss_slope_from_round: from as u64 + 1,
        rss_kib_by_round: rss,
        server_cpu_s: round(delta(cpu0, cpu1), 3),
        wall_s: round(t_all.elapsed().as_secs_f64(), 3),
        per_round: rounds,
    }
}

/// Threads named like a connection's (chatroom: `ws-reader-N`, `ws-writer-N`).
fn conn_threads(pid: u32) -> u64 {
    procfs::threads(pid)
        .iter()
        .filter(|t| t.1.starts_with("ws-reader") || t.1.starts_with("ws-writer"))
        .count() as u64
}

/// Least-squares slope of `ys` against 0, 1, 2, … (0 for fewer than two points).
fn slope(ys: &[u64]) -> f64 {
    if ys.len() < 2 {
        return 0.0;
    }
    let n = ys.len() as f64;
    let mx = (n - 1.0) / 2.0;
    let my = ys.iter().map(|&y| y as f64).sum::<f64>() / n;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (i, &y) in ys.iter().enumerate() {
        let dx = i as f64 - mx;
        sxy += dx * (y as f64 - my);
        sxx += dx * dx;
    }
    sxy / sxx
}
