//! Clients that come and go. Workload 4 (join storm): `clients` connect to one room at the same
//! instant; time until every one has its `welcome`, and whether every earlier member heard every
//! later `joined`. Workload 6 (churn): rounds of clients that connect, each say one message,
//! wait for its echo and leave with a close handshake; after each round the server's threads and
//! fds must return to their idle baseline, and RSS is recorded per round (it must not grow round
//! over round).

use crate::client::{classify, echo, join, latency, round, Frame, Tally, Target};
use crate::procfs;
use crate::results::{Churn, JoinStorm, Round, Sample};
use crate::Args;
use futures_util::StreamExt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Semaphore};
use tokio::time::{sleep, timeout};

/// Workload 4: `clients` join room `storm` at once.
pub async fn join_storm(t: Target, clients: usize) -> JoinStorm {
    let joined = Arc::new(AtomicU64::new(0));
    let (done_tx, done_rx) = watch::channel(false);
    let (cpu0, t0) = (procfs::cpu_secs(Some(t.pid)), Instant::now());
    let client = |id: usize| {
        let (joined, mut done) = (joined.clone(), done_rx.clone());
        let count = move |f: Frame| {
            if f == Frame::Joined {
                joined.fetch_add(1, Relaxed);
            }
        };
        async move {
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
        }
    };
    let tasks: Vec<_> = (0..clients).map(|id| tokio::spawn(client(id))).collect();
    let mut tally = Tally::new();
    for task in tasks {
        tally.add(task.await.map_err(|e| e.to_string()).and_then(|r| r));
    }
    let (all_s, server_cpu_s) = (t0.elapsed().as_secs_f64(), procfs::cpu_since(t.pid, cpu0));
    // Every member hears every later join: n(n-1)/2 `joined` frames in all.
    let expected = tally.ok * tally.ok.saturating_sub(1) / 2;
    let deadline = Instant::now() + Duration::from_secs(5);
    while joined.load(Relaxed) < expected && Instant::now() < deadline {
        sleep(Duration::from_millis(10)).await;
    }
    let joined_s = t0.elapsed().as_secs_f64();
    let _ = done_tx.send(true);
    JoinStorm {
        clients: clients as u64,
        welcomed: tally.ok,
        all_welcomed_s: round(all_s, 4),
        welcome_latency: latency(&tally.hist),
        error_samples: tally.errors,
        joined_frames: joined.load(Relaxed),
        joined_frames_expected: expected,
        all_joined_seen_s: round(joined_s, 4),
        server_cpu_s,
        server_after: procfs::sample(t.pid).unwrap_or_default(),
    }
}

/// W6: connections opened at once.
const CONCURRENCY: usize = 200;
/// W6: the longest wait for threads and fds to come back after a round.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// One churning client: joins (counted in `ready`, joined or not), reads until `go`, says one
/// message and waits for its echo, then closes and reads until the server ends the connection.
/// Its connect time.
async fn churner(
    (id, room, t): (u32, String, Target),
    (sem, ready): (Arc<Semaphore>, Arc<AtomicU64>),
    mut go: watch::Receiver<bool>,
) -> Result<u64, String> {
    let permit = sem.acquire().await;
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
    let echoed = timeout(Duration::from_secs(10), echo(&mut ws, id)).await;
    echoed.map_err(|_| "no echo in 10 s".to_string())??;
    // Leave politely: close, then read until the server ends the connection.
    ws.close(None).await.map_err(|e| format!("close: {e}"))?;
    let end = async { while let Some(Ok(_)) = ws.next().await {} };
    let closed = timeout(Duration::from_secs(5), end).await;
    let late = |_| "not closed by the server within 5 s".to_string();
    closed.map(|_| ns).map_err(late)
}

/// Threads named like a connection's (chatroom: `ws-reader-N`, `ws-writer-N`).
pub fn conn_threads(pid: u32) -> u64 {
    let conn =
        |t: &&(u32, String, String)| t.1.starts_with("ws-reader") || t.1.starts_with("ws-writer");
    procfs::threads(pid).iter().filter(conn).count() as u64
}

/// Looks at the server every `every` until `back(sample, connection threads)` holds or `limit`
/// has passed: the last look, and whether it was back.
pub async fn settle(
    pid: u32,
    (limit, every): (Duration, Duration),
    back: impl Fn(&Sample, u64) -> bool,
) -> (Sample, u64, bool) {
    let t = Instant::now();
    loop {
        let (s, conn) = (procfs::sample(pid).unwrap_or_default(), conn_threads(pid));
        if back(&s, conn) || t.elapsed() >= limit {
            return (s, conn, back(&s, conn));
        }
        sleep(every).await;
    }
}

