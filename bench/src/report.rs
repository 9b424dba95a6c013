//! `BENCHMARKS.md` and the target checks, from the typed results ([`crate::results`]).
//!
//! Each workload has one table definition ([`Figures::rows`]): a list of rows, each with its
//! label, decimals, which way is better, the tables it appears in (flags) and how to read it
//! from the typed figures. The flags: `m` the chatroom-vs-Node table, `s` the store-on-vs-memory
//! table, `c` the store's own figures (per run), `K` bold (the key figure of its table), `T` a
//! key figure of the store check (at most [`TOLERANCE`] worse with the store on). Every figure
//! goes through one formatting helper, [`fmt`].

use crate::results::{
    Capacity, Churn, JoinStorm, Noise, Results, Run, Series, Store, Traffic, Workload, Workloads,
};
use crate::stats::{median, round};
use crate::suite::RawRun;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::fmt::Write;

/// Which way is better for a figure (for the ratio columns and the store check).
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Better {
    Lower,
    Higher,
    Neither,
}
use Better::{Higher, Lower, Neither};

/// A figure as read from the results: a number, a text, or absent (shown as "–").
#[derive(Clone, Debug, PartialEq)]
pub enum V {
    N(f64),
    S(String),
    Missing,
}

impl V {
    fn num(&self) -> Option<f64> {
        match self {
            V::N(x) => Some(*x),
            _ => None,
        }
    }
}

macro_rules! into_v {
    ($($t:ty),*) => {$(impl From<$t> for V { fn from(x: $t) -> V { V::N(x as f64) } })*};
}
into_v!(f64, u64, i64, u16, usize);
impl From<bool> for V {
    fn from(b: bool) -> V {
        V::N(if b { 1.0 } else { 0.0 })
    }
}
impl From<&String> for V {
    fn from(s: &String) -> V {
        V::S(s.clone())
    }
}
impl<T: Into<V>> From<Option<T>> for V {
    fn from(x: Option<T>) -> V {
        x.map_or(V::Missing, Into::into)
    }
}

/// The one formatting helper: `d` decimals, thousands separators for whole numbers from
/// 10,000, "–" for an absent figure.
pub fn fmt(v: impl Into<V>, d: usize) -> String {
    match v.into() {
        V::S(s) => s,
        V::Missing => "–".into(),
        V::N(x) if d == 0 && x.abs() >= 10000.0 => {
            let s = format!("{:.0}", x.abs());
            let mut out = String::new();
            for (i, c) in s.chars().enumerate() {
                if i > 0 && (s.len() - i) % 3 == 0 {
                    out.push(',');
                }
                out.push(c);
            }
            if x < 0.0 {
                format!("-{out}")
            } else {
                out
            }
        }
        V::N(x) => format!("{x:.d$}"),
    }
}

/// One row of a workload's table definition.
pub struct Row<T> {
    pub label: &'static str,
    pub decimals: usize,
    pub better: Better,
    /// Which tables it is in, and whether it is a key figure (see the module doc).
    pub flags: &'static str,
    pub get: fn(&T, &Run<T>) -> V,
}

impl<T> Row<T> {
    fn has(&self, flag: char) -> bool {
        self.flags.contains(flag)
    }
    fn value(&self, run: &Run<T>) -> V {
        run.ok().map_or(V::Missing, |r| (self.get)(r, run))
    }
    fn cell(&self, run: Option<&Run<T>>) -> String {
        fmt(run.map_or(V::Missing, |r| self.value(r)), self.decimals)
    }
    /// The label, in bold when the row is a key figure of a table that marks them with `flag`.
    fn title(&self, flag: char) -> String {
        if self.has(flag) {
            format!("**{}**", self.label)
        } else {
            self.label.to_string()
        }
    }
}

/// `rows![Type; label decimals better flags |figures, run| expression; …]`: one table definition.
macro_rules! rows {
    ($t:ty; $($label:literal $d:literal $b:ident $f:literal |$r:pat_param, $run:pat_param| $e:expr;)*) => {
        vec![$(Row::<$t> { label: $label, decimals: $d, better: $b, flags: $f, get: |$r: &$t, $run: &Run<$t>| V::from($e) }),*]
    };
}

/// A workload's typed figures, and its part of the report.
pub trait Figures: Sized + Serialize + DeserializeOwned {
    /// The table definition of workload `id`.
    fn rows(id: &str) -> Vec<Row<Self>>;
    fn error_samples(&self) -> &[String];
    /// Messages the store wrote (for the database's bytes per message).
    fn written(&self) -> u64 {
        0
    }
    /// Tables after the main one.
    fn extra(_s: &mut String, _id: &str, _w: &Workload<Self>) {}
}

const MS: f64 = 1000.0;
const MIB: f64 = 1024.0;

/// The rows of the store's own figures, in W1, W2 and W7.
fn store_rows() -> Vec<Row<Traffic>> {
    fn st(r: &Traffic) -> Option<&Store> {
        r.store.as_ref()
    }
    fn share(r: &Traffic, k: &str) -> Option<f64> {
        st(r).and_then(|s| {
            s.thread_states_while_sending
                .share
                .get(k)
                .map(|x| x * 100.0)
        })
    }
    rows![Traffic;
        "messages sent by the load generator" 0 Neither "c" |r, _| st(r).map(|s| s.sent_by_load_generator);
        "messages written (`store.written` delta)" 0 Neither "c" |r, _| st(r).map(|s| s.written_in_window);
        "accepted/s while sending" 0 Neither "c" |r, _| st(r).map(|s| s.accepted_per_s);
        "written/s while sending" 0 Neither "c" |r, _| st(r).map(|s| s.written_per_s);
        "unwritten when sending stopped" 0 Neither "c" |r, _| st(r).map(|s| s.unwritten_at_stop);
        "unwritten back to 0, after sending stopped (ms)" 0 Neither "c" |r, _| st(r).and_then(|s| s.drained_after_stop_s).map(|x| x * MS);
        "… after the last delivery (ms)" 0 Neither "c" |r, _| st(r).and_then(|s| s.drained_after_deliveries_s).map(|x| x * MS);
        "`store` thread CPU per message (µs)" 2 Neither "cK" |r, _| st(r).map(|s| s.thread.cpu_us_per_message);
        "… from schedstat's nanoseconds (µs)" 2 Neither "c" |r, _| st(r).and_then(|s| s.thread.run_us_per_message);
        "`store` thread CPU per delivery (µs)" 4 Neither "c" |r, _| st(r).map(|s| s.thread.cpu_us_per_delivery);
        "`store` thread's share of the server's CPU (%)" 1 Neither "cK" |r, _| st(r).map(|s| s.thread.share_of_server_cpu * 100.0);
        "`store` thread busy (% of one core)" 1 Neither "c" |r, _| st(r).map(|s| s.thread.busy_share_of_a_core * 100.0);
        "`store` thread put on a CPU, per message" 3 Neither "c" |r, _| st(r).and_then(|s| s.thread.slices_per_message);
        "`store` thread runnable but waiting for a CPU (ms)" 0 Neither "c" |r, _| st(r).and_then(|s| s.thread.runqueue_wait_ms);
        "`store` thread sampled while sending: running or runnable (%)" 0 Neither "c" |r, _| share(r, "R");
        "… waiting for the disk, state D (%)" 0 Neither "c" |r, _| share(r, "D");
        "… idle, waiting for messages, state S (%)" 0 Neither "c" |r, _| share(r, "S");
        "messages dropped by the store" 0 Neither "c" |r, _| st(r).map(|s| s.dropped);
        "on disk after a clean stop (bytes per message)" 0 Neither "c" |_, run| run.disk.as_ref().map(|d| d.bytes_per_message);
        "on disk after a clean stop (MiB)" 1 Neither "c" |_, run| run.disk.as_ref().map(|d| d.total_bytes as f64 / 1048576.0);
        "state at the end" 0 Neither "c" |r, _| st(r).map(|s| &s.state);
    ]
}

