//! Clients that come and go. Workload 4 (join storm): `clients` connect to one room at the same
//! instant; time until every one has its `welcome`, and whether every earlier member heard every
//! later `joined`. Workload 6 (churn): rounds of clients that connect, each say one message,
//! wait for its echo and leave with a close handshake; after each round the server's threads and
//! fds must return to their idle baseline, and RSS is recorded per round (it must not grow round
//! over round).

use crate::client::{bench_say, classify, join, latency, new_hist, round, Frame, Target};
use crate::procfs;
use crate::results::{Churn, JoinStorm, Round, Sample};
use crate::Args;
use futures_util::{SinkExt, StreamExt};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Semaphore};
use tokio::time::{sleep, timeout};

/// Workload 4: `clients` join room `storm` at once.
pub async fn join_storm(t: Target, clients: usize) -> JoinStorm {
    let joined = Arc::new(AtomicU64::new(0));
    let (done_tx, done_rx) = watch::channel(false);
    let cpu0 = procfs::cpu_secs(Some(t.pid));
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|id| {
            let (joined, mut done) = (joined.clone(), done_rx.clone());
            let count = move |f: Frame| {
                if f == Frame::Joined {
                    joined.fetch_add(1, Relaxed);
                }
            };
            tokio::spawn(async move {
                let (mut ws, _) = join(t.addr, "storm", &format!("j{id}"), 8192, count.clone()).await?;
                let welcomed = t0.elapsed().as_nanos() as u64;
                // Keep counting `joined` frames until told to stop.
                tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            _ = done.changed() => return,
                            m = ws.next() => match m {
                                Some(Ok(m)) => count(classify(m.to_text().unwrap_or("").as_bytes())),
                                _ => return,
                            }
                        }
                    }
                });
                Ok::<u64, String>(welcomed)
            })
        })
        .collect();
    let (mut hist, mut welcomed, mut errors) = (new_hist(), 0u64, Vec::new());
    for task in tasks {
        match task.await.map_err(|e| e.to_string()).and_then(|r| r) {
            Ok(ns) => {
                welcomed += 1;
                hist.saturating_record(ns.max(1));
            }
            Err(e) if errors.len() < 5 => errors.push(e),
            Err(_) => {}
        }
    }
    let all_s = t0.elapsed().as_secs_f64();
    let cpu1 = procfs::cpu_secs(Some(t.pid));
    // Every member hears every later join: n(n-1)/2 `joined` frames in all.
    let expected = welcomed * welcomed.saturating_sub(1) / 2;
    let deadline = Instant::now() + Duration::from_secs(5);
    while joined.load(Relaxed) < expected && Instant::now() < deadline {
        sleep(Duration::from_millis(10)).await;
    }
    let joined_s = t0.elapsed().as_secs_f64();
    let _ = done_tx.send(true);
    JoinStorm {
        clients: clients as u64,
        welcomed,
        error_samples: errors,
        all_welcomed_s: round(all_s, 4),
        welcome_latency: latency(&hist),
        joined_frames: joined.load(Relaxed),
        joined_frames_expected: expected,
        all_joined_seen_s: round(joined_s, 4),
        server_cpu_s: round(cpu0.zip(cpu1).map_or(0.0, |(a, b)| b - a), 3),
        server_after: procfs::sample(t.pid).unwrap_or_default(),
    }
}

/// Workload 6's settings.
#[derive(Clone, Debug)]
pub struct Params {
    pub target: Target,
    pub rounds: usize,
    /// Clients per round.
    pub clients: usize,
    pub room_size: usize,
}

/// W6: connections opened at once.
const CONCURRENCY: usize = 200;
/// W6: the longest wait for threads and fds to come back after a round.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

impl Params {
    pub fn from_args(a: &Args) -> Result<Params, String> {
        Ok(Params {
            target: Target::from_args(a)?,
            rounds: a.get("rounds", 10)?,
            clients: a.get("clients", 1000)?,
            room_size: a.get("room-size", 100)?,
        })
    }
}

