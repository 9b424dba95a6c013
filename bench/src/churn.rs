//! Workload 6: rounds of clients that connect, each say one message, wait for its echo and
//! leave with a close handshake. After each round the server's threads and fds must return to
//! their idle baseline; RSS is recorded per round (it must not grow round over round).

use crate::procfs;
use crate::stats::{hist_json, new_hist, record, round};
use crate::ws::{bench_say, classify, connect, hello, ConnectError, ConnectOpts, Frame};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
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
    pub pid: Option<u32>,
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

/// Runs the workload and returns its JSON report.
pub async fn run(p: Params) -> Value {
    let p = Arc::new(p);
    sleep(Duration::from_millis(300)).await;
    let base = p.pid.and_then(procfs::sample);
    let base_tids: Vec<u32> = p
        .pid
        .map(|pid| procfs::threads(pid).into_iter().map(|t| t.0).collect())
        .unwrap_or_default();
    let cpu0 = p.pid.and_then(|pid| procfs::cpu_secs(Some(pid)));
    let mut rounds: Vec<Value> = Vec::new();
    let mut all_back = true;
    let mut named_conn_threads = false;
    let mut hist = new_hist();
    let mut total_errors = 0u64;
    let mut samples: Vec<String> = Vec::new();
    let t_all = Instant::now();
    for r in 0..p.rounds {
        let sem = Arc::new(Semaphore::new(p.concurrency.max(1)));
        let ready = Arc::new(AtomicUsize::new(0));
        let (go_tx, go_rx) = watch::channel(false);
        let t = Instant::now();
        let mut handles = Vec::with_capacity(p.clients);
        for k in 0..p.clients {
            let id = (r * p.clients + k) as u32;
            let room = format!("churn{}", k / p.room_size.max(1));
            handles.push(tokio::spawn(churner(
                id,
                room,
                p.clone(),
                sem.clone(),
                ready.clone(),
                go_rx.clone(),
            )));
        }
        let rd = Instant::now() + Duration::from_secs(60);
        while ready.load(Ordering::SeqCst) < p.clients && Instant::now() < rd {
            sleep(Duration::from_millis(5)).await;
        }
        let connect_s = t.elapsed().as_secs_f64();
        let peak = p.pid.and_then(procfs::sample);
        // A server that names its per-connection threads (chatroom: `ws-reader-N`,
        // `ws-writer-N`) is judged on those; other threads (chatroom's HTTP side rebuilds
        // tiny_http every idle 10 s) may come and go. Otherwise: all threads.
        let peak_conn = p.pid.map(conn_threads).unwrap_or(0);
        named_conn_threads |= peak_conn > 0;
        let _ = go_tx.send(true);
        let (mut echoed, mut clean, mut errors) = (0u64, 0u64, 0u64);
        for h in handles {
            match h.await {
                Ok(o) => {
                    if let Some(ns) = o.connect_ns {
                        record(&mut hist, ns);
                    }
                    echoed += u64::from(o.echoed);
                    clean += u64::from(o.closed_cleanly);
                    if let Some(e) = o.error {
                        errors += 1;
                        if samples.len() < 5 {
                            samples.push(e);
                        }
                    }
                }
                Err(e) => {
                    errors += 1;
                    if samples.len() < 5 {
                        samples.push(format!("task: {e}"));
                    }
                }
            }
        }
        total_errors += errors;
        let round_s = t.elapsed().as_secs_f64();
        // Wait for the server to let go of every thread and descriptor.
        let t_settle = Instant::now();
        let mut last = p.pid.and_then(procfs::sample);
        let mut last_conn = p.pid.map(conn_threads).unwrap_or(0);
        let back = |s: &Option<procfs::Sample>, conn: u64| match (base, s) {
            (Some(b), Some(s)) => {
                s.fds <= b.fds
                    && if named_conn_threads {
                        conn == 0
                    } else {
                        s.threads <= b.threads
                    }
            }
            _ => true,
        };
        while !back(&last, last_conn) && t_settle.elapsed() < p.settle_timeout {
            sleep(Duration::from_millis(20)).await;
            last = p.pid.and_then(procfs::sample);
            last_conn = p.pid.map(conn_threads).unwrap_or(0);
        }
        let ok = back(&last, last_conn);
        all_back &= ok;
        // Which threads outlived their connections, and where they wait.
        let lingering: Vec<String> = match (ok, p.pid) {
            (false, Some(pid)) => procfs::threads(pid)
                .into_iter()
                .filter(|t| !base_tids.contains(&t.0))
                .take(10)
                .map(|(tid, name, wchan)| format!("{tid} {name} ({wchan})"))
                .collect(),
            _ => Vec::new(),
        };
        rounds.push(json!({
            "round": r + 1,
            "connect_s": round(connect_s, 3),
            "round_s": round(round_s, 3),
            "echoed": echoed,
            "closed_cleanly": clean,
            "errors": errors,
            "peak": peak.map(|s| s.to_json()),
            "back_to_baseline": ok,
            "settle_ms": round(t_settle.elapsed().as_secs_f64() * 1000.0, 1),
            "threads": last.map(|s| s.threads),
            "connection_threads": last_conn,
            "peak_connection_threads": peak_conn,
            "fds": last.map(|s| s.fds),
            "rss_kib": last.map(|s| s.rss_kib),
            "lingering_threads": lingering,
        }));
    }
    let cpu1 = p.pid.and_then(|pid| procfs::cpu_secs(Some(pid)));
    let rss: Vec<u64> = rounds
        .iter()
        .filter_map(|r| r["rss_kib"].as_u64())
        .collect();
    // glibc keeps freed memory (and up to 40 MiB of exited threads' stacks) after the first
    // rounds: judge the trend as a least-squares slope from round 3 on.
    let from = if rss.len() >= 5 { 2 } else { 1.min(rss.len()) };
    let slope = slope(&rss[from..]);
    let growth = if rss.len() >= 3 {
        Some(rss[rss.len() - 1] as i64 - rss[1] as i64)
    } else if rss.len() == 2 {
        Some(rss[1] as i64 - rss[0] as i64)
    } else {
        None
    };
    json!({
        "workload": "churn",
        "rounds": p.rounds,
        "clients_per_round": p.clients,
        "room_size": p.room_size,
        "baseline": base.map(|s| s.to_json()),
        "all_back_to_baseline": all_back,
        "errors": total_errors,
        "error_samples": samples,
        "connect_latency": hist_json(&hist),
        "rss_kib_by_round": rss,
        "rss_growth_kib_round2_to_last": growth,
        "rss_slope_kib_per_round": slope.map(|x| round(x, 1)),
        "rss_slope_from_round": from + 1,
        "judged_on": if named_conn_threads { "fds and ws-reader/ws-writer threads" } else { "fds and all threads" },
        "server_cpu_s": match (cpu0, cpu1) { (Some(a), Some(b)) => Some(round(b - a, 3)), _ => None },
        "wall_s": round(t_all.elapsed().as_secs_f64(), 3),
        "per_round": rounds,
    })
}

/// Threads named like a connection's (chatroom: `ws-reader-N`, `ws-writer-N`).
fn conn_threads(pid: u32) -> u64 {
    procfs::threads(pid)
        .iter()
        .filter(|t| t.1.starts_with("ws-reader") || t.1.starts_with("ws-writer"))
        .count() as u64
}

/// Least-squares slope of `ys` against 0, 1, 2, …
fn slope(ys: &[u64]) -> Option<f64> {
    if ys.len() < 2 {
        return None;
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
    Some(sxy / sxx)
}