impl Figures for Traffic {
    fn rows(id: &str) -> Vec<Row<Traffic>> {
        fn slow(r: &Traffic) -> Option<&crate::results::Slow> {
            r.slow.as_ref()
        }
        let mut rows = match id {
            "w1" => rows![Traffic;
                "deliveries/s" 0 Higher "msT" |r, _| r.deliveries_per_s;
                "latency p50 (ms)" 2 Lower "ms" |r, _| r.latency.p50_us / MS;
                "latency p99 (ms)" 2 Lower "msT" |r, _| r.latency.p99_us / MS;
                "latency max (ms)" 1 Lower "ms" |r, _| r.latency.max_us / MS;
                "server CPU per delivery (µs)" 3 Lower "mKsT" |r, _| r.server.cpu_us_per_delivery;
                "server CPU (cores busy)" 2 Neither "ms" |r, _| r.server.cpu_util;
                "load generator CPU per delivery (µs)" 3 Neither "m" |r, _| r.client.cpu_us_per_delivery;
                "load generator CPU (cores busy)" 2 Neither "ms" |r, _| r.client.cpu_util;
                "messages sent" 0 Neither "ms" |r, _| r.sent;
                "lost deliveries" 0 Lower "ms" |r, _| r.lost;
                "out-of-order deliveries" 0 Lower "m" |r, _| r.order_errors;
                "clients closed by the server" 0 Lower "ms" |r, _| r.clients_closed_early;
                "server threads" 0 Neither "ms" |r, _| r.server.threads;
                "server RSS max (MiB)" 1 Lower "ms" |r, _| r.server.rss_kib_max as f64 / MIB;
                "other processes' CPU share (noise)" 2 Neither "ms" |_, run| run.noise.other_cpu_share;
            ],
            "w2" => rows![Traffic;
                "messages sent/s" 0 Neither "ms" |r, _| r.sent_per_s;
                "deliveries/s" 0 Neither "m" |r, _| r.deliveries_per_s;
                "latency p50 (ms)" 3 Lower "ms" |r, _| r.latency.p50_us / MS;
                "latency p90 (ms)" 3 Lower "ms" |r, _| r.latency.p90_us / MS;
                "latency p99 (ms)" 3 Lower "mKsT" |r, _| r.latency.p99_us / MS;
                "latency max (ms)" 2 Lower "ms" |r, _| r.latency.max_us / MS;
                "lost deliveries" 0 Lower "ms" |r, _| r.lost;
                "server CPU per delivery (µs)" 2 Lower "msT" |r, _| r.server.cpu_us_per_delivery;
                "server CPU (cores busy)" 3 Lower "ms" |r, _| r.server.cpu_util;
                "load generator CPU (cores busy)" 3 Neither "m" |r, _| r.client.cpu_util;
                "server threads" 0 Neither "ms" |r, _| r.server.threads;
                "server RSS max (MiB)" 1 Lower "ms" |r, _| r.server.rss_kib_max as f64 / MIB;
                "other processes' CPU share (noise)" 2 Neither "ms" |_, run| run.noise.other_cpu_share;
            ],
            "w5" => rows![Traffic;
                "p99, rooms without the stalled reader (ms)" 3 Lower "mK" |r, _| slow(r).map(|s| s.latency_other_rooms.p99_us / MS);
                "p50, rooms without the stalled reader (ms)" 3 Lower "m" |r, _| slow(r).map(|s| s.latency_other_rooms.p50_us / MS);
                "p99, the stalled reader's room (ms; 11 KiB frames)" 2 Lower "m" |r, _| slow(r).map(|s| s.latency_slow_room.p99_us / MS);
                "lost deliveries (others)" 0 Lower "m" |r, _| r.lost;
                "others told it `left` (1 = yes)" 0 Neither "m" |r, _| slow(r).map(|s| s.left_seen);
                "… after (s)" 2 Lower "m" |r, _| slow(r).and_then(|s| s.left_seen_after_s);
                "its connection ended by the server (1 = yes)" 0 Neither "m" |r, _| slow(r).map(|s| s.closed_by_server);
                "close code it got" 0 Neither "m" |r, _| slow(r).and_then(|s| s.close_code);
                "server RSS growth, max during the run (MiB)" 1 Lower "m" |r, _| slow(r).map(|s| s.rss_kib_growth_max as f64 / MIB);
                "server CPU (cores busy)" 3 Lower "m" |r, _| r.server.cpu_util;
                "other processes' CPU share (noise)" 2 Neither "m" |_, run| run.noise.other_cpu_share;
            ],
            _ => rows![Traffic;
                "messages/s (each delivered to its sender)" 0 Higher "s" |r, _| r.sent_per_s;
                "latency p50 (ms)" 3 Lower "s" |r, _| r.latency.p50_us / MS;
                "latency p99 (ms)" 3 Lower "s" |r, _| r.latency.p99_us / MS;
                "server CPU per message (µs)" 2 Lower "s" |r, _| r.server.cpu_us_per_delivery;
                "server CPU (cores busy)" 2 Neither "s" |r, _| r.server.cpu_util;
                "load generator CPU (cores busy)" 2 Neither "s" |r, _| r.client.cpu_util;
                "lost deliveries" 0 Lower "s" |r, _| r.lost;
                "clients closed by the server" 0 Lower "s" |r, _| r.clients_closed_early;
                "server RSS max (MiB)" 1 Lower "s" |r, _| r.server.rss_kib_max as f64 / MIB;
                "other processes' CPU share (noise)" 2 Neither "s" |_, run| run.noise.other_cpu_share;
            ],
        };
        if id != "w5" {
            rows.extend(store_rows());
        }
        rows
    }
    fn error_samples(&self) -> &[String] {
        &self.error_samples
    }
    fn written(&self) -> u64 {
        self.store.as_ref().map_or(0, |s| s.written_in_window)
    }
    fn extra(s: &mut String, id: &str, w: &Workload<Traffic>) {
        crate::report::store_section(s, id, w);
    }
}

impl Figures for Capacity {
    fn rows(_: &str) -> Vec<Row<Capacity>> {
        rows![Capacity;
            "clients connected" 0 Higher "mK" |r, _| r.connected;
            "time to connect them all (s)" 2 Lower "m" |r, _| r.connect_s;
            "connects/s (64 at a time)" 0 Higher "m" |r, _| r.connects_per_s;
            "connect+welcome p99 (ms)" 1 Lower "m" |r, _| r.connect_latency.p99_us / MS;
            "server RSS idle (MiB)" 1 Lower "m" |r, _| r.server_before.rss_kib as f64 / MIB;
            "server RSS with all clients (MiB)" 1 Lower "m" |r, _| r.server_full.rss_kib as f64 / MIB;
            "RSS per client (KiB)" 1 Lower "mK" |r, _| r.rss_kib_per_client;
            "RSS per client, slope after the first checkpoint (KiB)" 1 Lower "m" |r, _| r.rss_kib_per_client_slope;
            "server threads with all clients" 0 Lower "m" |r, _| r.server_full.threads;
            "threads per client" 2 Lower "m" |r, _| r.threads_per_client;
            "server fds with all clients" 0 Lower "m" |r, _| r.server_full.fds;
            "memory maps per client" 2 Lower "m" |r, _| r.maps_per_client;
            "server CPU to accept them (s)" 2 Lower "m" |r, _| r.server_cpu_s_connecting;
            "over-cap attempts" 0 Neither "m" |r, _| r.over_cap.attempted;
            "over-cap refused with 503" 0 Neither "m" |r, _| r.over_cap.refused_503;
            "/healthz status afterwards" 0 Neither "m" |r, _| r.healthz_status;
            "early client got a new message (1 = yes)" 0 Neither "m" |r, _| r.probe_received;
            "… within (ms)" 2 Lower "m" |r, _| r.probe_latency_ms;
            "clients dropped by the server" 0 Lower "m" |r, _| r.dropped_by_server;
            // Per idle client, from the host's /proc/meminfo: its own table (`k`).
            "server RSS" 1 Lower "k" |r, _| r.rss_kib_per_client;
            "kernel stacks (`KernelStack`)" 1 Lower "k" |r, _| r.kernel_kib_per_client.map(|k| k.kernel_stack);
            "page tables (`PageTables`)" 1 Lower "k" |r, _| r.kernel_kib_per_client.map(|k| k.page_tables);
            "slab (`Slab`: sockets and other kernel objects, both ends)" 1 Lower "k" |r, _| r.kernel_kib_per_client.map(|k| k.slab);
            "server total per idle client: RSS + kernel stacks + page tables" 1 Lower "kK" |r, _| r.kernel_kib_per_client.map(|k| r.rss_kib_per_client + k.kernel_stack + k.page_tables);
        ]
    }
    fn error_samples(&self) -> &[String] {
        &self.error_samples
    }
    fn extra(s: &mut String, _: &str, w: &Workload<Capacity>) {
        capacity_tables(s, w);
    }
}

impl Figures for JoinStorm {
    fn rows(_: &str) -> Vec<Row<JoinStorm>> {
        rows![JoinStorm;
            "clients welcomed" 0 Higher "m" |r, _| r.welcomed;
            "all welcomed after (s)" 3 Lower "mK" |r, _| r.all_welcomed_s;
            "welcome p50 (ms)" 1 Lower "m" |r, _| r.welcome_latency.p50_us / MS;
            "welcome p99 (ms)" 1 Lower "m" |r, _| r.welcome_latency.p99_us / MS;
            "`joined` frames seen" 0 Neither "m" |r, _| r.joined_frames;
            "`joined` frames expected" 0 Neither "m" |r, _| r.joined_frames_expected;
            "every `joined` seen after (s)" 3 Lower "m" |r, _| r.all_joined_seen_s;
            "server CPU (s)" 2 Lower "m" |r, _| r.server_cpu_s;
            "server threads after" 0 Neither "m" |r, _| r.server_after.threads;
            "server RSS after (MiB)" 1 Lower "m" |r, _| r.server_after.rss_kib as f64 / MIB;
        ]
    }
    fn error_samples(&self) -> &[String] {
        &self.error_samples
    }
}