/// One churning client: joins, reads until `go`, says one message and waits for its echo,
/// then closes and reads until the server ends the connection. Its connect time.
async fn churner(
    id: u32,
    room: String,
    t: Target,
    sem: Arc<Semaphore>,
    ready: Arc<AtomicU64>,
    mut go: watch::Receiver<bool>,
) -> Result<u64, String> {
    let permit = sem.acquire_owned().await;
    let joined = join(t.addr, &room, &format!("u{id}"), 8192, |_| {}).await;
    drop(permit);
    ready.fetch_add(1, Relaxed);
    let (mut ws, ns) = joined?;
    loop {
        tokio::select! {
            biased;
            _ = go.wait_for(|g| *g) => break,
            m = ws.next() => if !matches!(m, Some(Ok(_))) {
                return Err("closed while waiting".into());
            }
        }
    }
    ws.send(bench_say(id, 1, ""))
        .await
        .map_err(|e| format!("send: {e}"))?;
    let echo = async {
        while let Some(Ok(m)) = ws.next().await {
            if matches!(classify(m.to_text().unwrap_or("").as_bytes()), Frame::Bench { sender, .. } if sender == id)
            {
                return Ok(());
            }
        }
        Err("closed before echo".to_string())
    };
    timeout(Duration::from_secs(10), echo)
        .await
        .map_err(|_| "no echo in 10 s".to_string())??;
    // Leave politely: close, then read until the server ends the connection.
    ws.close(None).await.map_err(|e| format!("close: {e}"))?;
    let closed = timeout(Duration::from_secs(5), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    closed
        .map(|_| ns)
        .map_err(|_| "not closed by the server within 5 s".into())
}

/// Threads named like a connection's (chatroom: `ws-reader-N`, `ws-writer-N`).
pub fn conn_threads(pid: u32) -> u64 {
    let named =
        |t: &&(u32, String, String)| t.1.starts_with("ws-reader") || t.1.starts_with("ws-writer");
    procfs::threads(pid).iter().filter(named).count() as u64
}

/// Workload 6: runs the rounds and returns their figures.
pub async fn run(p: Params) -> Churn {
    let pid = p.target.pid;
    sleep(Duration::from_millis(300)).await;
    let base = procfs::sample(pid).unwrap_or_default();
    let base_tids: Vec<u32> = procfs::threads(pid).into_iter().map(|t| t.0).collect();
    let cpu0 = procfs::cpu_secs(Some(pid));
    let (mut rounds, mut all_back, mut named) = (Vec::new(), true, false);
    let (mut hist, mut errors, mut error_samples) = (new_hist(), 0u64, Vec::new());
    let t_all = Instant::now();
    for r in 0..p.rounds {
        let sem = Arc::new(Semaphore::new(CONCURRENCY));
        let ready = Arc::new(AtomicU64::new(0));
        let (go_tx, go_rx) = watch::channel(false);
        let tasks: Vec<_> = (0..p.clients)
            .map(|k| {
                let room = format!("churn{}", k / p.room_size.max(1));
                let task = churner(
                    (r * p.clients + k) as u32,
                    room,
                    p.target,
                    sem.clone(),
                    ready.clone(),
                    go_rx.clone(),
                );
                tokio::spawn(task)
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        while ready.load(Relaxed) < p.clients as u64 && Instant::now() < deadline {
            sleep(Duration::from_millis(5)).await;
        }
        let peak = procfs::sample(pid).unwrap_or_default();
        // A server that names its per-connection threads (chatroom: `ws-reader-N`,
        // `ws-writer-N`) is judged on those; other threads (chatroom's HTTP side rebuilds
        // tiny_http every idle 10 s) may come and go. Otherwise: all threads.
        named |= conn_threads(pid) > 0;
        let _ = go_tx.send(true);
        for task in tasks {
            match task.await.map_err(|e| e.to_string()).and_then(|r| r) {
                Ok(ns) => hist.saturating_record(ns.max(1)),
                Err(e) => {
                    errors += 1;
                    error_samples.extend(Some(e).filter(|_| error_samples.len() < 5));
                }
            }
        }
        // Wait for the server to let go of every thread and descriptor.
        let t_settle = Instant::now();
        let now = || (procfs::sample(pid).unwrap_or_default(), conn_threads(pid));
        let back = |(s, conn): (Sample, u64)| {
            s.fds <= base.fds
                && if named {
                    conn == 0
                } else {
                    s.threads <= base.threads
                }
        };
        let mut last = now();
        while !back(last) && t_settle.elapsed() < SETTLE_TIMEOUT {
            sleep(Duration::from_millis(20)).await;
            last = now();
        }
        all_back &= back(last);
        // Which threads outlived their connections, and where they wait.
        if !back(last) && error_samples.len() < 5 {
            let left = procfs::threads(pid)
                .into_iter()
                .filter(|t| !base_tids.contains(&t.0))
                .take(5);
            let names: Vec<String> = left
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
        judged_on: if named {
            "fds and ws-reader/ws-writer threads"
        } else {
            "fds and all threads"
        }
        .into(),
        errors,
        error_samples,
        baseline: base,
        connect_latency: latency(&hist),
        rss_growth_kib_round2_to_last: growth,
        rss_slope_kib_per_round: round(slope(&rss[from..]), 1),
        rss_slope_from_round: from as u64 + 1,
        rss_kib_by_round: rss,
        server_cpu_s: round(cpu0.zip(cpu1).map_or(0.0, |(a, b)| b - a), 3),
        wall_s: round(t_all.elapsed().as_secs_f64(), 3),
        per_round: rounds,
    }
}

/// Least-squares slope of `ys` against 0, 1, 2, … (0 for fewer than two points).
fn slope(ys: &[u64]) -> f64 {
    let n = ys.len() as f64;
    let (mx, my) = ((n - 1.0) / 2.0, ys.iter().sum::<u64>() as f64 / n);
    let sxy: f64 = ys
        .iter()
        .enumerate()
        .map(|(i, &y)| (i as f64 - mx) * (y as f64 - my))
        .sum();
    let sxx: f64 = (0..ys.len()).map(|i| (i as f64 - mx).powi(2)).sum();
    if ys.len() < 2 {
        0.0
    } else {
        sxy / sxx
    }
}
