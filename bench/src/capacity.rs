//! Workload 3: idle clients in rooms of `room_size`, up to the server's cap, then `extra` more.
//!
//! Reports connect time, server RSS per client (overall and as the slope between checkpoints),
//! threads, fds and memory maps, a /proc/PID/smaps breakdown of what grew, how the over-cap
//! attempts were answered (503 expected), whether `/healthz` still answers, and whether an early
//! client still receives a message sent after all that. With the per-client RSS it reports the
//! host's kernel memory per client (`/proc/meminfo`: kernel stacks, page tables, slab), which
//! RSS does not show: a thread's kernel stack is not in its process's RSS.

use crate::args::Args;
use crate::procfs;
use crate::results::{Capacity, Checkpoint, OverCap};
use crate::stats::{delta, latency, new_hist, record, round};
use crate::ws::{connect, hello, now_nanos, ConnectError, ConnectOpts, Ws};
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::{sleep, timeout};
use tokio_tungstenite::tungstenite::Message;

/// What to run.
#[derive(Clone, Debug)]
pub struct Params {
    /// WebSocket address.
    pub addr: SocketAddr,
    /// HTTP address for `/healthz` (the same as `addr` for the Node peer).
    pub http: Option<SocketAddr>,
    /// Server pid.
    pub pid: u32,
    /// Clients to hold.
    pub clients: usize,
    /// Clients per room.
    pub room_size: usize,
    /// Attempts past `clients` (expected to be refused with 503 when `clients` is the cap).
    pub extra: usize,
    /// Connections opened at once.
    pub concurrency: usize,
    /// Sample the server every this many clients.
    pub checkpoint: usize,
    /// Client read buffer.
    pub read_buffer: usize,
    /// Read /proc/PID/smaps before and after (slow with many maps, but it is the evidence).
    pub smaps: bool,
}

impl Params {
    /// From the `capacity` subcommand's flags.
    pub fn from_args(a: &Args) -> Result<Params, String> {
        Ok(Params {
            addr: a.required("ws")?,
            http: a.opt("http")?,
            pid: a.required("pid")?,
            clients: a.get("clients", 7000)?,
            room_size: a.get("room-size", 100)?,
            extra: a.get("extra", 500)?,
            concurrency: a.get("concurrency", 64)?,
            checkpoint: a.get("checkpoint", 1000)?,
            read_buffer: a.get("read-buffer", 4096)?,
            smaps: a.flag("smaps"),
        })
    }
}

/// Counters the idle clients share.
#[derive(Default)]
pub struct Shared {
    /// Clients the server closed after their welcome.
    pub dropped: AtomicU64,
    /// When the probe client saw the probe message (0: not yet).
    pub probe_ns: AtomicU64,
}

/// One idle client's orders.
pub struct IdleSpec {
    /// Server address.
    pub addr: SocketAddr,
    /// Room name.
    pub room: String,
    /// Client name.
    pub name: String,
    /// Connection options.
    pub opts: ConnectOpts,
    /// Messages to `say` when asked.
    pub cmd: Option<mpsc::Receiver<String>>,
    /// Record the arrival of a message whose text starts with `probe-`.
    pub watch_probe: bool,
}

/// Connects, says hello, waits for welcome; reports the time (ns) through `done`, then idles,
/// reading whatever comes, until the process ends or the server closes it.
pub async fn idle_client(
    mut spec: IdleSpec,
    sem: Arc<Semaphore>,
    shared: Arc<Shared>,
    done: oneshot::Sender<Result<u64, ConnectError>>,
) {
    let permit = sem.acquire_owned().await.ok();
    let t = Instant::now();
    let setup = async {
        let mut ws: Ws = connect(spec.addr, &spec.room, spec.opts).await?;
        hello(&mut ws, &spec.name)
            .await
            .map_err(|e| ConnectError::Other(format!("hello: {e}")))?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) if t.as_str().contains("\"type\":\"welcome\"") => {
                    return Ok(ws)
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(ConnectError::Other(format!("before welcome: {e}"))),
                None => return Err(ConnectError::Other("EOF before welcome".to_string())),
            }
        }
    };
    let mut ws = match timeout(spec.opts.timeout + Duration::from_secs(10), setup).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            let _ = done.send(Err(e));
            return;
        }
        Err(_) => {
            let _ = done.send(Err(ConnectError::Timeout));
            return;
        }
    };
    drop(permit);
    let _ = done.send(Ok(t.elapsed().as_nanos() as u64));
    loop {
        tokio::select! {
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    if spec.watch_probe && t.as_str().contains("\"text\":\"probe-") {
                        shared.probe_ns.store(now_nanos(), Ordering::SeqCst);
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                    shared.dropped.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                Some(Ok(_)) => {}
            },
            c = recv_cmd(&mut spec.cmd) => {
                let frame = format!("{{\"type\":\"say\",\"text\":\"{c}\"}}");
                if ws.send(Message::text(frame)).await.is_err() {
                    shared.dropped.fetch_add(1, Ordering::SeqCst);
                    return;
                }
            }
        }
    }
}