impl Figures for Churn {
    fn rows(_: &str) -> Vec<Row<Churn>> {
        rows![Churn;
            "threads and fds back to baseline after every round (1 = yes)" 0 Neither "mK" |r, _| r.all_back_to_baseline;
            "… judged on" 0 Neither "m" |r, _| &r.judged_on;
            "client errors" 0 Lower "m" |r, _| r.errors;
            "baseline threads" 0 Neither "m" |r, _| r.baseline.threads;
            "baseline fds" 0 Neither "m" |r, _| r.baseline.fds;
            "RSS growth, round 2 → last (MiB)" 2 Lower "m" |r, _| r.rss_growth_kib_round2_to_last as f64 / MIB;
            "RSS trend from round 3 (KiB per round)" 0 Neither "m" |r, _| r.rss_slope_kib_per_round;
            "connect+welcome p99 (ms)" 1 Lower "m" |r, _| r.connect_latency.p99_us / MS;
            "server CPU for all rounds (s)" 2 Lower "m" |r, _| r.server_cpu_s;
            "wall time (s)" 1 Lower "m" |r, _| r.wall_s;
        ]
    }
    fn error_samples(&self) -> &[String] {
        &self.error_samples
    }
    fn extra(s: &mut String, _: &str, w: &Workload<Churn>) {
        churn_table(s, w);
    }
}

/// Calls `$f::<T>(…)` with the figures type of workload `$id`.
macro_rules! by_workload {
    ($id:expr, $f:ident($($a:expr),*)) => {
        match $id {
            "w3" => $f::<Capacity>($($a),*),
            "w4" => $f::<JoinStorm>($($a),*),
            "w6" => $f::<Churn>($($a),*),
            _ => $f::<Traffic>($($a),*),
        }
    };
}

/// A run with its figures typed: output the load generator printed that does not parse as
/// the workload's figures makes the run an error, with serde's reason.
pub fn typed<T: Figures>(raw: &RawRun) -> Run<T> {
    let result = match &raw.result {
        Ok(v) => {
            T::deserialize(v).map_err(|e| format!("the load generator's figures do not parse: {e}"))
        }
        Err(e) => Err(e.clone()),
    };
    let disk = raw
        .disk_bytes
        .zip(result.as_ref().ok())
        .map(|(b, r)| crate::results::Disk {
            total_bytes: b,
            bytes_per_message: round(b as f64 / r.written().max(1) as f64, 1),
        });
    Run {
        tag: raw.tag.clone(),
        noise: raw.noise.clone(),
        disk,
        result,
    }
}

/// One run's progress line: its key figures, or its error.
pub fn progress(id: &str, raw: &RawRun) -> String {
    fn line<T: Figures>(id: &str, raw: &RawRun) -> String {
        let run = typed::<T>(raw);
        if let Err(e) = &run.result {
            return format!("ERROR {e}");
        }
        let keys = T::rows(id).into_iter().filter(|r| r.has('K') || r.has('T'));
        keys.map(|r| format!("{} {}", r.label, r.cell(Some(&run))))
            .collect::<Vec<_>>()
            .join(", ")
    }
    by_workload!(id, line(id, raw))
}

/// Every workload absent.
pub fn no_workloads() -> Workloads {
    Workloads {
        w1: None,
        w2: None,
        w3: None,
        w4: None,
        w5: None,
        w6: None,
        w7: None,
    }
}

/// Files one workload's runs (`flags`: its command, chatroom's, Node's and the server's flags).
pub fn file(
    ws: &mut Workloads,
    id: &str,
    title: &str,
    flags: [String; 4],
    runs: BTreeMap<&str, Vec<RawRun>>,
) -> Result<(), String> {
    fn make<T: Figures>(
        title: &str,
        flags: [String; 4],
        runs: &BTreeMap<&str, Vec<RawRun>>,
    ) -> Result<Workload<T>, String> {
        let series = |name: &str| {
            runs.get(name)
                .map(|r| Series::new(r.iter().map(typed).collect()))
                .transpose()
        };
        let [command, chatroom_flags, node_flags, chatroom_server_flags] = flags;
        let title = title.to_string();
        let (chatroom, chatroom_store, node) = (
            series("chatroom")?,
            series("chatroom_store")?,
            series("node")?,
        );
        Ok(Workload {
            title,
            command,
            chatroom_flags,
            node_flags,
            chatroom_server_flags,
            chatroom,
            chatroom_store,
            node,
        })
    }
    match id {
        "w1" => ws.w1 = Some(make(title, flags, &runs)?),
        "w2" => ws.w2 = Some(make(title, flags, &runs)?),
        "w3" => ws.w3 = Some(make(title, flags, &runs)?),
        "w4" => ws.w4 = Some(make(title, flags, &runs)?),
        "w5" => ws.w5 = Some(make(title, flags, &runs)?),
        "w6" => ws.w6 = Some(make(title, flags, &runs)?),
        _ => ws.w7 = Some(make(title, flags, &runs)?),
    }
    Ok(())
}

/// A workload's markdown section and its runs' noise, whatever its figures' type.
trait Section {
    fn markdown(&self, s: &mut String, id: &str);
    fn noise(&self) -> Vec<(&str, &Noise)>;
}

impl<T: Figures> Section for Workload<T> {
    fn markdown(&self, s: &mut String, id: &str) {
        section(s, id, self);
    }
    fn noise(&self) -> Vec<(&str, &Noise)> {
        self.servers()
            .into_iter()
            .flat_map(|(_, sr)| sr.runs.iter().map(|r| (r.tag.as_str(), &r.noise)))
            .collect()
    }
}

fn sections(w: &Workloads) -> Vec<(&'static str, &dyn Section)> {
    fn d<T: Figures>(w: &Option<Workload<T>>) -> Option<&dyn Section> {
        w.as_ref().map(|w| w as &dyn Section)
    }
    let all = [
        ("w1", d(&w.w1)),
        ("w2", d(&w.w2)),
        ("w3", d(&w.w3)),
        ("w4", d(&w.w4)),
        ("w5", d(&w.w5)),
        ("w6", d(&w.w6)),
        ("w7", d(&w.w7)),
    ];
    all.into_iter()
        .filter_map(|(id, s)| Some((id, s?)))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Checks

/// A target check's outcome.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Verdict {
    Pass,
    Fail,
    /// Not judged, and the value says why.
    NotApplicable,
}

impl Verdict {
    fn of(pass: bool) -> Verdict {
        if pass {
            Verdict::Pass
        } else {
            Verdict::Fail
        }
    }
    pub fn word(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::NotApplicable => "n/a",
        }
    }
    fn markdown(self) -> &'static str {
        match self {
            Verdict::Pass => "✅ pass",
            Verdict::Fail => "❌ **fail**",
            Verdict::NotApplicable => "n/a",
        }
    }
}

/// Whether any check failed (the suite then exits 1).
pub fn failed(checks: &[Check]) -> bool {
    checks.iter().any(|c| c.verdict == Verdict::Fail)
}

/// One target check: the workload, the target, what was measured, and the verdict.
#[derive(Clone, Debug, PartialEq)]
pub struct Check {
    pub workload: &'static str,
    pub target: String,
    pub value: String,
    pub verdict: Verdict,
}

/// How much worse a key figure may get with the store on.
pub const TOLERANCE: f64 = 0.10;
/// W7: `unwritten` must be back to 0 this soon after sending stops.
const DRAIN_LIMIT_S: f64 = 1.0;
/// W7: the store kept up while sending if it wrote at least this share of what came in.
const KEEP_UP_SHARE: f64 = 0.95;

struct Checks(Vec<Check>);

impl Checks {
    fn push(
        &mut self,
        workload: &'static str,
        target: impl Into<String>,
        value: String,
        verdict: Verdict,
    ) {
        self.0.push(Check {
            workload,
            target: target.into(),
            value,
            verdict,
        });
    }

    /// A server's medians of a workload, if it ran; a failed check when it ran and no run
    /// completed, so that a workload that only errors can never pass.
    fn medians<'a, T>(
        &mut self,
        id: &'static str,
        w: &'a Option<Workload<T>>,
        server: &str,
    ) -> Option<&'a T> {
        let sr = w
            .as_ref()?
            .servers()
            .into_iter()
            .find(|(n, _)| *n == server)?
            .1;
        let m = sr.median.as_ref().and_then(Run::ok);
        if m.is_none() {
            self.push(
                id,
                format!("{server} completes a run"),
                format!("0 of {} runs completed", sr.runs.len()),
                Verdict::Fail,
            );
        }
        m
    }
}

