//! Workload 3: idle clients in rooms of `room_size`, up to the server's cap, then `extra` more.
//!
//! Reports connect time, server RSS per client (overall and as the slope between checkpoints),
//! threads, fds and memory maps, a /proc/PID/smaps breakdown of what grew, how the over-cap
//! attempts were answered (503 expected), whether `/healthz` still answers, and whether an early
//! client still receives a message sent after all that.

use crate::procfs;
use crate::stats::{hist_json, new_hist, record, round};
use crate::ws::{connect, hello, now_nanos, ConnectError, ConnectOpts, Ws};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::BTreeMap;
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
    pub pid: Option<u32>,
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

/// `GET /healthz` over a fresh connection; the HTTP status, or an error.
pub async fn healthz(http: SocketAddr) -> Result<u16, String> {
    crate::health::fetch(http).await.map(|(status, _)| status)
}

fn kind(e: &ConnectError) -> String {
    match e {
        ConnectError::Status(s) => format!("http_{s}"),
        ConnectError::Timeout => "timeout".to_string(),
        ConnectError::Other(m) => {
            let m = m.to_lowercase();
            if m.contains("reset") {
                "reset".to_string()
            } else if m.contains("refused") {
                "refused".to_string()
            } else {
                "other".to_string()
            }
        }
    }
}

