//! Workloads 1, 2, 5 and 7: rooms of clients, some of them senders, every message checked at
//! every receiver of its room.
//!
//! `fanout` (W1, W7) runs closed-loop senders: a message is in flight until *every* receiver of
//! its room has it, and each sender keeps at most `window` in flight, so no receiver of the load
//! generator falls more than `senders × window` messages behind (the server would rightly drop
//! it as a slow consumer). `moderate` (W2) runs open-loop senders at a fixed rate; with `--slow`
//! (W5) one more client in room 0 sends `hello` and then never reads again.
//!
//! Both take several servers that share rooms (`--ws A,B`, `--pid A,B,REDIS`: W9): the k-th
//! client of each room joins server k mod n, and the server side's CPU, threads and memory are
//! those of every pid together (each process's CPU is kept too).
//!
//! Phases: `Setup` (connect, hello, welcome) → `Run` (senders send) → `Stop` (senders stop) →
//! `Drain` (the totals are final; each receiver reads until it has every message of its room, or
//! until the drain deadline). Lost = expected − received, per receiver.
//!
//! With the server's HTTP address, the history store is measured too (`store` in the JSON): its
//! counters from `/healthz` at the start of `Run`, at `Stop`, and once `unwritten` is back to 0
//! after the drain; and the CPU of the server's thread named `store` over that same window.

use crate::client::{bench_say, classify, connect, healthz, hello, join, latency, new_hist};
use crate::client::{now_nanos, padding, round, Frame, StoreCounters, Target};
use crate::procfs;
use crate::results::{ClientCpu, ProcessCpu, Slow, Store, Traffic, TrafficServer};
use crate::Args;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::{
    interval_at, sleep, timeout_at, Instant as TInstant, Interval, MissedTickBehavior,
};
use tokio_tungstenite::tungstenite::Message;

/// The longest wait for the last messages after sending stops.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// tungstenite's read buffer per client.
const READ_BUFFER: usize = 8 * 1024;
/// The name the stalled reader uses.
const SLOW_NAME: &str = "slow-consumer";

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Phase {
    Setup,
    Run,
    Stop,
    Drain,
}

/// The workload's settings and what its client tasks count together.
struct Ctx {
    /// The servers (the k-th client of each room joins server k mod n), and every process
    /// whose CPU and memory count as theirs.
    servers: Vec<Target>,
    pids: Vec<u32>,
    rooms: usize,
    /// Clients per room; the first `senders` of each room send.
    per_room: usize,
    senders: usize,
    /// `Some(window)`: closed loop (fan-out); `None`: open loop at `rate_hz` per sender.
    window: Option<u32>,
    rate_hz: f64,
    /// W5: a stalled reader in room 0, whose messages carry `pad`.
    slow: bool,
    pad: String,
    room_prefix: String,
    room_sent: Vec<AtomicU64>,
    /// Clients welcomed per room: the receivers a message must reach to land.
    room_members: Vec<AtomicU64>,
    /// Clients done with `Setup`, welcomed or failed.
    set_up: AtomicUsize,
    active_senders: AtomicUsize,
    slow_left_ns: AtomicU64,
    connect_sem: Semaphore,
    /// Per sender (`room * senders + k`): delivery counts of its messages in flight.
    slots: Vec<SenderSlots>,
}

/// Delivery accounting for one closed-loop sender.
struct SenderSlots {
    /// Receivers that have message `seq`, at `seq % len`.
    counts: Vec<AtomicU64>,
    /// Messages every receiver has (each receiver gets them in order, so they land in order).
    landed: AtomicU64,
    /// Wakes the sender when one lands.
    notify: Notify,
}

impl Ctx {
    fn sent(&self, room: usize) -> u64 {
        self.room_sent[room].load(SeqCst)
    }

    /// The slot of sender `id`, if it is one (ids run room by room, senders first).
    fn slot(&self, id: u32) -> Option<&SenderSlots> {
        let (room, k) = (id as usize / self.per_room, id as usize % self.per_room);
        let slot = self.slots.get(room * self.senders + k);
        slot.filter(|_| k < self.senders)
    }
}

/// One client's figures.
struct ClientOut {
    room: usize,
    received: u64,
    /// `None`: ended before the drain; everything its room sent counts as expected.
    expected: Option<u64>,
    order_errors: u64,
    hist: Histogram<u64>,
    error: Option<String>,
    closed_early: bool,
}