/// The targets, judged on chatroom's medians (and the store's paired runs).
pub fn checks(r: &Results) -> Vec<Check> {
    let (w, quick) = (&r.workloads, r.quick);
    let mut out = Checks(Vec::new());
    if let Some(c) = out.medians("w1", &w.w1, "chatroom") {
        let cpu = c.server.cpu_us_per_delivery;
        out.push(
            "w1",
            "server CPU per delivery ≤ 1.0 µs",
            format!("{} µs", fmt(cpu, 3)),
            Verdict::of(cpu <= 1.0),
        );
        let target = "≥ 5× less server CPU per delivery than Node";
        match w
            .w1
            .as_ref()
            .and_then(|w| w.median("node"))
            .and_then(Run::ok)
        {
            Some(n) if cpu > 0.0 => {
                let x = n.server.cpu_us_per_delivery / cpu;
                out.push(
                    "w1",
                    target,
                    format!("{}×", fmt(x, 1)),
                    Verdict::of(x >= 5.0),
                )
            }
            _ => out.push("w1", target, "no Node run".into(), Verdict::NotApplicable),
        }
        let value = format!(
            "lost {}, dropped {}",
            fmt(c.lost, 0),
            fmt(c.clients_closed_early, 0)
        );
        out.push(
            "w1",
            "nothing lost, nobody dropped",
            value,
            Verdict::of(c.lost == 0 && c.clients_closed_early == 0),
        );
    }
    let w2_p99 = out.medians("w2", &w.w2, "chatroom").map(|c| {
        let p99 = c.latency.p99_us / MS;
        out.push(
            "w2",
            "p99 ≤ 3 ms",
            format!("{} ms", fmt(p99, 3)),
            Verdict::of(p99 <= 3.0),
        );
        out.push(
            "w2",
            "nothing lost",
            fmt(c.lost, 0),
            Verdict::of(c.lost == 0),
        );
        p99
    });
    if let Some(c) = out.medians("w3", &w.w3, "chatroom") {
        let want = if quick { c.clients_target } else { 7000 };
        let target = format!(
            "≥ {} concurrent clients{}",
            fmt(want, 0),
            if quick { " (quick: scaled down)" } else { "" }
        );
        out.push(
            "w3",
            target,
            fmt(c.connected, 0),
            Verdict::of(c.connected >= want),
        );
        let rss = c.rss_kib_per_client;
        out.push(
            "w3",
            "≤ 24 KiB RSS per idle client",
            format!("{} KiB", fmt(rss, 1)),
            Verdict::of(rss <= 24.0),
        );
        let (att, refused) = (c.over_cap.attempted, c.over_cap.refused_503);
        let ok = refused == att
            && c.healthz_status == Some(200)
            && c.probe_received
            && c.dropped_by_server == 0;
        let probe = if c.probe_received {
            "received"
        } else {
            "MISSING"
        };
        let value = format!(
            "{}/{} refused, healthz {}, probe {probe}, dropped {}",
            fmt(refused, 0),
            fmt(att, 0),
            fmt(c.healthz_status, 0),
            fmt(c.dropped_by_server, 0)
        );
        out.push(
            "w3",
            "cap refusal clean: every extra gets 503, /healthz 200, an early client still served",
            value,
            Verdict::of(ok),
        );
    }
    if let Some(c) = out.medians("w4", &w.w4, "chatroom") {
        let value = format!(
            "{} of {} in {} s",
            fmt(c.welcomed, 0),
            fmt(c.clients, 0),
            fmt(c.all_welcomed_s, 3)
        );
        out.push(
            "w4",
            "all welcomed within 2 s",
            value,
            Verdict::of(c.all_welcomed_s <= 2.0 && c.welcomed == c.clients),
        );
    }
    if let Some(c) = out.medians("w5", &w.w5, "chatroom") {
        w5_checks(&mut out, c, w2_p99, quick);
    }
    if let Some(c) = out.medians("w6", &w.w6, "chatroom") {
        let back = c.all_back_to_baseline;
        let value = format!("back {back}, errors {}", fmt(c.errors, 0));
        out.push(
            "w6",
            "threads and fds back to baseline after each round, no client errors",
            value,
            Verdict::of(back && c.errors == 0),
        );
        let rss = &c.rss_kib_by_round;
        let mean = rss.iter().sum::<u64>() as f64 / rss.len().max(1) as f64;
        let (limit, slope) = ((0.005 * mean).max(64.0), c.rss_slope_kib_per_round);
        let target = format!("RSS does not grow round over round (slope from round {} ≤ 0.5% of RSS or 64 KiB per round)", c.rss_slope_from_round);
        out.push(
            "w6",
            target,
            format!("{slope:+.0} KiB/round (limit {limit:.0})"),
            Verdict::of(slope <= limit),
        );
    }
    for (id, wl) in [("w1", &w.w1), ("w2", &w.w2)] {
        if let Some(wl) = wl
            .as_ref()
            .filter(|w| w.chatroom.is_some() && w.chatroom_store.is_some())
        {
            store_checks(&mut out, id, wl);
        }
    }
    if let Some(wl) = w.w7.as_ref().filter(|w| w.chatroom_store.is_some()) {
        w7_check(&mut out, wl);
    }
    out.0
}

fn w5_checks(out: &mut Checks, c: &Traffic, w2_p99: Option<f64>, quick: bool) {
    let Some(slow) = &c.slow else {
        return out.push(
            "w5",
            "the stalled reader is measured",
            "no stalled reader in the figures".into(),
            Verdict::Fail,
        );
    };
    let p99 = slow.latency_other_rooms.p99_us / MS;
    let target = "others' p99 within 2× of workload 2's";
    match w2_p99 {
        Some(b) => out.push(
            "w5",
            target,
            format!("{} ms vs {} ms", fmt(p99, 3), fmt(b, 3)),
            Verdict::of(p99 <= 2.0 * b),
        ),
        None => out.push(
            "w5",
            target,
            "W2 did not run".into(),
            Verdict::NotApplicable,
        ),
    }
    let (closed, left) = (slow.closed_by_server, slow.left_seen);
    let after = slow
        .left_seen_after_s
        .map(|a| format!(" after {} s", fmt(a, 1)))
        .unwrap_or_default();
    // Quick runs are shorter than the detection takes.
    let verdict = match closed && left {
        true => Verdict::Pass,
        false if quick => Verdict::NotApplicable,
        false => Verdict::Fail,
    };
    let value = format!("closed {closed}, left seen {left}{after}");
    out.push(
        "w5",
        "the stalled reader is closed (and the room told it left)",
        value,
        verdict,
    );
    let growth = slow.rss_kib_growth_max as f64 / MIB;
    out.push(
        "w5",
        "server memory bounded (growth ≤ 64 MiB)",
        format!("{} MiB", fmt(growth, 1)),
        Verdict::of(growth <= 64.0),
    );
    out.push(
        "w5",
        "nothing lost by the others",
        fmt(c.lost, 0),
        Verdict::of(c.lost == 0),
    );
}

/// Per repetition, store-on ÷ memory-only for one row (runs pair up by index: one of each per
/// repetition, errors included); absent where either is absent or not above 0.
fn paired(w: &Workload<Traffic>, row: &Row<Traffic>) -> Vec<Option<f64>> {
    let runs = |s: &Option<Series<Traffic>>| s.as_ref().map(|s| s.runs.clone()).unwrap_or_default();
    let (a, b) = (runs(&w.chatroom), runs(&w.chatroom_store));
    let ratio = |(x, y): (&Run<Traffic>, &Run<Traffic>)| {
        let (x, y) = (row.value(x).num()?, row.value(y).num()?);
        (x > 0.0 && y > 0.0).then(|| y / x)
    };
    a.iter().zip(b.iter()).map(ratio).collect()
}

fn median_of(v: &[Option<f64>]) -> Option<f64> {
    median(&mut v.iter().flatten().copied().collect::<Vec<_>>())
}

/// How much worse a store ÷ memory ratio is (positive: worse).
fn worse_by(better: Better, ratio: f64) -> Option<f64> {
    match better {
        Higher => Some(1.0 - ratio),
        Lower => Some(ratio - 1.0),
        Neither => None,
    }
}

/// `worse` (a fraction, positive when worse) in words.
fn change(worse: f64) -> String {
    match worse > 0.0 {
        true => format!("{}% worse", fmt(worse * 100.0, 1)),
        false => format!("{}% better", fmt(-worse * 100.0, 1)),
    }
}