/// Runs the workload and returns its JSON report.
pub async fn run(p: Params) -> Value {
    let shared = Arc::new(Shared::default());
    let sem = Arc::new(Semaphore::new(p.concurrency.max(1)));
    let opts = ConnectOpts {
        read_buffer: p.read_buffer,
        ..Default::default()
    };
    let smaps0 = if p.smaps {
        p.pid.and_then(procfs::smaps)
    } else {
        None
    };
    let base = p.pid.and_then(procfs::sample_with_maps);
    let self_cpu0 = procfs::cpu_secs(None);
    let srv_cpu0 = p.pid.and_then(|pid| procfs::cpu_secs(Some(pid)));

    let (probe_tx, probe_rx) = mpsc::channel::<String>(4);
    let mut probe_rx = Some(probe_rx);
    let mut hist = new_hist();
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut error_samples: Vec<String> = Vec::new();
    let mut connected = 0usize;
    let mut connect_s = 0.0f64;
    let mut checkpoints: Vec<Value> = Vec::new();
    let mut start = 0usize;
    while start < p.clients {
        let end = (start + p.checkpoint.max(1)).min(p.clients);
        let t = Instant::now();
        let mut waits = Vec::with_capacity(end - start);
        for id in start..end {
            let (tx, rx) = oneshot::channel();
            let spec = IdleSpec {
                addr: p.addr,
                room: format!("cap{}", id / p.room_size.max(1)),
                name: format!("i{id}"),
                opts,
                cmd: if id == 1 { probe_rx.take() } else { None },
                watch_probe: id == 0,
            };
            tokio::spawn(idle_client(spec, sem.clone(), shared.clone(), tx));
            waits.push(rx);
        }
        for rx in waits {
            match rx.await {
                Ok(Ok(ns)) => {
                    connected += 1;
                    record(&mut hist, ns);
                }
                Ok(Err(e)) => {
                    *failures.entry(kind(&e)).or_default() += 1;
                    if error_samples.len() < 5 {
                        error_samples.push(e.to_string());
                    }
                }
                Err(_) => *failures.entry("task".to_string()).or_default() += 1,
            }
        }
        connect_s += t.elapsed().as_secs_f64();
        if let Some(s) = p.pid.and_then(procfs::sample) {
            checkpoints.push(json!({"clients": connected, "rss_kib": s.rss_kib,
                "threads": s.threads, "fds": s.fds}));
        }
        start = end;
    }
    // Let joined frames and allocations settle before the big sample.
    sleep(Duration::from_millis(1000)).await;
    let full = p.pid.and_then(procfs::sample_with_maps);
    let smaps1 = if p.smaps {
        p.pid.and_then(procfs::smaps)
    } else {
        None
    };
    let srv_cpu1 = p.pid.and_then(|pid| procfs::cpu_secs(Some(pid)));

    // Past the cap.
    let mut over: BTreeMap<String, u64> = BTreeMap::new();
    let mut over_samples: Vec<String> = Vec::new();
    let t_over = Instant::now();
    if p.extra > 0 {
        let mut waits = Vec::with_capacity(p.extra);
        for k in 0..p.extra {
            let id = p.clients + k;
            let (tx, rx) = oneshot::channel();
            let spec = IdleSpec {
                addr: p.addr,
                room: format!("cap{}", id / p.room_size.max(1)),
                name: format!("x{id}"),
                opts,
                cmd: None,
                watch_probe: false,
            };
            tokio::spawn(idle_client(spec, sem.clone(), shared.clone(), tx));
            waits.push(rx);
        }
        for rx in waits {
            let k = match rx.await {
                Ok(Ok(_)) => "accepted".to_string(),
                Ok(Err(e)) => {
                    if over_samples.len() < 3 && !matches!(e, ConnectError::Status(503)) {
                        over_samples.push(e.to_string());
                    }
                    kind(&e)
                }
                Err(_) => "task".to_string(),
            };
            *over.entry(k).or_default() += 1;
        }
    }
    let over_s = t_over.elapsed().as_secs_f64();
    sleep(Duration::from_millis(300)).await;
    let after_over = p.pid.and_then(procfs::sample);
    let health = match p.http {
        Some(h) => healthz(h).await,
        None => Err("no http address".to_string()),
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
    let alive = p.pid.map(procfs::alive);

    let per_client = |a: Option<procfs::Sample>| match (base, a) {
        (Some(b), Some(a)) if connected > 0 => Some(round(
            (a.rss_kib as f64 - b.rss_kib as f64) / connected as f64,
            2,
        )),
        _ => None,
    };
    // Slope between the first checkpoint and the last (excludes one-time growth).
    let slope = if checkpoints.len() >= 2 {
        let a = &checkpoints[0];
        let b = &checkpoints[checkpoints.len() - 1];
        let dc = b["clients"].as_f64().unwrap_or(0.0) - a["clients"].as_f64().unwrap_or(0.0);
        let dr = b["rss_kib"].as_f64().unwrap_or(0.0) - a["rss_kib"].as_f64().unwrap_or(0.0);
        (dc > 0.0).then(|| round(dr / dc, 2))
    } else {
        None
    };
    let smaps = match (smaps0, smaps1) {
        (Some(a), Some(b)) => Some(procfs::smaps_diff(&a, &b, connected as u64)),
        _ => None,
    };
    let self_cpu1 = procfs::cpu_secs(None);
    json!({
        "workload": "capacity",
        "clients_target": p.clients,
        "room_size": p.room_size,
        "connected": connected,
        "failed": failures,
        "error_samples": error_samples,
        "connect_s": round(connect_s, 3),
        "connects_per_s": round(connected as f64 / connect_s.max(1e-9), 0),
        "connect_latency": hist_json(&hist),
        "server_before": base.map(|s| s.to_json()),
        "server_full": full.map(|s| s.to_json()),
        "server_after_over_cap": after_over.map(|s| s.to_json()),
        "rss_kib_per_client": per_client(full),
        "rss_kib_per_client_slope": slope,
        "threads_per_client": match (base, full) {
            (Some(b), Some(a)) if connected > 0 =>
                Some(round((a.threads as f64 - b.threads as f64) / connected as f64, 3)),
            _ => None,
        },
        "maps_per_client": match (base, full) {
            (Some(b), Some(a)) if connected > 0 =>
                Some(round((a.maps as f64 - b.maps as f64) / connected as f64, 3)),
            _ => None,
        },
        "server_cpu_s_connecting": match (srv_cpu0, srv_cpu1) {
            (Some(a), Some(b)) => Some(round(b - a, 3)),
            _ => None,
        },
        "checkpoints": checkpoints,
        "smaps": smaps,
        "over_cap": {
            "attempted": p.extra,
            "outcomes": over,
            "refused_503": over.get("http_503").copied().unwrap_or(0),
            "samples": over_samples,
            "seconds": round(over_s, 3),
        },
        "healthz_status": health.as_ref().ok(),
        "healthz_error": health.as_ref().err(),
        "probe_received": probe_ns != 0,
        "probe_latency_ms": (probe_ns != 0).then(|| round(probe_ns.saturating_sub(sent_ns) as f64 / 1e6, 3)),
        "dropped_by_server": shared.dropped.load(Ordering::SeqCst),
        "server_alive": alive,
        "client": {
            "cpu_s": match (self_cpu0, self_cpu1) { (Some(a), Some(b)) => Some(round(b - a, 3)), _ => None },
            "rss_kib": procfs::self_rss_kib(),
        },
    })
}