/// Reads the flags; workload 6, which returns its figures.
pub fn run(a: &Args) -> Result<impl Future<Output = Churn>, String> {
    let (t, rounds) = (Target::from_args(a)?, a.get("rounds", 10)?);
    let clients: usize = a.get("clients", 1000)?;
    let room_size: usize = a.get::<usize>("room-size", 100)?.max(1);
    Ok(async move {
        let pid = t.pid;
        sleep(Duration::from_millis(300)).await;
        let base = procfs::sample(pid).unwrap_or_default();
        let base_tids: Vec<u32> = procfs::threads(pid).into_iter().map(|t| t.0).collect();
        let (cpu0, t_all, mut tally) = (procfs::cpu_secs(Some(pid)), Instant::now(), Tally::new());
        let (mut per_round, mut all_back, mut named) = (Vec::new(), true, false);
        for r in 0..rounds {
            let sem = Arc::new(Semaphore::new(CONCURRENCY));
            let shared = (sem, Arc::new(AtomicU64::new(0)));
            let (go_tx, go_rx) = watch::channel(false);
            let client = |k: usize| {
                let room = format!("churn{}", k / room_size);
                let me = ((r * clients + k) as u32, room, t);
                tokio::spawn(churner(me, shared.clone(), go_rx.clone()))
            };
            let tasks: Vec<_> = (0..clients).map(client).collect();
            let deadline = Instant::now() + Duration::from_secs(60);
            while shared.1.load(Relaxed) < clients as u64 && Instant::now() < deadline {
                sleep(Duration::from_millis(5)).await;
            }
            let peak = procfs::sample(pid).unwrap_or_default();
            // A server that names its per-connection threads (chatroom: `ws-reader-N`,
            // `ws-writer-N`) is judged on those; other threads (chatroom's HTTP side rebuilds
            // tiny_http every idle 10 s) may come and go. Otherwise: all threads.
            named |= conn_threads(pid) > 0;
            let _ = go_tx.send(true);
            for task in tasks {
                tally.add(task.await.map_err(|e| e.to_string()).and_then(|r| r));
            }
            // Wait for the server to let go of every thread and descriptor.
            let t_settle = Instant::now();
            let threads_back = |s: &Sample, conn: u64| {
                if named {
                    conn == 0
                } else {
                    s.threads <= base.threads
                }
            };
            let back = |s: &Sample, conn: u64| s.fds <= base.fds && threads_back(s, conn);
            let every = Duration::from_millis(20);
            let (last, conn, back) = settle(pid, (SETTLE_TIMEOUT, every), back).await;
            all_back &= back;
            // Which threads outlived their connections, and where they wait.
            if !back && tally.errors.len() < 5 {
                let new = |t: &(u32, String, String)| !base_tids.contains(&t.0);
                let left = procfs::threads(pid).into_iter().filter(new);
                let says = |(id, name, wchan)| format!("{id} {name} ({wchan})");
                let left: Vec<String> = left.take(5).map(says).collect();
                let (round, left) = (r + 1, left.join(", "));
                let why = format!("round {round}: threads left: {left}");
                tally.errors.push(why);
            }
            per_round.push(Round {
                round: r as u64 + 1,
                peak_threads: peak.threads,
                connection_threads: conn,
                threads: last.threads,
                fds: last.fds,
                rss_kib: last.rss_kib,
                settle_ms: round(t_settle.elapsed().as_secs_f64() * 1000.0, 1),
            });
        }
        let rss: Vec<u64> = per_round.iter().map(|r| r.rss_kib).collect();
        // glibc keeps freed memory (and up to 40 MiB of exited threads' stacks) after the first
        // rounds: judge the trend as a least-squares slope from round 3 on.
        let from = if rss.len() >= 5 { 2 } else { 1.min(rss.len()) };
        let growth = match rss.len() {
            0 | 1 => 0,
            2 => rss[1] as i64 - rss[0] as i64,
            n => rss[n - 1] as i64 - rss[1] as i64,
        };
        let judged_on = if named {
            "fds and ws-reader/ws-writer threads"
        } else {
            "fds and all threads"
        };
        Churn {
            all_back_to_baseline: all_back,
            judged_on: judged_on.into(),
            errors: tally.failed,
            connect_latency: latency(&tally.hist),
            error_samples: tally.errors,
            baseline: base,
            rss_growth_kib_round2_to_last: growth,
            rss_slope_kib_per_round: round(slope(&rss[from..]), 1),
            rss_slope_from_round: from as u64 + 1,
            rss_kib_by_round: rss,
            server_cpu_s: procfs::cpu_since(pid, cpu0),
            wall_s: round(t_all.elapsed().as_secs_f64(), 3),
            per_round,
        }
    })
}

/// Least-squares slope of `ys` against 0, 1, 2, … (0 for fewer than two points).
fn slope(ys: &[u64]) -> f64 {
    if ys.len() < 2 {
        return 0.0;
    }
    let n = ys.len() as f64;
    let (mx, my) = ((n - 1.0) / 2.0, ys.iter().sum::<u64>() as f64 / n);
    let dx = |i: usize| i as f64 - mx;
    let dev = |(i, &y): (usize, &u64)| dx(i) * (y as f64 - my);
    let sxy: f64 = ys.iter().enumerate().map(dev).sum();
    sxy / (0..ys.len()).map(|i| dx(i).powi(2)).sum::<f64>()
}
