//! Workload 3: idle clients in rooms of `room_size`, up to the server's cap, then `extra` more.
//!
//! Reports connect time, threads, fds and memory maps, and memory per client at `memory_at`
//! clients (the same N for every server, so that a build with a lower cap compares): the
//! server's RSS, a /proc/PID/smaps breakdown of what grew, and the host's kernel memory
//! (`/proc/meminfo`: kernel stacks, page tables, slab), which RSS does not show: a thread's
//! kernel stack is not in its process's RSS. Then how the over-cap attempts were answered (503
//! expected), whether `/healthz` still answers, and whether an early client still receives a
//! message sent after all that.

use crate::client::{healthz, join, latency, new_hist, now_nanos, round, Target};
use crate::procfs;
use crate::results::{Capacity, Checkpoint, Sample};
use crate::Args;
use futures_util::{SinkExt, StreamExt};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::sleep;
use tokio_tungstenite::tungstenite::Message;

/// What to run.
#[derive(Clone, Debug)]
pub struct Params {
    pub target: Target,
    /// Clients to hold.
    pub clients: usize,
    /// Take the per-client memory figures at this many clients.
    pub memory_at: usize,
    pub room_size: usize,
    /// Attempts past `clients` (expected to be refused with 503 when `clients` is the cap).
    pub extra: usize,
    /// Sample the server every this many clients.
    pub checkpoint: usize,
    /// Read /proc/PID/smaps before and at `memory_at` (slow with many maps, but the evidence).
    pub smaps: bool,
}

impl Params {
    pub fn from_args(a: &Args) -> Result<Params, String> {
        let clients = a.get("clients", 15_000)?;
        Ok(Params {
            target: Target::from_args(a)?,
            clients,
            memory_at: a.get::<usize>("memory-at", clients)?.min(clients),
            room_size: a.get("room-size", 100)?,
            extra: a.get("extra", 500)?,
            checkpoint: a.get("checkpoint", 1000)?,
            smaps: a.flag("smaps"),
        })
    }
}

/// Connections opened at once (the table's "connects/s (64 at a time)").
const CONCURRENCY: usize = 64;
/// tungstenite's read buffer per idle client.
const READ_BUFFER: usize = 4096;

/// Counters the idle clients share.
#[derive(Default)]
struct Shared {
    /// Clients the server closed after their welcome.
    dropped: AtomicU64,
    /// When client 0 saw the probe message (0: not yet).
    probe_ns: AtomicU64,
}

/// Starts idle clients `ids`: each joins, reports its connect time (or why it failed), then
/// reads whatever comes until the process ends. Client 1 says what `probe` sends it; client 0
/// records the arrival of a text starting with `probe-`.
fn spawn_idle(
    p: &Params,
    ids: Range<usize>,
    sem: &Arc<Semaphore>,
    shared: &Arc<Shared>,
    probe: &mut Option<mpsc::Receiver<String>>,
) -> Vec<oneshot::Receiver<Result<u64, String>>> {
    let mut spawn = |id: usize| {
        let (tx, rx) = oneshot::channel();
        let (sem, shared) = (sem.clone(), shared.clone());
        let mut cmd = if id == 1 { probe.take() } else { None };
        let room = format!("cap{}", id / p.room_size.max(1));
        let name = format!("{}{id}", if id < p.clients { "i" } else { "x" });
        let addr = p.target.addr;
        tokio::spawn(async move {
            let permit = sem.acquire_owned().await;
            let mut ws = match join(addr, &room, &name, READ_BUFFER, |_| {}).await {
                Ok((ws, ns)) => {
                    let _ = tx.send(Ok(ns));
                    ws
                }
                Err(e) => return drop(tx.send(Err(e))),
            };
            drop(permit);
            loop {
                tokio::select! {
                    m = ws.next() => match m {
                        Some(Ok(Message::Text(t))) if id == 0 && t.as_str().contains("\"text\":\"probe-") => {
                            shared.probe_ns.store(now_nanos(), SeqCst);
                        }
                        Some(Ok(Message::Close(_)) | Err(_)) | None => break,
                        _ => {}
                    },
                    Some(text) = async { cmd.as_mut()?.recv().await }, if cmd.is_some() => {
                        let say = format!("{{\"type\":\"say\",\"text\":\"{text}\"}}");
                        if ws.send(Message::text(say)).await.is_err() {
                            break;
                        }
                    }
                }
            }
            shared.dropped.fetch_add(1, SeqCst);
        });
        rx
    };
    ids.map(&mut spawn).collect()
}