fn store_checks(out: &mut Checks, id: &'static str, w: &Workload<Traffic>) {
    let (mut parts, mut names, mut verdict) = (Vec::new(), Vec::new(), Verdict::Pass);
    for row in Traffic::rows(id).iter().filter(|r| r.has('T')) {
        names.push(row.label);
        match median_of(&paired(w, row)).and_then(|x| Some((x, worse_by(row.better, x)?))) {
            Some((ratio, worse)) => {
                parts.push(format!(
                    "{} {}× ({})",
                    row.label,
                    fmt(ratio, 3),
                    change(worse)
                ));
                if worse > TOLERANCE {
                    verdict = Verdict::Fail;
                }
            }
            None => {
                parts.push(format!("{} –", row.label));
                if verdict == Verdict::Pass {
                    verdict = Verdict::NotApplicable;
                }
            }
        }
    }
    let target = format!("store on: no key figure more than 10% worse than memory-only ({}; store ÷ memory, median of paired runs)", names.join(", "));
    out.push(id, target, parts.join(", "), verdict);
    let (ok, text) = all_written(w);
    out.push(
        id,
        "store on: nothing lost, every message written, none dropped, store ok",
        text,
        Verdict::of(ok),
    );
}

/// Whether every store-on run completed, lost nothing, wrote every message and dropped none.
fn all_written(w: &Workload<Traffic>) -> (bool, String) {
    let Some(sr) = &w.chatroom_store else {
        return (false, "no store-on runs".into());
    };
    let (mut ok, mut n, mut worst) = (true, 0, String::new());
    for run in &sr.runs {
        let Some(r) = run.ok() else {
            ok = false;
            continue;
        };
        n += 1;
        let good = r.store.as_ref().is_some_and(|st| {
            r.lost == 0
                && r.clients_closed_early == 0
                && st.sent_by_load_generator == st.written_in_window
                && st.dropped == 0
                && st.drained
                && st.state == "ok"
        });
        if !good && worst.is_empty() {
            worst = format!(
                " ({}: lost {}, closed {}, {})",
                run.tag,
                r.lost,
                r.clients_closed_early,
                store_words(r.store.as_ref())
            );
        }
        ok &= good;
    }
    let m = sr.median.as_ref().and_then(Run::ok);
    let text = format!(
        "{n} runs; median: lost {}, {}{worst}",
        fmt(m.map(|m| m.lost), 0),
        store_words(m.and_then(|m| m.store.as_ref()))
    );
    (ok && n > 0, text)
}

fn store_words(st: Option<&Store>) -> String {
    match st {
        None => "no store figures".into(),
        Some(s) => format!(
            "written {} of {} sent, dropped {}, state {}",
            fmt(s.written_in_window, 0),
            fmt(s.sent_by_load_generator, 0),
            fmt(s.dropped, 0),
            s.state
        ),
    }
}

/// One W7 store-on run, as the check and the summary judge it.
struct W7Run {
    accepted: f64,
    written: f64,
    dropped: f64,
    at_stop: f64,
    drained_s: Option<f64>,
}

fn w7_runs(w: &Workload<Traffic>) -> Vec<W7Run> {
    let runs = w
        .chatroom_store
        .iter()
        .flat_map(|s| s.runs.iter())
        .filter_map(Run::ok);
    let st = runs.filter_map(|r| r.store.as_ref());
    st.map(|s| W7Run {
        accepted: s.accepted_per_s,
        written: s.written_per_s,
        dropped: s.dropped as f64,
        at_stop: s.unwritten_at_stop as f64,
        drained_s: s.drained_after_stop_s,
    })
    .collect()
}

/// W7's runs that fell behind, that dropped messages, and that drained too slowly.
fn w7_trouble(runs: &[W7Run]) -> (Vec<&W7Run>, Vec<&W7Run>, usize) {
    let behind = runs
        .iter()
        .filter(|x| x.written < KEEP_UP_SHARE * x.accepted)
        .collect();
    let dropping = runs.iter().filter(|x| x.dropped > 0.0).collect();
    let slow_drain = runs
        .iter()
        .filter(|x| x.drained_s.is_none_or(|d| d > DRAIN_LIMIT_S))
        .count();
    (behind, dropping, slow_drain)
}

fn w7_check(out: &mut Checks, w: &Workload<Traffic>) {
    let (ok, _) = all_written(w);
    let runs = w7_runs(w);
    let (behind, dropping, slow_drain) = w7_trouble(&runs);
    let n = runs.len();
    let most_dropped = runs.iter().map(|x| x.dropped).fold(0.0, f64::max);
    let keeps_up = ok && n > 0 && behind.is_empty() && dropping.is_empty() && slow_drain == 0;
    let target = format!("store keeps up at full speed: writes ≥ {}% of what comes in while sending, none dropped, unwritten back to 0 within {DRAIN_LIMIT_S} s of the end of sending", fmt(KEEP_UP_SHARE * 100.0, 0));
    let st = w
        .median("chatroom_store")
        .and_then(Run::ok)
        .and_then(|m| m.store.as_ref());
    let value = match st {
        None => "no completed store-on run".to_string(),
        Some(st) => format!(
            "median {} accepted/s, {} written/s ({}%), back to 0 after {} ms, {} µs CPU per message; behind in {} of {n} runs, dropped messages in {} of {n} ({} dropped at most)",
            fmt(st.accepted_per_s, 0),
            fmt(st.written_per_s, 0),
            fmt(st.written_per_s / st.accepted_per_s * 100.0, 1),
            fmt(st.drained_after_stop_s.map(|x| x * MS), 0),
            fmt(st.thread.cpu_us_per_message, 2),
            behind.len(),
            dropping.len(),
            fmt(most_dropped, 0)
        ),
    };
    out.push("w7", target, value, Verdict::of(keeps_up));
}

// ---------------------------------------------------------------------------------------------
// Markdown

/// The whole BENCHMARKS.md.
pub fn markdown(r: &Results, checks: &[Check], notes: Option<&str>) -> String {
    let mut s = String::new();
    let (quick, m, q) = (r.quick, &r.machine, |x: &Option<String>| {
        x.clone().unwrap_or("?".into())
    });
    let _ = writeln!(s, "# Benchmarks\n");
    let _ = writeln!(
        s,
        "Generated by `{}` (`bench/run.sh{}`) on {}: {} repetition{} of each workload{}, medians shown; {} s in all. \
         Every run's figures: [`{}`]({}).{}\n",
        if quick { "make bench-quick" } else { "make bench" },
        if quick { " --quick" } else { "" },
        r.generated,
        r.reps,
        if r.reps == 1 { "" } else { "s" },
        match r.store_reps > r.reps {
            true => format!(" ({} for chatroom memory-only and store-on in W1 and W2, whose store check is a ratio of paired runs)", r.store_reps),
            false => String::new(),
        },
        fmt(r.total_s, 0),
        r.json_link,
        r.json_link,
        if quick { " **Quick run: smaller and shorter than the real workloads; use `make bench` for figures to quote.**" } else { "" },
    );
    let _ = writeln!(
        s,
        "## Targets (chatroom)\n\n| workload | target | measured | |\n|---|---|---|---|"
    );
    for c in checks {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            c.workload,
            c.target,
            c.value,
            c.verdict.markdown()
        );
    }
    let _ = writeln!(
        s,
        "\n## Machine\n\n- {} cores ({}), {} GiB, Linux {}; RLIMIT_NOFILE {}, vm.max_map_count {}, pid_max {}\n\
         - {}; Node {} with ws {}\n- chatroom at git {}{}",
        fmt(m.nproc, 0),
        q(&m.cpu_model),
        fmt(m.mem_gib, 1),
        q(&m.kernel),
        q(&m.rlimit_nofile),
        q(&m.vm_max_map_count),
        q(&m.pid_max),
        q(&m.rustc),
        q(&m.node),
        q(&m.ws_package),
        q(&m.git_rev),
        if m.git_dirty == Some(true) { " (with uncommitted changes in src/)" } else { "" },
    );
    for srv in &r.servers {
        let dir = format!(
            " (DIR: a fresh directory under `{}` for each run, removed after it)",
            r.store_data_root
        );
        let _ = writeln!(
            s,
            "- `{}`: `{}`{}",
            srv.name,
            srv.command,
            if srv.name == "chatroom_store" {
                &dir
            } else {
                ""
            }
        );
    }
    let _ = writeln!(s, "\n## Method\n");
    let _ = match r.pinned.is_empty() {
        true => writeln!(
            s,
            "- **Not pinned:** servers and the load generator share both cores in every workload."
        ),
        false => writeln!(
            s,
            "- **Pinned in {}:** {PINNED}",
            r.pinned.join(", ").to_uppercase()
        ),
    };
    let _ = writeln!(s, "{METHOD}");
    let sections = sections(&r.workloads);
    for (id, w) in &sections {
        w.markdown(&mut s, id);
    }
    let _ = writeln!(s, "## Noise\n\n{NOISE}\n\n| run | load avg before | other processes' CPU share | wall (s) |\n|---|---:|---:|---:|");
    for (tag, n) in sections.iter().flat_map(|(_, w)| w.noise()) {
        let _ = writeln!(
            s,
            "| {tag} | {} | {} | {} |",
            fmt(n.loadavg_1m_before, 2),
            fmt(n.other_cpu_share, 2),
            fmt(n.wall_s, 2)
        );
    }
    let _ = writeln!(s);
    if let Some(n) = notes {
        let _ = writeln!(s, "{}", n.trim_end());
    }
    s
}