impl ClientOut {
    fn new(room: usize, error: Option<String>) -> ClientOut {
        ClientOut {
            room,
            received: 0,
            expected: None,
            order_errors: 0,
            hist: new_hist(),
            error,
            closed_early: false,
        }
    }

    /// The server (or the network) ended this client early.
    fn ended(&mut self, why: String) {
        (self.error, self.closed_early) = (Some(why), true);
    }
}

async fn client(
    id: u32,
    room: usize,
    sender: bool,
    ctx: Arc<Ctx>,
    mut phase_rx: watch::Receiver<Phase>,
) -> ClientOut {
    let permit = ctx.connect_sem.acquire().await;
    let (name, me) = (format!("{}{room}", ctx.room_prefix), format!("c{id}"));
    let server = ctx.servers[id as usize % ctx.per_room % ctx.servers.len()];
    let joined = join(server.addr, &name, &me, READ_BUFFER, |_| {}).await;
    drop(permit);
    let mut ws = match joined {
        Ok((ws, _)) => ws,
        Err(e) => {
            ctx.set_up.fetch_add(1, SeqCst);
            ctx.active_senders.fetch_sub(usize::from(sender), SeqCst);
            return ClientOut::new(room, Some(format!("setup: {e}")));
        }
    };
    ctx.room_members[room].fetch_add(1, SeqCst);
    ctx.set_up.fetch_add(1, SeqCst);
    let mut out = ClientOut::new(room, None);
    let slot = ctx.slot(id).filter(|_| sender && ctx.window.is_some());
    let window = u64::from(ctx.window.unwrap_or(0));
    let (mut members, mut seq, mut phase, mut ticker) = (0, 0, Phase::Setup, None::<Interval>);
    // Senders of one room are few: a linear scan of (sender, last seq) is fastest.
    let mut last_seq: Vec<(u32, u64)> = Vec::with_capacity(4);
    let pad = if room == 0 { ctx.pad.as_str() } else { "" };
    let deadline = sleep(Duration::from_secs(3600));
    tokio::pin!(deadline);
    'main: loop {
        // How many messages to send after this event.
        let mut send = 0;
        tokio::select! {
            biased;
            r = phase_rx.changed(), if phase < Phase::Drain => {
                phase = if r.is_ok() { *phase_rx.borrow_and_update() } else { Phase::Drain };
                match phase {
                    Phase::Run => {
                        members = ctx.room_members[room].load(SeqCst);
                        if sender && ctx.window.is_none() {
                            let period = Duration::from_secs_f64(1.0 / ctx.rate_hz);
                            // Spread the senders' ticks over one period.
                            let start = TInstant::now() + period.mul_f64(f64::from(id % 97) / 97.0);
                            let mut t = interval_at(start, period);
                            t.set_missed_tick_behavior(MissedTickBehavior::Burst);
                            ticker = Some(t);
                        }
                        send = if slot.is_some() { window } else { 0 };
                    }
                    Phase::Stop => {
                        ticker = None;
                        ctx.active_senders.fetch_sub(usize::from(sender), SeqCst);
                    }
                    _ => {
                        let expected = ctx.sent(room);
                        out.expected = Some(expected);
                        deadline.as_mut().reset(TInstant::now() + DRAIN_TIMEOUT);
                        if out.received >= expected {
                            break;
                        }
                    }
                }
            }
            _ = async { ticker.as_mut().unwrap().tick().await }, if ticker.is_some() => send = 1,
            _ = async { slot.unwrap().notify.notified().await }, if slot.is_some() && phase == Phase::Run => {
                let in_flight = seq - slot.map_or(0, |s| s.landed.load(SeqCst)).min(seq);
                send = window.saturating_sub(in_flight);
            }
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => match classify(t.as_bytes()) {
                    Frame::Bench { sender: s, seq: q, nanos } => {
                        out.hist.saturating_record(now_nanos().saturating_sub(nanos).max(1));
                        out.received += 1;
                        match last_seq.iter_mut().find(|e| e.0 == s) {
                            Some(e) if q <= e.1 => out.order_errors += 1,
                            Some(e) => e.1 = q,
                            None => last_seq.push((s, q)),
                        }
                        if let Some(slot) = ctx.slot(s).filter(|_| window > 0) {
                            let n = slot.counts.len() as u64;
                            if slot.counts[(q % n) as usize].fetch_add(1, SeqCst) + 1 == members {
                                slot.landed.fetch_add(1, SeqCst);
                                slot.notify.notify_one();
                            }
                        }
                        if out.expected.is_some_and(|e| out.received >= e) {
                            break;
                        }
                    }
                    Frame::Left(n) if room == 0 && n == SLOW_NAME.as_bytes() => {
                        ctx.slow_left_ns.fetch_min(now_nanos(), SeqCst);
                    }
                    _ => {}
                },
                Some(Ok(Message::Close(f))) => break out.ended(format!("closed by server: {f:?}")),
                Some(Ok(_)) => {}
                Some(Err(e)) => break out.ended(format!("read: {e}")),
                None => break out.ended("closed by server (EOF)".into()),
            },
            _ = &mut deadline, if phase == Phase::Drain => break,
        }
        for _ in 0..send {
            seq += 1;
            if let Some(s) = slot {
                s.counts[(seq % s.counts.len() as u64) as usize].store(0, SeqCst);
            }
            ctx.room_sent[room].fetch_add(1, SeqCst);
            if let Err(e) = ws.send(bench_say(id, seq, pad)).await {
                break 'main out.ended(format!("send: {e}"));
            }
        }
    }
    if sender && phase < Phase::Stop {
        ctx.active_senders.fetch_sub(1, SeqCst);
    }
    out
}

