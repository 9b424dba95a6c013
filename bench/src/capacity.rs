//! Workload 3: idle clients in rooms of `--room-size`, up to the server's cap, then `--extra`
//! more.
//!
//! Reports connect time, threads, fds and memory maps, and memory per client at `--memory-at`
//! clients (the same N for every server, so that a build with a lower cap compares): the
//! server's RSS, a /proc/PID/smaps breakdown of what grew, and the host's kernel memory
//! (`/proc/meminfo`: kernel stacks, page tables, slab), which RSS does not show: a thread's
//! kernel stack is not in its process's RSS. Then how the over-cap attempts were answered (503
//! expected), whether `/healthz` still answers, and whether an early client still receives a
//! message sent after all that.

use crate::client::{healthz_status, join, latency, now_nanos, round, Tally, Target};
use crate::procfs;
use crate::results::{Capacity, Checkpoint, Sample};
use crate::Args;
use futures_util::{SinkExt, StreamExt};
use std::future::Future;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::sleep;
use tokio_tungstenite::tungstenite::Message;

/// Connections opened at once (the table's "connects/s (64 at a time)").
const CONCURRENCY: usize = 64;
/// tungstenite's read buffer per idle client.
const READ_BUFFER: usize = 4096;

/// What the idle clients share: the semaphore they connect under, how many the server closed
/// after their welcome, and when client 0 saw the probe message (0: not yet).
struct Shared {
    t: Target,
    room_size: usize,
    clients: usize,
    sem: Semaphore,
    dropped: AtomicU64,
    probe_ns: AtomicU64,
}