/// "chatroom ahead by": node ÷ chatroom for lower-is-better figures, chatroom ÷ node for
/// higher-is-better ones.
fn ahead(better: Better, c: &V, n: &V) -> String {
    match (better, c.num(), n.num()) {
        (Lower, Some(c), Some(n)) if c > 0.0 && n > 0.0 => format!("{}×", fmt(n / c, 2)),
        (Higher, Some(c), Some(n)) if c > 0.0 && n > 0.0 => format!("{}×", fmt(c / n, 2)),
        _ => String::new(),
    }
}

fn section<T: Figures>(s: &mut String, id: &str, w: &Workload<T>) {
    let _ = writeln!(s, "## {} — {}\n", id.to_uppercase(), w.title);
    let flag = |who: &str, f: &str| {
        if f.is_empty() {
            String::new()
        } else {
            format!(" + {who}: `{f}`")
        }
    };
    let _ = writeln!(
        s,
        "`chatroom-bench {}`{}{}\n",
        w.command,
        flag("chatroom", &w.chatroom_flags),
        flag("node", &w.node_flags)
    );
    if !w.chatroom_server_flags.is_empty() {
        let _ = writeln!(s, "chatroom started with `{}`.\n", w.chatroom_server_flags);
    }
    // A workload without the Node peer (W7) has only its store-on table.
    let (c, n) = (w.median("chatroom"), w.median("node"));
    if w.node.is_some() {
        let _ = writeln!(
            s,
            "| metric | chatroom | node (ws) | chatroom ahead by |\n|---|---:|---:|---:|"
        );
        for row in T::rows(id).iter().filter(|r| r.has('m')) {
            let (cv, nv) = (
                c.map_or(V::Missing, |c| row.value(c)),
                n.map_or(V::Missing, |n| row.value(n)),
            );
            let (cs, ns) = (fmt(cv.clone(), row.decimals), fmt(nv.clone(), row.decimals));
            let _ = writeln!(
                s,
                "| {} | {cs} | {ns} | {} |",
                row.title('K'),
                ahead(row.better, &cv, &nv)
            );
        }
        let _ = writeln!(s);
    }
    let done: Vec<String> = w
        .servers()
        .iter()
        .map(|(name, sr)| format!("{name} {}", sr.ok_runs()))
        .collect();
    let _ = writeln!(s, "Runs that completed: {}.", done.join(", "));
    for (name, sr) in w.servers() {
        for run in &sr.runs {
            match &run.result {
                Err(e) => writeln!(s, "- {name} run {}: error {e}", run.tag),
                Ok(r) => match r.error_samples().first() {
                    Some(e) => writeln!(
                        s,
                        "- {name} {}: client errors, e.g. `{}`",
                        run.tag,
                        e.replace('`', "'")
                    ),
                    None => Ok(()),
                },
            }
            .unwrap_or_default();
        }
    }
    let _ = writeln!(s);
    T::extra(s, id, w);
}

/// W3's tables after the main one: kernel memory per client, growth by checkpoint, smaps.
fn capacity_tables(s: &mut String, w: &Workload<Capacity>) {
    let (Some(c), n) = (
        w.median("chatroom").and_then(Run::ok),
        w.median("node").and_then(Run::ok),
    ) else {
        return;
    };
    if c.kernel_kib_per_client.is_some() {
        let _ = writeln!(s, "Memory per idle client (KiB), the process's RSS and the host's kernel memory (`/proc/meminfo` before and after connecting, divided by the clients):\n");
        let _ = writeln!(
            s,
            "| per idle client (KiB) | chatroom | node (ws) |\n|---|---:|---:|"
        );
        for row in Capacity::rows("w3").iter().filter(|r| r.has('k')) {
            let cell = |r: Option<&Run<Capacity>>| row.cell(r);
            let _ = writeln!(
                s,
                "| {} | {} | {} |",
                row.title('K'),
                cell(w.median("chatroom")),
                cell(w.median("node"))
            );
        }
        let _ = writeln!(s, "\nThe kernel figures are host-wide: they include the load generator's side of every connection \
            (its socket in `Slab`), which is the same for every server, so the difference between the columns is the servers'.\n");
    }
    let _ = writeln!(s, "Server growth while connecting (chatroom | node):\n");
    let _ = writeln!(s, "| clients | chatroom RSS (MiB) | threads | fds | node RSS (MiB) | node fds |\n|---:|---:|---:|---:|---:|---:|");
    for (i, cp) in c.checkpoints.iter().enumerate() {
        let np = n.and_then(|n| n.checkpoints.get(i));
        let (nrss, nfds) = (np.map(|p| p.rss_kib as f64 / MIB), np.map(|p| p.fds));
        let line = [
            fmt(cp.clients, 0),
            fmt(cp.rss_kib as f64 / MIB, 1),
            fmt(cp.threads, 0),
            fmt(cp.fds, 0),
            fmt(nrss, 1),
            fmt(nfds, 0),
        ];
        let _ = writeln!(s, "| {} |", line.map(|x| x.replace(',', "")).join(" | "));
    }
    let _ = writeln!(s);
    let Some(sm) = &c.smaps else {
        return;
    };
    let _ = writeln!(
        s,
        "### Where chatroom's per-client memory goes (measured)\n\n{SMAPS}\n"
    );
    let _ = writeln!(
        s,
        "| mapping (perms, size) | count before → after | RSS per client (KiB) |\n|---|---:|---:|"
    );
    for g in &sm.anon_groups {
        let _ = writeln!(
            s,
            "| `{}` {} KiB | {} → {} | {} |",
            g.perms,
            g.size_kib,
            g.count_before,
            g.count_after,
            fmt(g.rss_kib_per_client, 2)
        );
    }
    let _ = writeln!(
        s,
        "\nPer client: **{} KiB in mappings that come one or more per client** (thread stacks; signal stacks and guard pages \
         are mapped but not resident), **{} KiB in the other anonymous mappings** (malloc's per-thread arenas), {} KiB in the \
         `[heap]` (main arena), {} KiB in all named mappings (binary, libraries, `[heap]`). Total RSS per client: {} KiB; memory \
         maps per client: {}.\n",
        fmt(sm.per_client_mappings_rss_kib_per_client, 2),
        fmt(sm.other_anon_rss_kib_per_client, 2),
        fmt(sm.brk_heap_rss_kib_per_client, 2),
        fmt(sm.named_rss_kib_per_client, 2),
        json!(c.rss_kib_per_client),
        json!(c.maps_per_client)
    );
}

fn churn_table(s: &mut String, w: &Workload<Churn>) {
    let (Some(c), n) = (
        w.median("chatroom").and_then(Run::ok),
        w.median("node").and_then(Run::ok),
    ) else {
        return;
    };
    let _ = writeln!(s, "Per round (median over repetitions):\n");
    let _ = writeln!(s, "| round | chatroom peak threads | connection threads after | all threads after | fds after | RSS after (MiB) | settle (ms) | node threads after | node fds after | node RSS after (MiB) |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (i, rd) in c.per_round.iter().enumerate() {
        let nr = n.and_then(|n| n.per_round.get(i));
        let (nt, nf, nrss) = (
            nr.map(|r| r.threads),
            nr.map(|r| r.fds),
            nr.map(|r| r.rss_kib as f64 / MIB),
        );
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            rd.round,
            rd.peak_threads,
            rd.connection_threads,
            rd.threads,
            rd.fds,
            fmt(rd.rss_kib as f64 / MIB, 1),
            json!(rd.settle_ms),
            fmt(nt, 0),
            fmt(nf, 0),
            fmt(nrss, 1)
        );
    }
    let _ = writeln!(s);
}