/// W5's stalled reader: never reads until the drain, then reads what is buffered to see how
/// the server ended it (close frame, EOF, reset). Whether it ended, and the close code.
async fn slow_client(ctx: Arc<Ctx>, mut phase_rx: watch::Receiver<Phase>) -> (bool, Option<u16>) {
    let room = format!("{}0", ctx.room_prefix);
    let joined = async {
        let mut ws = connect(ctx.servers[0].addr, &room, 4096).await?;
        hello(&mut ws, SLOW_NAME).await.map(|_| ws)
    };
    let joined = joined.await;
    ctx.set_up.fetch_add(1, SeqCst);
    let Ok(mut ws) = joined else {
        return (false, None);
    };
    let _ = phase_rx.wait_for(|p| *p == Phase::Drain).await;
    let deadline = TInstant::now() + Duration::from_secs(5);
    loop {
        match timeout_at(deadline, ws.next()).await {
            Err(_) => return (false, None),
            Ok(Some(Ok(Message::Close(f)))) => return (true, f.map(|f| u16::from(f.code))),
            Ok(None | Some(Err(_))) => return (true, None),
            Ok(Some(Ok(_))) => {}
        }
    }
}

/// Reads the flags of `fanout` (closed loop: W1 and W7) or `moderate` (open loop: W2, and W5
/// with `--slow`); the workload, which returns its figures.
pub fn run(a: &Args, fanout: bool) -> Result<impl Future<Output = Traffic>, String> {
    let name = |f: &'static str, m: &'static str| if fanout { f } else { m };
    let (servers, pids) = Target::several(a)?;
    let rooms = a.get("rooms", if fanout { 1 } else { 20 })?;
    let per_room = a.get(name("clients", "per-room"), if fanout { 100 } else { 20 })?;
    let senders_flag = name("senders", "senders-per-room");
    let senders = a.get(senders_flag, if fanout { 10 } else { 2 })?;
    let window = fanout.then(|| a.get("window", 8)).transpose()?;
    let rate_hz = if fanout { 0.0 } else { a.get("rate", 20.0)? };
    let duration = a.secs("duration", 10.0)?;
    // W5: the extra `€`s on room 0's messages fill the buffers between the stalled reader and
    // the server in seconds, not minutes.
    let slow = !fanout && a.flag("slow");
    let slow_pad = slow.then(|| a.get("slow-pad", 0)).transpose()?;
    let room_prefix = a.opt_str("room").unwrap_or(name("fanout", "mod").into());
    // A pause between setup and sending lets `joined` frames settle.
    let settle = Duration::from_millis(if fanout { 300 } else { 500 });
    let atomics = |n: usize| (0..n).map(|_| AtomicU64::new(0)).collect::<Vec<_>>();
    let slot = |_| SenderSlots {
        counts: atomics(2 * window.unwrap_or(1).max(1) as usize),
        landed: AtomicU64::new(0),
        notify: Notify::new(),
    };
    let ctx = Ctx {
        servers,
        pids,
        rooms,
        per_room,
        senders,
        window,
        rate_hz,
        slow: slow_pad.is_some(),
        pad: padding(slow_pad.unwrap_or(0), true),
        room_prefix,
        room_sent: atomics(rooms),
        room_members: atomics(rooms),
        set_up: AtomicUsize::new(0),
        active_senders: AtomicUsize::new(rooms * senders),
        slow_left_ns: AtomicU64::new(u64::MAX),
        connect_sem: Semaphore::new(50),
        slots: (0..rooms * senders).map(slot).collect(),
    };
    Ok(measure(Arc::new(ctx), duration, settle))
}