async fn recv_cmd(cmd: &mut Option<mpsc::Receiver<String>>) -> String {
    match cmd {
        Some(rx) => match rx.recv().await {
            Some(s) => s,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

fn kind(e: &ConnectError) -> String {
    match e {
        ConnectError::Status(s) => format!("http_{s}"),
        _ => "other".to_string(),
    }
}

/// Starts `n` idle clients from id `first`; their connect times (ns), or why they failed.
fn spawn_idle(
    p: &Params,
    first: usize,
    n: usize,
    sem: &Arc<Semaphore>,
    shared: &Arc<Shared>,
    probe_rx: &mut Option<mpsc::Receiver<String>>,
) -> Vec<oneshot::Receiver<Result<u64, ConnectError>>> {
    let opts = ConnectOpts {
        read_buffer: p.read_buffer,
        ..Default::default()
    };
    (first..first + n)
        .map(|id| {
            let (tx, rx) = oneshot::channel();
            let room = format!("cap{}", id / p.room_size.max(1));
            let name = format!("{}{id}", if id < p.clients { "i" } else { "x" });
            let cmd = if id == 1 { probe_rx.take() } else { None };
            let spec = IdleSpec {
                addr: p.addr,
                room,
                name,
                opts,
                cmd,
                watch_probe: id == 0,
            };
            tokio::spawn(idle_client(spec, sem.clone(), shared.clone(), tx));
            rx
        })
        .collect()
}

/// Runs the workload and returns its figures.
pub async fn run(p: Params) -> Capacity {
    let (pid, shared) = (p.pid, Arc::new(Shared::default()));
    let sem = Arc::new(Semaphore::new(p.concurrency.max(1)));
    let smaps0 = p.smaps.then(|| procfs::smaps(pid)).flatten();
    let base = procfs::sample_with_maps(pid).unwrap_or_default();
    let mem0 = procfs::meminfo();
    let srv_cpu0 = procfs::cpu_secs(Some(pid));

    let (probe_tx, probe_rx) = mpsc::channel::<String>(4);
    let mut probe_rx = Some(probe_rx);
    let mut hist = new_hist();
    let mut error_samples: Vec<String> = Vec::new();
    let (mut connected, mut connect_s) = (0u64, 0.0f64);
    let mut checkpoints: Vec<Checkpoint> = Vec::new();
    let mut start = 0usize;
    while start < p.clients {
        let end = (start + p.checkpoint.max(1)).min(p.clients);
        let t = Instant::now();
        for rx in spawn_idle(&p, start, end - start, &sem, &shared, &mut probe_rx) {
            match rx.await {
                Ok(Ok(ns)) => {
                    connected += 1;
                    record(&mut hist, ns);
                }
                Ok(Err(e)) if error_samples.len() < 5 => error_samples.push(e.to_string()),
                _ => {}
            }
        }
        connect_s += t.elapsed().as_secs_f64();
        let s = procfs::sample(pid).unwrap_or_default();
        checkpoints.push(Checkpoint {
            clients: connected,
            rss_kib: s.rss_kib,
            threads: s.threads,
            fds: s.fds,
        });
        start = end;
    }
    // Let joined frames and allocations settle before the big sample.
    sleep(Duration::from_millis(1000)).await;
    let full = procfs::sample_with_maps(pid).unwrap_or_default();
    let mem1 = procfs::meminfo();
    let smaps1 = p.smaps.then(|| procfs::smaps(pid)).flatten();
    let srv_cpu1 = procfs::cpu_secs(Some(pid));

    // Past the cap.
    let mut refused_503 = 0;
    for rx in spawn_idle(&p, p.clients, p.extra, &sem, &shared, &mut None) {
        match rx.await {
            Ok(Err(e)) if kind(&e) == "http_503" => refused_503 += 1,
            Ok(Err(e)) if error_samples.len() < 5 => {
                error_samples.push(format!("over the cap: {e}"))
            }
            _ => {}
        }
    }
    sleep(Duration::from_millis(300)).await;
    let healthz_status = match p.http {
        Some(h) => crate::health::fetch(h).await.ok().map(|(status, _)| status),
        None => None,
    };
    // An early client still gets messages: client 1 says something, client 0 must see it.
    let sent_ns = now_nanos();
    let probe_ok = probe_tx.send(format!("probe-{sent_ns}")).await.is_ok();
    let probe_deadline = Instant::now() + Duration::from_secs(5);
    while probe_ok && shared.probe_ns.load(Ordering::SeqCst) == 0 && Instant::now() < probe_deadline
    {
        sleep(Duration::from_millis(5)).await;
    }
    let probe_ns = shared.probe_ns.load(Ordering::SeqCst);
    let per_client = |a: u64, b: u64| (b as f64 - a as f64) / connected.max(1) as f64;
    // Slope between the first checkpoint and the last (excludes one-time growth).
    let (first, last) = (&checkpoints[0], &checkpoints[checkpoints.len() - 1]);
    let slope = (last.rss_kib as f64 - first.rss_kib as f64)
        / (last.clients as f64 - first.clients as f64).max(1.0);
    Capacity {
        clients_target: p.clients as u64,
        connected,
        error_samples,
        connect_s: round(connect_s, 3),
        connects_per_s: round(connected as f64 / connect_s.max(1e-9), 0),
        connect_latency: latency(&hist),
        server_before: base,
        server_full: full,
        rss_kib_per_client: round(per_client(base.rss_kib, full.rss_kib), 2),
        rss_kib_per_client_slope: round(slope, 2),
        threads_per_client: round(per_client(base.threads, full.threads), 3),
        maps_per_client: round(per_client(base.maps, full.maps), 3),
        kernel_kib_per_client: mem0
            .zip(mem1)
            .map(|(a, b)| procfs::meminfo_per_client(a, b, connected)),
        server_cpu_s_connecting: round(delta(srv_cpu0, srv_cpu1), 3),
        over_cap: OverCap {
            attempted: p.extra as u64,
            refused_503,
        },
        healthz_status,
        probe_received: probe_ns != 0,
        probe_latency_ms: (probe_ns != 0)
            .then(|| round(probe_ns.saturating_sub(sent_ns) as f64 / 1e6, 3)),
        dropped_by_server: shared.dropped.load(Ordering::SeqCst),
        checkpoints,
        smaps: smaps0
            .zip(smaps1)
            .map(|(a, b)| procfs::smaps_diff(&a, &b, connected)),
    }
}