/// Starts idle clients `ids`: each joins, reports its connect time (or why it failed), then
/// reads whatever comes until the process ends. Client 1 says what `probe` sends it; client 0
/// records the arrival of a text starting with `probe-`.
fn spawn_idle(
    sh: &Arc<Shared>,
    ids: Range<usize>,
    probe: &mut Option<mpsc::Receiver<String>>,
) -> Vec<oneshot::Receiver<Result<u64, String>>> {
    let mut spawn = |id: usize| {
        let (tx, rx) = oneshot::channel();
        let (sh, mut cmd) = (sh.clone(), if id == 1 { probe.take() } else { None });
        let room = format!("cap{}", id / sh.room_size.max(1));
        let name = format!("{}{id}", if id < sh.clients { "i" } else { "x" });
        tokio::spawn(async move {
            let permit = sh.sem.acquire().await;
            let joined = join(sh.t.addr, &room, &name, READ_BUFFER, |_| {}).await;
            drop(permit);
            let _ = tx.send(joined.as_ref().map(|j| j.1).map_err(String::clone));
            let Ok((mut ws, _)) = joined else { return };
            loop {
                tokio::select! {
                    m = ws.next() => match m {
                        Some(Ok(Message::Text(t))) if id == 0 && t.as_str().contains("\"text\":\"probe-") => {
                            sh.probe_ns.store(now_nanos(), SeqCst);
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
            sh.dropped.fetch_add(1, SeqCst);
        });
        rx
    };
    ids.map(&mut spawn).collect()
}

/// Reads the flags; the workload, which returns its figures.
pub fn run(a: &Args) -> Result<impl Future<Output = Capacity>, String> {
    let (t, clients) = (Target::from_args(a)?, a.get("clients", 15_000)?);
    // The per-client memory figures are taken at `memory_at` clients; the server is sampled
    // every `checkpoint` clients; smaps is read before and at `memory_at` (slow with many maps,
    // but the evidence).
    let memory_at = a.get::<usize>("memory-at", clients)?.min(clients);
    let (room_size, extra) = (a.get("room-size", 100)?, a.get::<usize>("extra", 500)?);
    let (checkpoint, smaps) = (a.get::<usize>("checkpoint", 1000)?.max(1), a.flag("smaps"));
    let (dropped, probe_ns) = (AtomicU64::new(0), AtomicU64::new(0));
    let sem = Semaphore::new(CONCURRENCY);
    let sh = Arc::new(Shared {
        t,
        room_size,
        clients,
        sem,
        dropped,
        probe_ns,
    });
    Ok(async move {
        let pid = t.pid;
        let smaps0 = smaps.then(|| procfs::smaps(pid)).flatten();
        let (base, mem0) = (procfs::sample(pid).unwrap_or_default(), procfs::meminfo());
        let cpu0 = procfs::cpu_secs(Some(pid));
        let (probe_tx, probe_rx) = mpsc::channel::<String>(4);
        let (mut probe_rx, mut tally, mut connect_s) = (Some(probe_rx), Tally::new(), 0.0);
        let (mut start, mut at_memory, mut checkpoints) = (0, None, Vec::new());
        while start < clients {
            // A checkpoint at `memory_at` too.
            let end = (start + checkpoint).min(if start < memory_at {
                memory_at
            } else {
                clients
            });
            let t0 = Instant::now();
            for rx in spawn_idle(&sh, start..end, &mut probe_rx) {
                tally.add(rx.await.unwrap_or(Err("task ended".into())));
            }
            connect_s += t0.elapsed().as_secs_f64();
            let s = procfs::sample(pid).unwrap_or_default();
            checkpoints.push(Checkpoint {
                clients: tally.ok,
                rss_kib: s.rss_kib,
                threads: s.threads,
                fds: s.fds,
            });
            if end == memory_at {
                // Let joined frames and allocations settle before the big sample.
                sleep(Duration::from_secs(1)).await;
                let smaps = smaps.then(|| procfs::smaps(pid)).flatten();
                let sample = procfs::sample(pid).unwrap_or_default();
                at_memory = Some((tally.ok, sample, procfs::meminfo(), smaps));
            }
            start = end;
        }
        let at_memory = at_memory.unwrap_or((0, Sample::default(), None, None));
        let (mem_n, mem_sample, mem1, smaps1) = at_memory;
        let full = procfs::sample(pid).unwrap_or_default();
        let cpu_connecting = procfs::cpu_since(pid, cpu0);
        // Past the cap.
        let mut refused_503 = 0;
        for rx in spawn_idle(&sh, clients..clients + extra, &mut None) {
            match rx.await {
                Ok(Err(e)) if e == "http_503" => refused_503 += 1,
                Ok(Err(e)) => tally.error(format!("over the cap: {e}")),
                _ => {}
            }
        }
        sleep(Duration::from_millis(300)).await;
        let healthz_status = healthz_status(t.http).await;
        // An early client still gets messages: client 1 says something, client 0 must see it.
        let sent_ns = now_nanos();
        let probe_ok = probe_tx.send(format!("probe-{sent_ns}")).await.is_ok();
        let deadline = Instant::now() + Duration::from_secs(5);
        while probe_ok && sh.probe_ns.load(SeqCst) == 0 && Instant::now() < deadline {
            sleep(Duration::from_millis(5)).await;
        }
        let probe_ns = sh.probe_ns.load(SeqCst);
        let probe_ms = round(probe_ns.saturating_sub(sent_ns) as f64 / 1e6, 3);
        let per = |n: u64, a: u64, b: u64| round((b as f64 - a as f64) / n.max(1) as f64, 3);
        let connected = tally.ok;
        let diff = |(a, b): (procfs::Smaps, procfs::Smaps)| procfs::smaps_diff(&a, &b, mem_n);
        Capacity {
            clients_target: clients as u64,
            connected,
            connect_s: round(connect_s, 3),
            connects_per_s: round(connected as f64 / f64::max(connect_s, 1e-9), 0),
            connect_latency: latency(&tally.hist),
            error_samples: tally.errors,
            server_before: base,
            memory_at: mem_n,
            server_at_memory: mem_sample,
            server_full: full,
            rss_kib_per_client: per(mem_n, base.rss_kib, mem_sample.rss_kib),
            threads_per_client: per(connected, base.threads, full.threads),
            maps_per_client: per(connected, base.maps, full.maps),
            kernel_kib_per_client: mem0.zip(mem1).map_or_else(Default::default, |(a, b)| {
                procfs::meminfo_per_client(a, b, mem_n)
            }),
            server_cpu_s_connecting: cpu_connecting,
            over_cap_attempted: extra as u64,
            over_cap_refused_503: refused_503,
            healthz_status,
            probe_received: probe_ns != 0,
            probe_latency_ms: (probe_ns != 0).then_some(probe_ms),
            dropped_by_server: sh.dropped.load(SeqCst),
            checkpoints,
            smaps: smaps0.zip(smaps1).map(diff),
        }
    })
}
