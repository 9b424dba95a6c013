//! Workloads 1, 2 and 5: rooms of clients, some of them senders, every message checked at every
//! receiver of its room.
//!
//! Workload 1 (fan-out) runs closed-loop senders: each keeps at most `window` of its own
//! messages un-echoed. Workload 2 (moderate) runs open-loop senders at a fixed rate. Workload 5
//! is workload 2 plus one client that sends `hello` and then never reads again.
//!
//! Phases: `Setup` (connect, hello, welcome) → `Run` (senders send) → `Stop` (senders stop, and
//! say so) → `Drain` (the totals are final; each receiver reads until it has every message of its
//! room, or until the drain deadline). Lost = expected − received, per receiver.
//!
//! With the server's HTTP address, the history store is measured too (`store` in the JSON): its
//! counters from `/healthz` at the start of `Run`, at `Stop`, and once `unwritten` is back to 0
//! after the drain; and the CPU of the server's thread named `store` over that same window
//! (`/proc/PID/task/TID/stat`), so CPU per message written covers every message sent.

use crate::args::Args;
use crate::health;
use crate::procfs;
use crate::results::{ClientCpu, Slow, Store, StoreThread, ThreadStates, Traffic, TrafficServer};
use crate::stats::{delta, latency, new_hist, record, round};
use crate::ws::{
    bench_say, classify, connect, hello, now_nanos, padding, padding_wide, ConnectOpts, Frame,
};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::{interval_at, sleep, timeout, timeout_at, Interval, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;

/// How senders pace themselves.
#[derive(Clone, Copy, Debug)]
pub enum SendMode {
    /// At most `window` messages of each sender in flight; the next goes out when one lands.
    ClosedLoop {
        /// Messages in flight per sender.
        window: u32,
        /// `true`: a message is in flight until *every* receiver of the room has it, so no
        /// receiver of the load generator can fall more than `senders × window` messages behind
        /// (the server would rightly drop it as a slow consumer). `false`: until the sender's
        /// own echo comes back (the slowest receivers may then lag without bound).
        all_receivers: bool,
    },
    /// A fixed rate per sender, whatever the echoes do.
    OpenLoop {
        /// Messages per second per sender.
        rate_hz: f64,
    },
}

/// The stalled reader of workload 5.
#[derive(Clone, Copy, Debug)]
pub struct SlowSpec {
    /// Room index it joins.
    pub room: usize,
    /// Its SO_RCVBUF (`None`: the kernel's default).
    pub rcvbuf: Option<usize>,
    /// Extra characters (`€`, 3 bytes each) on messages sent in its room, so that the buffers
    /// between the server and the stalled reader fill in seconds, not minutes.
    pub room_pad: usize,
}

/// What to run.
#[derive(Clone, Debug)]
pub struct Params {
    /// The server's WebSocket address.
    pub addr: SocketAddr,
    /// The server's pid, for CPU and memory.
    pub pid: u32,
    /// The server's HTTP address, for the store's counters in `/healthz`.
    pub http: Option<SocketAddr>,
    /// Number of rooms.
    pub rooms: usize,
    /// Clients per room (senders included).
    pub per_room: usize,
    /// Senders per room.
    pub senders_per_room: usize,
    /// Pacing.
    pub mode: SendMode,
    /// Sending time.
    pub duration: Duration,
    /// Longest wait for the last messages after sending stops.
    pub drain_timeout: Duration,
    /// Extra text bytes per message (all rooms).
    pub pad: usize,
    /// Workload 5's stalled reader.
    pub slow: Option<SlowSpec>,
    /// Room name prefix.
    pub room_prefix: String,
    /// Connections opened at once during setup.
    pub connect_concurrency: usize,
    /// Client read buffer.
    pub read_buffer: usize,
    /// Pause between setup and sending (lets `joined` frames settle).
    pub settle: Duration,
}

impl Params {
    /// `fanout` (closed loop, W1 and W7) or `moderate` (open loop, W2 and W5 with `--slow`).
    pub fn from_args(a: &Args, fanout: bool) -> Result<Params, String> {
        let window_scope = a.opt_str("window-scope");
        let mode = match fanout {
            true => SendMode::ClosedLoop {
                window: a.get("window", 8)?,
                all_receivers: match window_scope.as_deref() {
                    None | Some("all") => true,
                    Some("own") => false,
                    Some(o) => return Err(format!("--window-scope all|own, not {o:?}")),
                },
            },
            false => SendMode::OpenLoop {
                rate_hz: a.get("rate", 20.0)?,
            },
        };
        let slow = (!fanout && a.flag("slow")).then_some(SlowSpec {
            room: 0,
            rcvbuf: a.opt("slow-rcvbuf")?,
            room_pad: a.get("slow-pad", 0)?,
        });
        Ok(Params {
            addr: a.required("ws")?,
            pid: a.required("pid")?,
            http: a.opt("http")?,
            rooms: a.get("rooms", if fanout { 1 } else { 20 })?,
            per_room: a.get(
                if fanout { "clients" } else { "per-room" },
                if fanout { 100 } else { 20 },
            )?,
            senders_per_room: a.get(
                if fanout {
                    "senders"
                } else {
                    "senders-per-room"
                },
                if fanout { 10 } else { 2 },
            )?,
            mode,
            duration: a.secs("duration", 10.0)?,
            drain_timeout: a.secs("drain-timeout", 5.0)?,
            pad: a.get("pad", 0)?,
            slow,
            room_prefix: a
                .opt_str("room")
                .unwrap_or_else(|| if fanout { "fanout" } else { "mod" }.to_string()),
            connect_concurrency: 50,
            read_buffer: a.get("read-buffer", 8 * 1024)?,
            settle: a.secs("settle", if fanout { 0.3 } else { 0.5 })?,
        })
    }
}

/// The name the stalled reader uses.
pub const SLOW_NAME: &str = "slow-consumer";

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Phase {
    Setup,
    Run,
    Stop,
    Drain,
}

struct Ctx {
    params: Params,
    room_names: Vec<String>,
    pads: Vec<String>,
    room_sent: Vec<AtomicU64>,
    ready: AtomicUsize,
    failed: AtomicUsize,
    active_senders: AtomicUsize,
    slow_left_ns: AtomicU64,
    connect_sem: Semaphore,
    run_start_ns: AtomicU64,
    drain_deadline: std::sync::Mutex<Option<tokio::time::Instant>>,
    /// Clients welcomed per room (receivers a message must reach to land).
    room_members: Vec<AtomicU64>,
    /// Per sender (`room * senders_per_room + k`): delivery counts of its messages in flight.
    slots: Vec<SenderSlots>,
    /// Stand-in for clients that send nothing.
    no_slot: SenderSlots,
}

/// Delivery accounting for one closed-loop sender whose window spans all receivers.
struct SenderSlots {
    /// Receivers that have message `seq`, at `seq % len`.
    counts: Vec<AtomicU64>,
    /// Messages every receiver has (they land in order: each receiver gets them in order).
    landed: AtomicU64,
    /// Wakes the sender when one lands.
    notify: Notify,
}

impl SenderSlots {
    fn new(window: u32) -> SenderSlots {
        SenderSlots {
            counts: (0..(2 * window.max(1)) as usize)
                .map(|_| AtomicU64::new(0))
                .collect(),
            landed: AtomicU64::new(0),
            notify: Notify::new(),
        }
    }
}

#[derive(Default)]
struct ClientOut {
    room: usize,
    received: u64,
    expected: u64,
    sent: u64,
    order_errors: u64,
    hist: Option<Histogram<u64>>,
    error: Option<String>,
    closed_early: bool,
}

#[derive(Default)]
struct SlowOut {
    connected: bool,
    ended: bool,
    close_code: Option<u16>,
    frames_read_after: u64,
    end_detail: String,
}

type PhaseFut = Pin<Box<dyn Future<Output = (Phase, watch::Receiver<Phase>)> + Send>>;

fn next_phase(mut rx: watch::Receiver<Phase>) -> PhaseFut {
    Box::pin(async move {
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        let p = *rx.borrow_and_update();
        (p, rx)
    })
}

async fn tick(t: &mut Option<Interval>) {
    match t {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Per-receiver sequence tracking: senders of one room are few, a linear scan is fastest.
struct SeqTrack(Vec<(u32, u64)>);

impl SeqTrack {
    /// Returns false when `seq` is not above the last one seen from `sender`.
    fn accept(&mut self, sender: u32, seq: u64) -> bool {
        for e in self.0.iter_mut() {
            if e.0 == sender {
                let ok = seq > e.1;
                e.1 = e.1.max(seq);
                return ok;
            }
        }
        self.0.push((sender, seq));
        true
    }
}

async fn client(
    id: u32,
    room: usize,
    sender: bool,
    ctx: Arc<Ctx>,
    phase_rx: watch::Receiver<Phase>,
) -> ClientOut {
    let mut out = ClientOut {
        room,
        ..Default::default()
    };
    let p = &ctx.params;
    let opts = ConnectOpts {
        read_buffer: p.read_buffer,
        ..Default::default()
    };
    let permit = ctx.connect_sem.acquire().await.ok();
    let mut ws = match connect(p.addr, &ctx.room_names[room], opts).await {
        Ok(ws) => ws,
        Err(e) => {
            out.error = Some(format!("connect: {e}"));
            ctx.failed.fetch_add(1, Ordering::SeqCst);
            if sender {
                ctx.active_senders.fetch_sub(1, Ordering::SeqCst);
            }
            return out;
        }
    };
    let setup = async {
        hello(&mut ws, &format!("c{id}"))
            .await
            .map_err(|e| e.to_string())?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    if classify(t.as_bytes()) == Frame::Welcome {
                        return Ok(());
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err("closed before welcome".to_string()),
            }
        }
    };
    match timeout(Duration::from_secs(20), setup).await {
        Ok(Ok(())) => {}
        r => {
            out.error = Some(match r {
                Ok(Err(e)) => format!("setup: {e}"),
                _ => "setup: no welcome within 20 s".to_string(),
            });
            ctx.failed.fetch_add(1, Ordering::SeqCst);
            if sender {
                ctx.active_senders.fetch_sub(1, Ordering::SeqCst);
            }
            return out;
        }
    }
    drop(permit);
    ctx.room_members[room].fetch_add(1, Ordering::SeqCst);
    ctx.ready.fetch_add(1, Ordering::SeqCst);

    let (window, all_receivers) = match p.mode {
        SendMode::ClosedLoop {
            window,
            all_receivers,
        } => (window, all_receivers),
        SendMode::OpenLoop { .. } => (0, false),
    };
    let spr = p.senders_per_room;
    let per_room = p.per_room as u64;
    let my_slot = if sender && all_receivers {
        &ctx.slots[room * spr + (id as usize % p.per_room)]
    } else {
        &ctx.no_slot
    };
    let notified = my_slot.notify.notified();
    tokio::pin!(notified);
    let mut members = 0u64;

    let mut hist = new_hist();
    let mut seqs = SeqTrack(Vec::with_capacity(4));
    let pad = ctx.pads[room].as_str();
    let in_slow_room = p.slow.map(|s| s.room == room).unwrap_or(false);
    let mut phase = *phase_rx.borrow();
    let mut phase_fut = next_phase(phase_rx);
    let mut seq: u64 = 0;
    let mut in_flight: u32 = 0;
    let mut ticker: Option<Interval> = None;
    let mut stopped = false;
    let far = tokio::time::Instant::now() + Duration::from_secs(3600);
    let deadline = tokio::time::sleep_until(far);
    tokio::pin!(deadline);

    macro_rules! send_one {
        ($l:lifetime) => {{
            seq += 1;
            if all_receivers {
                let n = my_slot.counts.len() as u64;
                my_slot.counts[(seq % n) as usize].store(0, Ordering::SeqCst);
            }
            ctx.room_sent[room].fetch_add(1, Ordering::SeqCst);
            out.sent += 1;
            if let Err(e) = ws.send(bench_say(id, seq, pad)).await {
                out.error = Some(format!("send: {e}"));
                out.closed_early = true;
                break $l;
            }
        }};
    }

    'main: loop {
        tokio::select! {
            biased;
            (np, rx) = &mut phase_fut => {
                phase = np;
                phase_fut = next_phase(rx);
                if sender && phase >= Phase::Stop && !stopped {
                    stopped = true;
                    ticker = None;
                    ctx.active_senders.fetch_sub(1, Ordering::SeqCst);
                }
                if phase == Phase::Run {
                    members = ctx.room_members[room].load(Ordering::SeqCst);
                }
                match phase {
                    Phase::Run if sender => match p.mode {
                        SendMode::ClosedLoop { .. } => {
                            for _ in 0..window {
                                in_flight += 1;
                                send_one!('main);
                            }
                        }
                        SendMode::OpenLoop { rate_hz } => {
                            let period = Duration::from_secs_f64(1.0 / rate_hz);
                            // Spread the senders' ticks over one period.
                            let offset = period.mul_f64(f64::from(id % 97) / 97.0);
                            let mut t = interval_at(tokio::time::Instant::now() + offset, period);
                            t.set_missed_tick_behavior(MissedTickBehavior::Burst);
                            ticker = Some(t);
                        }
                    },
                    Phase::Drain => {
                        out.expected = ctx.room_sent[room].load(Ordering::SeqCst);
                        let dl = ctx.drain_deadline.lock().unwrap().unwrap_or(far);
                        deadline.as_mut().reset(dl);
                        if out.received >= out.expected {
                            break;
                        }
                    }
                    _ => {}
                }
            }
            _ = tick(&mut ticker), if phase == Phase::Run => {
                send_one!('main);
            }
            _ = &mut notified, if sender && all_receivers => {
                notified.set(my_slot.notify.notified());
                while phase == Phase::Run
                    && seq.saturating_sub(my_slot.landed.load(Ordering::SeqCst)) < u64::from(window)
                {
                    send_one!('main);
                }
            }
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => match classify(t.as_bytes()) {
                    Frame::Bench { sender: s, seq: q, nanos } => {
                        record(&mut hist, now_nanos().saturating_sub(nanos));
                        out.received += 1;
                        if !seqs.accept(s, q) {
                            out.order_errors += 1;
                        }
                        if all_receivers && (s as u64 % per_room) < spr as u64 {
                            let k = (s as u64 / per_room) as usize * spr + (s as u64 % per_room) as usize;
                            if let Some(slot) = ctx.slots.get(k) {
                                let n = slot.counts.len() as u64;
                                let c = slot.counts[(q % n) as usize].fetch_add(1, Ordering::SeqCst) + 1;
                                if c == members {
                                    slot.landed.fetch_add(1, Ordering::SeqCst);
                                    slot.notify.notify_one();
                                }
                            }
                        }
                        if sender && s == id && !all_receivers {
                            if let SendMode::ClosedLoop { .. } = p.mode {
                                in_flight = in_flight.saturating_sub(1);
                                if phase == Phase::Run {
                                    in_flight += 1;
                                    send_one!('main);
                                }
                            }
                        }
                        if phase == Phase::Drain && out.received >= out.expected {
                            break;
                        }
                    }
                    Frame::Left(name) if in_slow_room && name == SLOW_NAME.as_bytes() => {
                        ctx.slow_left_ns.fetch_min(now_nanos(), Ordering::SeqCst);
                    }
                    _ => {}
                },
                Some(Ok(Message::Close(f))) => {
                    out.error = Some(format!("closed by server: {f:?}"));
                    out.closed_early = true;
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    out.error = Some(format!("read: {e}"));
                    out.closed_early = true;
                    break;
                }
                None => {
                    out.error = Some("closed by server (EOF)".to_string());
                    out.closed_early = true;
                    break;
                }
            },
            _ = &mut deadline, if phase == Phase::Drain => break,
        }
    }
    if sender && !stopped {
        ctx.active_senders.fetch_sub(1, Ordering::SeqCst);
    }
    if phase == Phase::Drain && out.expected == 0 {
        out.expected = ctx.room_sent[room].load(Ordering::SeqCst);
    } else if phase < Phase::Drain {
        // Ended early: everything its room will have sent counts as expected; filled in later.
        out.expected = u64::MAX;
    }
    out.hist = Some(hist);
    out
}

async fn slow_client(
    ctx: Arc<Ctx>,
    spec: SlowSpec,
    mut phase_rx: watch::Receiver<Phase>,
) -> SlowOut {
    let mut out = SlowOut::default();
    let opts = ConnectOpts {
        read_buffer: 4096,
        rcvbuf: spec.rcvbuf,
        ..Default::default()
    };
    let mut ws = match connect(ctx.params.addr, &ctx.room_names[spec.room], opts).await {
        Ok(ws) => ws,
        Err(e) => {
            out.end_detail = format!("connect: {e}");
            ctx.failed.fetch_add(1, Ordering::SeqCst);
            return out;
        }
    };
    if let Err(e) = hello(&mut ws, SLOW_NAME).await {
        out.end_detail = format!("hello: {e}");
        ctx.failed.fetch_add(1, Ordering::SeqCst);
        return out;
    }
    out.connected = true;
    ctx.ready.fetch_add(1, Ordering::SeqCst);
    // Never read until the run is over.
    let _ = phase_rx.wait_for(|p| *p == Phase::Drain).await;
    // Now drain what is buffered: a server that closed us shows an end (close frame, EOF, RST).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match timeout_at(deadline, ws.next()).await {
            Err(_) => {
                out.end_detail = "still open 5 s after the run".to_string();
                break;
            }
            Ok(None) => {
                out.ended = true;
                out.end_detail = "EOF".to_string();
                break;
            }
            Ok(Some(Err(e))) => {
                out.ended = true;
                out.end_detail = format!("{e}");
                break;
            }
            Ok(Some(Ok(Message::Close(f)))) => {
                out.ended = true;
                out.close_code = f.as_ref().map(|f| u16::from(f.code));
                out.end_detail = format!("close frame {f:?}");
                break;
            }
            Ok(Some(Ok(_))) => out.frames_read_after += 1,
        }
    }
    out
}

/// Runs the workload and returns its figures.
pub async fn run(params: Params) -> Traffic {
    let p = params.clone();
    let room_names: Vec<String> = (0..p.rooms)
        .map(|r| format!("{}{r}", p.room_prefix))
        .collect();
    let pads: Vec<String> = (0..p.rooms)
        .map(|r| match p.slow.filter(|s| s.room == r && s.room_pad > 0) {
            Some(s) => padding_wide(s.room_pad),
            None => padding(p.pad),
        })
        .collect();
    let total_senders = p.rooms * p.senders_per_room;
    let ctx = Arc::new(Ctx {
        params: params.clone(),
        room_names,
        pads,
        room_sent: (0..p.rooms).map(|_| AtomicU64::new(0)).collect(),
        ready: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        active_senders: AtomicUsize::new(total_senders),
        slow_left_ns: AtomicU64::new(u64::MAX),
        connect_sem: Semaphore::new(p.connect_concurrency.max(1)),
        run_start_ns: AtomicU64::new(0),
        drain_deadline: std::sync::Mutex::new(None),
        room_members: (0..p.rooms).map(|_| AtomicU64::new(0)).collect(),
        slots: (0..total_senders)
            .map(|_| {
                SenderSlots::new(match p.mode {
                    SendMode::ClosedLoop { window, .. } => window,
                    SendMode::OpenLoop { .. } => 1,
                })
            })
            .collect(),
        no_slot: SenderSlots::new(1),
    });
    let (phase_tx, phase_rx) = watch::channel(Phase::Setup);
    let mut handles = Vec::new();
    let mut id: u32 = 0;
    for room in 0..p.rooms {
        for k in 0..p.per_room {
            let sender = k < p.senders_per_room;
            handles.push(tokio::spawn(client(
                id,
                room,
                sender,
                ctx.clone(),
                phase_rx.clone(),
            )));
            id += 1;
        }
    }
    let total = handles.len() + usize::from(p.slow.is_some());
    let slow_handle = p
        .slow
        .map(|s| tokio::spawn(slow_client(ctx.clone(), s, phase_rx.clone())));

    // Setup: everyone welcomed (or failed), bounded.
    let setup_deadline = Instant::now() + Duration::from_secs(60);
    while ctx.ready.load(Ordering::SeqCst) + ctx.failed.load(Ordering::SeqCst) < total
        && Instant::now() < setup_deadline
    {
        sleep(Duration::from_millis(10)).await;
    }
    sleep(p.settle).await;

    let pid = p.pid;
    let (store0, store_json0) = health::store(p.http).await;
    // A memory-only server has nothing to write: don't wait for it.
    let store_on = store0.is_some() && store_json0.as_ref().is_some_and(|s| s["state"] != "memory");
    let threads0 = procfs::thread_cpu(pid);
    // Where the store thread's time goes when it is not on a CPU: 100 samples a second.
    let sampler = procfs::thread_id(pid, "store")
        .filter(|_| store_on)
        .and_then(|tid| procfs::StateSampler::start(pid, tid, Duration::from_millis(10)));
    let srv0 = procfs::sample(pid).unwrap_or_default();
    let cpu0 = procfs::cpu_secs(Some(pid));
    let self0 = procfs::cpu_secs(None);
    let t0 = Instant::now();
    ctx.run_start_ns.store(now_nanos(), Ordering::SeqCst);
    let _ = phase_tx.send(Phase::Run);
    let mut rss_max = srv0.rss_kib;
    while t0.elapsed() < p.duration {
        let left = p.duration.saturating_sub(t0.elapsed());
        sleep(left.min(Duration::from_millis(250))).await;
        rss_max = rss_max.max(procfs::sample(pid).map_or(0, |s| s.rss_kib));
    }
    let _ = phase_tx.send(Phase::Stop);
    let t_stop = Instant::now();
    let run_s = t_stop.duration_since(t0).as_secs_f64();
    let store_stop = if store_on {
        health::store(p.http).await.0
    } else {
        None
    };
    // Per kind of thread, over the sending time: once `Drain` begins, clients that have all
    // their messages close, and an exited thread's CPU can no longer be read.
    let threads_stop = procfs::thread_cpu(pid);
    let store_states = sampler.map(procfs::StateSampler::finish);
    let stop_deadline = Instant::now() + Duration::from_secs(5);
    while ctx.active_senders.load(Ordering::SeqCst) > 0 && Instant::now() < stop_deadline {
        sleep(Duration::from_millis(1)).await;
    }
    *ctx.drain_deadline.lock().unwrap() = Some(tokio::time::Instant::now() + p.drain_timeout);
    let _ = phase_tx.send(Phase::Drain);
    let mut outs = Vec::with_capacity(handles.len());
    for h in handles {
        let error = |e| ClientOut {
            error: Some(format!("task: {e}")),
            ..Default::default()
        };
        outs.push(h.await.unwrap_or_else(error));
    }
    let wall = t0.elapsed().as_secs_f64().max(1e-9);
    let cpu1 = procfs::cpu_secs(Some(pid));
    let self1 = procfs::cpu_secs(None);
    rss_max = rss_max.max(procfs::sample(pid).map_or(0, |s| s.rss_kib));
    let t_delivered = Instant::now();
    // Everything is delivered; now wait (bounded) for the store to commit the last batch.
    let (store_end, store_drained) = match store_on {
        true => {
            health::wait_written(p.http, Duration::from_millis(10), Duration::from_secs(10)).await
        }
        false => (None, None),
    };
    let (_, store_json_end) = health::store(p.http).await;
    let cpu2 = procfs::cpu_secs(Some(pid));
    let threads2 = procfs::thread_cpu(pid);
    let store_window_s = t0.elapsed().as_secs_f64();
    let slow = match slow_handle {
        Some(h) => h.await.ok(),
        None => None,
    };

    // Aggregate.
    let room_sent: Vec<u64> = ctx
        .room_sent
        .iter()
        .map(|a| a.load(Ordering::SeqCst))
        .collect();
    let sent: u64 = room_sent.iter().sum();
    let (mut all, mut other_rooms, mut slow_room) = (new_hist(), new_hist(), new_hist());
    let (mut deliveries, mut expected, mut order_errors, mut closed_early) =
        (0u64, 0u64, 0u64, 0u64);
    let mut error_samples: Vec<String> = Vec::new();
    for o in &outs {
        let exp = if o.expected == u64::MAX {
            room_sent.get(o.room).copied().unwrap_or(0)
        } else {
            o.expected
        };
        deliveries += o.received;
        expected += exp;
        order_errors += o.order_errors;
        closed_early += u64::from(o.closed_early);
        if let Some(e) = o.error.as_ref().filter(|_| error_samples.len() < 5) {
            error_samples.push(e.clone());
        }
        if let Some(h) = &o.hist {
            let _ = all.add(h);
            let _ = if p.slow.is_some_and(|s| s.room == o.room) {
                slow_room.add(h)
            } else {
                other_rooms.add(h)
            };
        }
    }
    let server_cpu = delta(cpu0, cpu1);
    let client_cpu = delta(self0, self1);
    let per_delivery = |cpu: f64| round(cpu * 1e6 / deliveries.max(1) as f64, 3);
    let store = store_report(StoreWindow {
        before: store0,
        at_stop: store_stop,
        end: store_end,
        drained: store_drained,
        state_end: store_json_end,
        run_s,
        window_s: store_window_s,
        t_stop,
        t_delivered,
        thread: procfs_store_cpu(&threads0, &threads2),
        server_cpu_s: delta(cpu0, cpu2),
        sent,
        deliveries,
        states: store_states,
    });
    let slow = p.slow.zip(slow).map(|(_, slow)| {
        let start = ctx.run_start_ns.load(Ordering::SeqCst);
        let left = ctx.slow_left_ns.load(Ordering::SeqCst);
        Slow {
            left_seen: left != u64::MAX,
            left_seen_after_s: (left != u64::MAX)
                .then(|| round(left.saturating_sub(start) as f64 / 1e9, 3)),
            closed_by_server: slow.ended,
            close_code: slow.close_code,
            latency_other_rooms: latency(&other_rooms),
            latency_slow_room: latency(&slow_room),
            rss_kib_growth_max: rss_max.saturating_sub(srv0.rss_kib),
        }
    });
    Traffic {
        sent,
        sent_per_s: round(sent as f64 / wall, 0),
        deliveries_per_s: round(deliveries as f64 / wall, 0),
        lost: expected.saturating_sub(deliveries),
        order_errors,
        clients_closed_early: closed_early,
        error_samples,
        latency: latency(&all),
        server: TrafficServer {
            cpu_us_per_delivery: per_delivery(server_cpu),
            cpu_util: round(server_cpu / wall, 3),
            threads: srv0.threads,
            rss_kib_max: rss_max,
            cpu_by_thread_kind: procfs::thread_cpu_per_delivery(
                &threads0,
                &threads_stop,
                deliveries,
            ),
        },
        client: ClientCpu {
            cpu_us_per_delivery: per_delivery(client_cpu),
            cpu_util: round(client_cpu / wall, 3),
        },
        store,
        slow,
    }
}

/// What [`run`] saw of the history store.
struct StoreWindow {
    before: Option<health::StoreCounters>,
    at_stop: Option<health::StoreCounters>,
    end: Option<health::StoreCounters>,
    drained: Option<Duration>,
    state_end: Option<serde_json::Value>,
    /// Sending time, `Run` to `Stop`.
    run_s: f64,
    /// `Run` until `unwritten` was back to 0 (or the wait gave up).
    window_s: f64,
    t_stop: Instant,
    t_delivered: Instant,
    /// CPU of the `store` thread over the window.
    thread: Option<procfs::ThreadCpu>,
    /// CPU of the whole server over the same window.
    server_cpu_s: f64,
    sent: u64,
    deliveries: u64,
    states: Option<ThreadStates>,
}

/// The `store` thread's CPU between two readings (`None` if the server has no such thread).
fn procfs_store_cpu(
    before: &std::collections::BTreeMap<String, procfs::ThreadCpu>,
    after: &std::collections::BTreeMap<String, procfs::ThreadCpu>,
) -> Option<procfs::ThreadCpu> {
    let a = after.get("store")?;
    Some(a.since(before.get("store").copied().unwrap_or_default()))
}

/// The store's figures: rates, the drain of `unwritten`, and CPU per message. `None` for a
/// server that keeps no history (no counters at the start, or no `store` thread).
fn store_report(w: StoreWindow) -> Option<Store> {
    let (c0, cs, t, states) = (w.before?, w.at_stop?, w.thread?, w.states?);
    let state = w.state_end.unwrap_or_default();
    let run = w.run_s.max(1e-9);
    let written = w.end.map_or(0, |e| e.written.saturating_sub(c0.written));
    let n = written.max(1) as f64;
    let since = |from: Instant| {
        w.drained
            .zip(w.end)
            .map(|(_, e)| round(e.at.saturating_duration_since(from).as_secs_f64(), 3))
    };
    Some(Store {
        state: state["state"].as_str().unwrap_or("?").to_string(),
        dropped: state["dropped"]
            .as_u64()
            .map_or(0, |d| d.saturating_sub(c0.dropped)),
        sent_by_load_generator: w.sent,
        written_in_window: written,
        accepted_per_s: round(cs.accepted().saturating_sub(c0.accepted()) as f64 / run, 0),
        written_per_s: round(cs.written.saturating_sub(c0.written) as f64 / run, 0),
        unwritten_at_stop: cs.unwritten,
        drained: w.drained.is_some(),
        drained_after_stop_s: since(w.t_stop),
        drained_after_deliveries_s: since(w.t_delivered),
        window_s: round(w.window_s, 3),
        thread: StoreThread {
            cpu_us_per_message: round(t.cpu_s * 1e6 / n, 3),
            run_us_per_message: t.run_ns.map(|r| round(r as f64 / 1e3 / n, 3)),
            cpu_us_per_delivery: round(t.cpu_s * 1e6 / w.deliveries.max(1) as f64, 4),
            share_of_server_cpu: round(t.cpu_s / w.server_cpu_s.max(1e-9), 4),
            busy_share_of_a_core: round(t.cpu_s / w.window_s.max(1e-9), 4),
            // Each one a wake-up (or a preemption): how finely the hub's hand-overs arrive.
            slices_per_message: t.slices.map(|k| round(k as f64 / n, 3)),
            // Runnable but not running: waiting for a CPU, not for the disk.
            runqueue_wait_ms: t.wait_ns.map(|w| round(w as f64 / 1e6, 2)),
        },
        thread_states_while_sending: states,
    })
}