/// Runs the workload and returns its figures.
pub async fn run(p: Params) -> Capacity {
    let (pid, shared) = (p.target.pid, Arc::new(Shared::default()));
    let sem = Arc::new(Semaphore::new(CONCURRENCY));
    let smaps0 = p.smaps.then(|| procfs::smaps(pid)).flatten();
    let (base, mem0) = (procfs::sample(pid).unwrap_or_default(), procfs::meminfo());
    let srv_cpu0 = procfs::cpu_secs(Some(pid));

    let (probe_tx, probe_rx) = mpsc::channel::<String>(4);
    let mut probe_rx = Some(probe_rx);
    let (mut hist, mut errors) = (new_hist(), Vec::new());
    let (mut connected, mut connect_s, mut checkpoints) = (0u64, 0.0, Vec::new());
    let (mut start, mut at_memory) = (0, None);
    while start < p.clients {
        // A checkpoint at `memory_at` too.
        let stop = if start < p.memory_at {
            p.memory_at
        } else {
            p.clients
        };
        let end = (start + p.checkpoint.max(1)).min(stop);
        let t = Instant::now();
        for rx in spawn_idle(&p, start..end, &sem, &shared, &mut probe_rx) {
            match rx.await {
                Ok(Ok(ns)) => {
                    connected += 1;
                    hist.saturating_record(ns.max(1));
                }
                Ok(Err(e)) if errors.len() < 5 => errors.push(e),
                _ => {}
            }
        }
        connect_s += t.elapsed().as_secs_f64();
        let s = procfs::sample(pid).unwrap_or_default();
        let (rss_kib, threads, fds) = (s.rss_kib, s.threads, s.fds);
        checkpoints.push(Checkpoint {
            clients: connected,
            rss_kib,
            threads,
            fds,
        });
        if end == p.memory_at {
            // Let joined frames and allocations settle before the big sample.
            sleep(Duration::from_secs(1)).await;
            let smaps = p.smaps.then(|| procfs::smaps(pid)).flatten();
            at_memory = Some((
                connected,
                procfs::sample(pid).unwrap_or_default(),
                procfs::meminfo(),
                smaps,
            ));
        }
        start = end;
    }
    let (mem_n, mem_sample, mem1, smaps1) = at_memory.unwrap_or((0, Sample::default(), None, None));
    let full = procfs::sample(pid).unwrap_or_default();
    let srv_cpu1 = procfs::cpu_secs(Some(pid));

    // Past the cap.
    let mut refused_503 = 0;
    for rx in spawn_idle(&p, p.clients..p.clients + p.extra, &sem, &shared, &mut None) {
        match rx.await {
            Ok(Err(e)) if e == "http_503" => refused_503 += 1,
            Ok(Err(e)) if errors.len() < 5 => errors.push(format!("over the cap: {e}")),
            _ => {}
        }
    }
    sleep(Duration::from_millis(300)).await;
    let healthz_status = match p.target.http {
        Some(h) => healthz(h).await.ok().map(|(status, _)| status),
        None => None,
    };
    // An early client still gets messages: client 1 says something, client 0 must see it.
    let sent_ns = now_nanos();
    let probe_ok = probe_tx.send(format!("probe-{sent_ns}")).await.is_ok();
    let probe_deadline = Instant::now() + Duration::from_secs(5);
    while probe_ok && shared.probe_ns.load(SeqCst) == 0 && Instant::now() < probe_deadline {
        sleep(Duration::from_millis(5)).await;
    }
    let probe_ns = shared.probe_ns.load(SeqCst);
    let per = |n: u64, a: u64, b: u64| round((b as f64 - a as f64) / n.max(1) as f64, 3);
    Capacity {
        clients_target: p.clients as u64,
        connected,
        error_samples: errors,
        connect_s: round(connect_s, 3),
        connects_per_s: round(connected as f64 / connect_s.max(1e-9), 0),
        connect_latency: latency(&hist),
        server_before: base,
        memory_at: mem_n,
        server_at_memory: mem_sample,
        server_full: full,
        rss_kib_per_client: per(mem_n, base.rss_kib, mem_sample.rss_kib),
        threads_per_client: per(connected, base.threads, full.threads),
        maps_per_client: per(connected, base.maps, full.maps),
        kernel_kib_per_client: mem0
            .zip(mem1)
            .map(|(a, b)| procfs::meminfo_per_client(a, b, mem_n))
            .unwrap_or_default(),
        server_cpu_s_connecting: round(srv_cpu0.zip(srv_cpu1).map_or(0.0, |(a, b)| b - a), 3),
        over_cap_attempted: p.extra as u64,
        over_cap_refused_503: refused_503,
        healthz_status,
        probe_received: probe_ns != 0,
        probe_latency_ms: (probe_ns != 0)
            .then(|| round(probe_ns.saturating_sub(sent_ns) as f64 / 1e6, 3)),
        dropped_by_server: shared.dropped.load(SeqCst),
        checkpoints,
        smaps: smaps0
            .zip(smaps1)
            .map(|(a, b)| procfs::smaps_diff(&a, &b, mem_n)),
    }
}