/// The "store on" part of a workload's section: nothing for a workload without a store variant.
pub fn store_section(s: &mut String, id: &str, w: &Workload<Traffic>) {
    let (c, st) = (w.median("chatroom"), w.median("chatroom_store"));
    if st.is_none() {
        return;
    }
    let rows = Traffic::rows(id);
    let keys = match rows.iter().any(|r| r.has('T')) {
        true => format!(
            " Key figures (bold) may be at most {}% worse.",
            fmt(TOLERANCE * 100.0, 0)
        ),
        false => String::new(),
    };
    let _ = writeln!(s, "### With the store on\n\n{STORE_ON}{keys}\n");
    let _ = writeln!(s, "| metric | memory only | store on | store ÷ memory | per repetition | |\n|---|---:|---:|---:|---|---|");
    for row in rows.iter().filter(|r| r.has('s')) {
        let per = paired(w, row);
        let med = median_of(&per);
        let verdict = match (row.has('T'), med.and_then(|x| worse_by(row.better, x))) {
            (true, Some(x)) if x <= TOLERANCE => format!("✅ {}", change(x)),
            (true, Some(x)) => format!("❌ **{}**", change(x)),
            (true, None) => "n/a".to_string(),
            (false, _) => String::new(),
        };
        let ratio = med.map(|x| format!("{}×", fmt(x, 3))).unwrap_or_default();
        let per: Vec<String> = per.into_iter().map(|x| fmt(x, 3)).collect();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {ratio} | {} | {verdict} |",
            row.title('T'),
            row.cell(c),
            row.cell(st),
            per.join(", ")
        );
    }
    let _ = writeln!(s, "\nThe store's own figures (store-on runs, medians):\n\n| metric | store on | per run |\n|---|---:|---|");
    let runs = w
        .chatroom_store
        .as_ref()
        .map(|sr| sr.runs.as_slice())
        .unwrap_or_default();
    for row in rows.iter().filter(|r| r.has('c')) {
        let text = st.is_some_and(|st| matches!(row.value(st), V::S(_)));
        let per: Vec<String> = runs.iter().map(|r| row.cell(Some(r))).collect();
        let per = if text {
            " ".to_string()
        } else {
            format!(" {} ", per.join(", "))
        };
        let _ = writeln!(s, "| {} | {} |{per}|", row.title('K'), row.cell(st));
    }
    let _ = writeln!(s);
    if let (Some(c), Some(st)) = (c.and_then(Run::ok), st.and_then(Run::ok)) {
        thread_table(s, c, st);
    }
    if id == "w7" {
        w7_summary(s, w);
    }
}

/// Server CPU per delivery by kind of thread, memory-only against store-on: where the extra
/// CPU goes.
fn thread_table(s: &mut String, c: &Traffic, st: &Traffic) {
    let (a, b) = (&c.server.cpu_by_thread_kind, &st.server.cpu_by_thread_kind);
    let mut kinds: Vec<&String> = a.keys().chain(b.keys()).collect();
    kinds.sort();
    kinds.dedup();
    let _ = writeln!(s, "{THREADS}\n");
    let _ = writeln!(s, "| thread | µs, memory only | µs, store on | difference | slices, memory only | slices, store on |\n|---|---:|---:|---:|---:|---:|");
    let (mut ta, mut tb) = (0.0, 0.0);
    for k in kinds {
        let per = |m: &BTreeMap<String, crate::results::KindCpu>| {
            m.get(k)
                .map(|v| v.run_us_per_delivery.unwrap_or(v.cpu_us_per_delivery))
        };
        let slices = |m: &BTreeMap<String, crate::results::KindCpu>| {
            m.get(k).and_then(|v| v.slices_per_1000_deliveries)
        };
        let (x, y) = (per(a), per(b));
        if x.unwrap_or(0.0) < 0.0005 && y.unwrap_or(0.0) < 0.0005 {
            continue;
        }
        ta += x.unwrap_or(0.0);
        tb += y.unwrap_or(0.0);
        let diff = match (x, y) {
            (Some(x), Some(y)) => format!("{:+.4}", y - x),
            (None, Some(y)) => format!("{y:+.4}"),
            _ => String::new(),
        };
        let _ = writeln!(
            s,
            "| `{k}` | {} | {} | {diff} | {} | {} |",
            fmt(x, 4),
            fmt(y, 4),
            fmt(slices(a), 1),
            fmt(slices(b), 1)
        );
    }
    let _ = writeln!(
        s,
        "| all of the above | {} | {} | {:+.4} | | |\n",
        fmt(ta, 4),
        fmt(tb, 4),
        tb - ta
    );
}

/// `lo–hi` of some figure over the runs, rounded to whole numbers.
fn span(xs: impl Iterator<Item = f64>) -> String {
    let v: Vec<f64> = xs.collect();
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    match v.is_empty() {
        true => "–".into(),
        false if (hi - lo).abs() < 0.5 => fmt(lo, 0),
        false => format!("{}–{}", fmt(lo, 0), fmt(hi, 0)),
    }
}

fn w7_summary(s: &mut String, w: &Workload<Traffic>) {
    let runs = w7_runs(w);
    let (Some(st), false) = (
        w.median("chatroom_store").and_then(Run::ok),
        runs.is_empty(),
    ) else {
        return;
    };
    let Some(store) = &st.store else {
        return;
    };
    let mem = w.median("chatroom").and_then(Run::ok).map(|c| c.sent_per_s);
    let (us, t) = (store.thread.cpu_us_per_message, &store.thread);
    let ceiling = (us > 0.0).then(|| 1e6 / us);
    let n = runs.len();
    let (behind, dropping, slow_drain) = w7_trouble(&runs);
    let _ = write!(
        s,
        "Over {n} runs with the store on, the hub accepted **{} messages/s** ({} without the store, median) and the store wrote \
         **{} messages/s** while they came in; `unwritten` stood at {} when sending stopped and was back to 0 after {} ms. ",
        span(runs.iter().map(|x| x.accepted)),
        fmt(mem, 0),
        span(runs.iter().map(|x| x.written)),
        span(runs.iter().map(|x| x.at_stop)),
        span(runs.iter().filter_map(|x| x.drained_s).map(|d| d * MS)),
    );
    if behind.is_empty() && dropping.is_empty() && slow_drain == 0 {
        let _ = writeln!(
            s,
            "It kept up with everything the hub accepted, so it sustains **at least {} messages/s** here: a lower bound, set by \
             the hub and the load generator. At {} µs of CPU per message its thread would write about {} messages/s on a core \
             of its own: an estimate, not a measurement.\n",
            span(runs.iter().map(|x| x.accepted)),
            fmt(us, 2),
            fmt(ceiling, 0),
        );
        return;
    }
    let states = &store.thread_states_while_sending;
    let wchans: Vec<String> = states
        .top
        .iter()
        .filter(|t| t.state == "D")
        .map(|t| format!("`{}` {}%", t.wchan, fmt(t.share * 100.0, 0)))
        .collect();
    let cause = match (states.share.get("D").copied(), t.runqueue_wait_ms) {
        (Some(d), _) if d >= 0.3 => format!(
            "What held it back was the disk: sampled while sending, it was in uninterruptible sleep (state D) {}% of the time ({}).",
            fmt(d * 100.0, 0),
            wchans.join(", ")
        ),
        (_, Some(wait)) if wait / MS > 0.5 * store.window_s => format!(
            "What held it back was its share of the CPU, not the work per message or the disk: it ran {}% of one core and \
             spent {} s of the {} s window runnable but waiting for a CPU, one thread among the server's {} on two cores \
             shared with the load generator.",
            fmt(t.busy_share_of_a_core * 100.0, 0),
            fmt(wait / MS, 1),
            fmt(store.window_s, 1),
            fmt(st.server.threads, 0)
        ),
        _ => "Neither its wait for a CPU nor for the disk explains the shortfall alone.".to_string(),
    };
    let _ = writeln!(
        s,
        "**It did not keep up at full speed**: in {} of {n} runs it wrote less than {}% of what came in (it fell behind by {} \
         messages/s), and in {} of {n} runs `unwritten` reached the store's cap (`MAX_UNWRITTEN`) and the hub dropped {} \
         messages (broadcast, never written). So on this machine, with the hub taking every message it can, the store \
         sustains about **{} messages/s written**; it keeps up with less than that. Once sending stopped it caught up at \
         about {} messages/s, and at {} µs of CPU per message a core of its own would allow about {} messages/s. {cause}\n",
        behind.len(),
        fmt(KEEP_UP_SHARE * 100.0, 0),
        span(behind.iter().map(|x| x.accepted - x.written)),
        dropping.len(),
        span(dropping.iter().map(|x| x.dropped)),
        span(runs.iter().map(|x| x.written)),
        span(runs.iter().filter_map(|x| x.drained_s.filter(|d| *d > 0.0).map(|d| x.at_stop / d))),
        fmt(us, 2),
        fmt(ceiling, 0),
    );
}

const PINNED: &str = "the server runs on CPU 0 (`taskset -c 0`) and the load generator on CPU 1, so neither steals the \
    other's core and each server gets exactly one core (Node uses one anyway; chatroom's threads share it), as in the design \
    notes' fan-out measurements. The other workloads run unpinned, as a deployment would (`--pin-all` / `--no-pin` change \
    this).";