/// Runs the phases and returns the figures.
async fn measure(ctx: Arc<Ctx>, duration: Duration, settle: Duration) -> Traffic {
    let (phase_tx, phase_rx) = watch::channel(Phase::Setup);
    let mut handles = Vec::new();
    for id in 0..ctx.rooms * ctx.per_room {
        let (room, sender) = (id / ctx.per_room, id % ctx.per_room < ctx.senders);
        let task = client(id as u32, room, sender, ctx.clone(), phase_rx.clone());
        handles.push(tokio::spawn(task));
    }
    let total = handles.len() + usize::from(ctx.slow);
    let slow_client = slow_client(ctx.clone(), phase_rx.clone());
    let slow_task = ctx.slow.then(|| tokio::spawn(slow_client));

    // Setup: everyone welcomed (or failed), bounded.
    let setup_deadline = Instant::now() + Duration::from_secs(60);
    while ctx.set_up.load(SeqCst) < total && Instant::now() < setup_deadline {
        sleep(Duration::from_millis(10)).await;
    }
    sleep(settle).await;

    let (pids, http) = (ctx.pids.as_slice(), ctx.servers[0].http);
    // A memory-only server has nothing to write: don't wait for it.
    let store0 = StoreCounters::read(http).await.filter(|c| !c.memory);
    let (threads0, srv0) = (procfs::thread_cpu(pids), procfs::sample_sum(pids));
    let (srv0, cpu) = (srv0.unwrap_or_default(), |&p| procfs::cpu_secs(Some(p)));
    // The server side's RSS now, and each of its processes' CPU so far.
    let rss = || procfs::sample_sum(pids).map_or(0, |s| s.rss_kib);
    let cpus = || pids.iter().map(cpu).collect::<Vec<_>>();
    let (cpu0, self0) = (cpus(), procfs::cpu_secs(None));
    let (t0, start_ns) = (Instant::now(), now_nanos());
    let _ = phase_tx.send(Phase::Run);
    let mut rss_max = srv0.rss_kib;
    while t0.elapsed() < duration {
        let left = duration.saturating_sub(t0.elapsed());
        sleep(left.min(Duration::from_millis(250))).await;
        rss_max = rss_max.max(rss());
    }
    let _ = phase_tx.send(Phase::Stop);
    let (t_stop, run_s) = (Instant::now(), t0.elapsed().as_secs_f64());
    let store_stop = if store0.is_some() {
        StoreCounters::read(http).await
    } else {
        None
    };
    // Per kind of thread, over the sending time: once `Drain` begins, clients that have all
    // their messages close, and an exited thread's CPU can no longer be read.
    let threads_stop = procfs::thread_cpu(pids);
    let stop_deadline = Instant::now() + Duration::from_secs(5);
    while ctx.active_senders.load(SeqCst) > 0 && Instant::now() < stop_deadline {
        sleep(Duration::from_millis(1)).await;
    }
    let _ = phase_tx.send(Phase::Drain);
    let mut outs = Vec::with_capacity(handles.len());
    for h in handles {
        let failed = |e| ClientOut::new(0, Some(format!("task: {e}")));
        outs.push(h.await.unwrap_or_else(failed));
    }
    let wall = t0.elapsed().as_secs_f64().max(1e-9);
    let (cpu1, self1) = (cpus(), procfs::cpu_secs(None));
    rss_max = rss_max.max(rss());
    // Everything is delivered; now wait (bounded) for the store to commit the last batch.
    let (t_delivered, mut store_end) = (Instant::now(), store_stop);
    while store0.is_some() && t_delivered.elapsed() < Duration::from_secs(10) {
        store_end = StoreCounters::read(http).await;
        if store_end.is_none_or(|c| c.unwritten == 0) {
            break;
        }
        sleep(Duration::from_millis(10)).await;
    }
    let health_end = match http {
        Some(h) => healthz(h).await.unwrap_or_default().1,
        None => Default::default(),
    };
    let (cpu2, threads2) = (cpus(), procfs::thread_cpu(pids));
    let slow = match slow_task {
        Some(h) => h.await.ok(),
        None => None,
    };

    // Aggregate.
    let sent: u64 = (0..ctx.rooms).map(|r| ctx.sent(r)).sum();
    let (mut all, mut other_rooms, mut slow_room) = (new_hist(), new_hist(), new_hist());
    let (mut deliveries, mut expected, mut order_errors, mut closed_early) = (0, 0, 0, 0);
    for o in &outs {
        deliveries += o.received;
        expected += o.expected.unwrap_or_else(|| ctx.sent(o.room));
        order_errors += o.order_errors;
        closed_early += u64::from(o.closed_early);
        let _ = all.add(&o.hist);
        if ctx.slow && o.room == 0 {
            let _ = slow_room.add(&o.hist);
        } else {
            let _ = other_rooms.add(&o.hist);
        }
    }
    let delta = |a: Option<f64>, b: Option<f64>| a.zip(b).map_or(0.0, |(a, b)| b - a);
    let each = |b: &[Option<f64>]| cpu0.iter().zip(b).map(|(a, b)| delta(*a, *b)).collect();
    let (per_process, client_cpu): (Vec<f64>, _) = (each(&cpu1), delta(self0, self1));
    let server_cpu: f64 = per_process.iter().sum();
    let per_delivery = |cpu: f64| round(cpu * 1e6 / deliveries.max(1) as f64, 3);
    let process = |(&pid, &cpu): (&u32, &f64)| ProcessCpu {
        name: procfs::comm(pid),
        cpu_us_per_delivery: per_delivery(cpu),
    };
    let since = |t: &procfs::ThreadCpu| t.since(threads0.get("store"));
    let store_state = health_end["store"]["state"].as_str().unwrap_or("?");
    let counters = store0.zip(store_stop).zip(threads2.get("store").map(since));
    let store = counters.map(|((c0, cs), t)| {
        let end = store_end.filter(|e| e.unwritten == 0);
        let written = store_end.map_or(0, |e| e.written.saturating_sub(c0.written));
        let per_message = |x: f64| round(x / written.max(1) as f64, 3);
        Store {
            state: store_state.to_string(),
            dropped: store_end.map_or(0, |e| e.dropped.saturating_sub(c0.dropped)),
            sent_by_load_generator: sent,
            written_in_window: written,
            accepted_per_s: round((cs.accepted() - c0.accepted()) as f64 / run_s, 0),
            written_per_s: round((cs.written - c0.written) as f64 / run_s, 0),
            unwritten_at_stop: cs.unwritten,
            drained: end.is_some(),
            drained_after_stop_s: end.map(|e| round((e.at - t_stop).as_secs_f64(), 3)),
            cpu_us_per_message: per_message(t.cpu_s * 1e6),
            run_us_per_message: t.sched.map(|s| per_message(s[0] as f64 / 1e3)),
            share_of_server_cpu: round(t.cpu_s / each(&cpu2).iter().sum::<f64>().max(1e-9), 4),
        }
    });
    let slow = slow.map(|(closed_by_server, close_code)| {
        let left = ctx.slow_left_ns.load(SeqCst);
        let left_seen = left != u64::MAX;
        let after = round(left.saturating_sub(start_ns) as f64 / 1e9, 3);
        Slow {
            left_seen,
            left_seen_after_s: left_seen.then_some(after),
            closed_by_server,
            close_code,
            latency_other_rooms: latency(&other_rooms),
            latency_slow_room: latency(&slow_room),
            rss_kib_growth_max: rss_max.saturating_sub(srv0.rss_kib),
        }
    });
    let errors = outs.iter().filter_map(|o| o.error.clone());
    let cpu_by_thread_kind = procfs::thread_cpu_per_delivery(&threads0, &threads_stop, deliveries);
    Traffic {
        sent,
        sent_per_s: round(sent as f64 / wall, 0),
        deliveries_per_s: round(deliveries as f64 / wall, 0),
        lost: expected.saturating_sub(deliveries),
        order_errors,
        clients_closed_early: closed_early,
        error_samples: errors.take(5).collect(),
        latency: latency(&all),
        server: TrafficServer {
            cpu_us_per_delivery: per_delivery(server_cpu),
            cpu_util: round(server_cpu / wall, 3),
            threads: srv0.threads,
            rss_kib_max: rss_max,
            cpu_by_thread_kind,
            processes: pids.iter().zip(&per_process).map(process).collect(),
        },
        client: ClientCpu {
            cpu_us_per_delivery: per_delivery(client_cpu),
            cpu_util: round(client_cpu / wall, 3),
        },
        store,
        slow,
    }
}