const STORE_ON: &str = "chatroom with `--data DIR` (SQLite, a fresh directory per run) against the same binary with \
    `--data none`, back to back in every repetition. Ratios are store-on ÷ memory-only within each repetition; the table \
    shows their median and every repetition's.";

const THREADS: &str = "Server CPU per delivery by kind of thread (µs of `schedstat` run time over the sending time, divided \
    by all deliveries), and how often those threads were put on a CPU (`schedstat` time slices, each a wake-up or a \
    preemption, per 1,000 deliveries); medians:";

const SMAPS: &str = "From `/proc/PID/smaps` before and after connecting the clients. Anonymous mappings are grouped by \
    permissions and size: thread stacks, signal stacks and guard pages each have one size, so a group whose count grows by \
    about one per client is a per-client mapping, and its resident pages per client are measured. Memory that malloc hands \
    out (tungstenite buffers, channel slots, `Arc`s, room state) lives in malloc's arenas: the main `[heap]` and the 64 MiB \
    per-thread arenas (the `rw-p`/`---p` groups that do not grow by count).";

const NOISE: &str = "This machine is shared: other builds and test suites may run during the benchmark. For each run the \
    suite records the 1-minute load average before it and the CPU that every *other* process used while it ran \
    (`/proc/stat` busy time minus the server's and the load generator's CPU), as a share of the machine. CPU per delivery is \
    the steadiest figure under such noise; latency and throughput suffer first.";

const METHOD: &str = "\
- `bench/run.sh` builds chatroom and the load generator in release mode, installs the Node peer's locked \
  dependencies (`npm ci`), and runs `chatroom-bench suite`. For every run of every workload it starts a **fresh \
  server** on port 0 (chatroom: `--rate-limit off --log-level warn --data none`, i.e. history in memory only, \
  default settings otherwise; Node peer: \
  `bench/peers/node-ws/server.js`, same contract, each broadcast serialized once), reads the bound port from its \
  first stdout line, runs the workload as a child process, and stops the server with SIGTERM (SIGKILL after 5 s) by \
  pid. Runs alternate between the servers so that noise hits both alike; the table shows the median of the runs.
- The load generator (`bench/`, tokio with 2 worker threads, tokio-tungstenite) holds every client as a task, \
  never a thread. A message's text is `b:<sender>:<seq>:<send time in ns>`; a receiver finds `\"text\":\"b:` in the \
  frame and reads three integers, so latency is send → delivery at each receiver, on one monotonic clock. Every \
  receiver must get every message of its room: lost = expected − received, per receiver, after a drain of up to 5 s.
- Server CPU is `utime + stime` of `/proc/PID/stat` (all threads, exited ones included) over the measurement window; \
  memory, threads and fds come from `/proc/PID/status` and `/proc/PID/fd`. The load generator reports its own CPU \
  the same way, so one can see which side was saturated.
- W1: 1 room, 100 clients, 10 of them senders, closed loop: each sender keeps at most 8 of its own messages \
  un-echoed. W2: 20 rooms × 20 clients, 2 senders per room at 20 messages/s each, open loop. W3: idle clients in \
  rooms of 100, opened 64 at a time, up to chatroom's default cap of 7,000, then 500 more; `/healthz`, then a \
  message from client 1 must reach client 0. The Node peer has no cap: same N, no 503 step. W4: 1,000 clients \
  connect and say hello at once to one room. W5: W2 plus one client that sends hello and never reads again; its \
  room's messages carry 3,900 extra `€` (≈ 11.7 KB frames) so that the kernel buffers between it and the server \
  fill within seconds rather than minutes. W6: rounds of 1,000 clients (rooms of 100, 200 connecting at once) that \
  each say one message, wait for its echo and close; after each round the suite waits up to 10 s for the server's \
  threads and fds to return to the idle baseline.
- **Store on** (`chatroom_store`, W1, W2 and W7): the same chatroom binary with `--data DIR` instead of \
  `--data none`, DIR a fresh directory under the temp dir (same disk as `/tmp`) created for the run and removed \
  after it; default `--retain`. In every repetition the memory-only and store-on runs go back to back, in \
  alternating order, so that noise hits both alike. \"store ÷ memory\" is the median over repetitions of the \
  ratio within each pair. The store's cost: CPU of the server's thread named `store` (`utime + stime` of \
  `/proc/PID/task/TID/stat`, cross-checked with `schedstat`'s nanoseconds) from the start of sending until \
  `/healthz` reports `unwritten` = 0 after the last delivery, divided by the messages written in that window \
  (the delta of `store.written`). Accepted = `written + unwritten + dropped`.
- W7: 100 rooms of one client each, every client a closed-loop sender (8 in flight), rate limit off, so the \
  server takes messages as fast as it can with the least fan-out: what the store must keep up with.
- \"chatroom ahead by\" is node ÷ chatroom for lower-is-better figures and chatroom ÷ node for higher-is-better \
  ones: above 1× chatroom is ahead.
";

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed results: they must parse, as typed, whatever run wrote them.
    fn committed() -> Results {
        Results::parse(include_str!("../results.json")).expect("bench/results.json parses")
    }

    #[test]
    fn a_renamed_or_missing_field_fails_to_parse() {
        let text = include_str!("../results.json");
        let renamed = text.replacen("\"deliveries_per_s\"", "\"deliveries_per_sec\"", 1);
        let e = Results::parse(&renamed).unwrap_err();
        assert!(
            e.contains("deliveries_per_sec") || e.contains("deliveries_per_s"),
            "{e}"
        );
        let old_schema = text.replacen(SCHEMA_LINE, "\"schema\": \"chatroom-bench/1\"", 1);
        assert!(Results::parse(&old_schema).unwrap_err().contains("schema"));
    }

    const SCHEMA_LINE: &str = "\"schema\": \"chatroom-bench/2\"";

    #[test]
    fn a_failing_check_is_reported_as_a_failure() {
        let mut r = committed();
        let w1 = r.workloads.w1.as_mut().unwrap();
        let median = w1.chatroom.as_mut().unwrap().median.as_mut().unwrap();
        median.result.as_mut().unwrap().server.cpu_us_per_delivery = 2.0;
        let checks = checks(&r);
        let c = checks
            .iter()
            .find(|c| c.target == "server CPU per delivery ≤ 1.0 µs")
            .unwrap();
        assert_eq!((c.verdict, c.value.as_str()), (Verdict::Fail, "2.000 µs"));
        assert!(failed(&checks));
        assert!(markdown(&r, &checks, None)
            .contains("| w1 | server CPU per delivery ≤ 1.0 µs | 2.000 µs | ❌ **fail** |"));
    }

    #[test]
    fn a_workload_whose_runs_all_failed_fails_its_check() {
        let mut r = committed();
        let w4 = r.workloads.w4.as_mut().unwrap().chatroom.as_mut().unwrap();
        w4.median = None;
        let checks = checks(&r);
        let c = checks.iter().find(|c| c.workload == "w4").unwrap();
        assert_eq!(
            (c.target.as_str(), c.verdict),
            ("chatroom completes a run", Verdict::Fail)
        );
    }

    #[test]
    fn the_json_round_trips_in_its_compact_layout() {
        let r = committed();
        let text = r.to_json();
        assert_eq!(Results::parse(&text).unwrap(), r);
        assert!(text.lines().count() < 400, "{} lines", text.lines().count());
    }

    #[test]
    fn tables_show_the_medians() {
        let r = committed();
        let md = markdown(&r, &checks(&r), None);
        let w1 = r
            .workloads
            .w1
            .as_ref()
            .unwrap()
            .median("chatroom")
            .unwrap()
            .ok()
            .unwrap();
        let row = format!("| deliveries/s | {} |", fmt(w1.deliveries_per_s, 0));
        assert!(md.contains(&row), "{row}");
        assert!(md.contains("## W7 — Store throughput"));
    }

    #[test]
    fn numbers_and_missing_values_format_one_way() {
        assert_eq!(fmt(1489604.0, 0), "1,489,604");
        assert_eq!(fmt(-12345.0, 0), "-12,345");
        assert_eq!(fmt(7000u64, 0), "7000");
        assert_eq!(fmt(0.5364, 3), "0.536");
        assert_eq!(fmt(true, 0), "1");
        assert_eq!(fmt(None::<f64>, 2), "–");
    }

    #[test]
    fn the_median_keeps_whole_numbers_whole() {
        let runs = [
            json!({"a": 1, "b": 1.5, "c": true}),
            json!({"a": 4, "b": 2.5, "c": false}),
            json!({"a": 2, "b": null, "c": true}),
        ];
        assert_eq!(
            crate::results::merge(&runs),
            json!({"a": 2, "b": 2.0, "c": false})
        );
    }
}
