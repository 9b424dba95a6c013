//! `BENCHMARKS.md` from the typed results ([`crate::results`]), and the table definitions the
//! target checks ([`crate::checks`]) read their figures through.
//!
//! Each workload has one table definition ([`Figures::rows`]): a list of rows, each with its
//! label, decimals, which way is better, the tables it appears in (flags) and how to read it
//! from the typed figures. The flags: `m` the main table (chatroom beside the build before issue
//! 10 and the Node peer), `k` W3's memory-per-client table, `s` the tables of paired ratios
//! (store on ÷ memory only, two processes ÷ one), `r` those of two processes only (their Redis),
//! `c` the store's own figures (per run), `K` a key figure (bold, and in the progress line).
//! Every figure goes through one formatting helper, [`fmt`]. The fixed prose around the tables is
//! markdown in `bench/report-text.md` ([`prose`]).

use crate::checks::{bound, Check, PAIRED};
use crate::results::{Capacity, Churn, Disk, JoinStorm, KindCpu, Machine, Results, Run, Soak};
use crate::results::{Store, Traffic, Workload};
use crate::suite::RawRun;
use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

/// Which way is better for a figure (for the "ahead by" columns and the paired checks).
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

macro_rules! into_v {
    ($($t:ty),*) => {$(impl From<$t> for V { fn from(x: $t) -> V { V::N(x as f64) } })*};
}
into_v!(f64, u64, i64, u16, usize);
impl From<bool> for V {
    fn from(b: bool) -> V {
        V::N(if b { 1.0 } else { 0.0 })
    }
}
impl From<String> for V {
    fn from(s: String) -> V {
        V::S(s)
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
    let x = match v.into() {
        V::S(s) => return s,
        V::Missing => return "–".into(),
        V::N(x) if d > 0 || x.abs() < 10000.0 => return format!("{x:.d$}"),
        V::N(x) => x,
    };
    let digits = format!("{:.0}", x.abs());
    let mut out = String::from(if x < 0.0 { "-" } else { "" });
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
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
    pub fn has(&self, flag: char) -> bool {
        self.flags.contains(flag)
    }
    pub fn value(&self, run: &Run<T>) -> V {
        run.ok().map_or(V::Missing, |r| (self.get)(r, run))
    }
    fn cell(&self, run: Option<&Run<T>>) -> String {
        fmt(run.map_or(V::Missing, |r| self.value(r)), self.decimals)
    }
    /// The label, in bold when the row is a key figure.
    fn title(&self, bold: bool) -> String {
        match bold {
            true => format!("**{}**", self.label),
            false => self.label.to_string(),
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
    rows![Traffic;
        "messages sent by the load generator" 0 Neither "c" |r, _| st(r).map(|s| s.sent_by_load_generator);
        "messages written (`store.written` delta)" 0 Neither "c" |r, _| st(r).map(|s| s.written_in_window);
        "accepted/s while sending" 0 Neither "c" |r, _| st(r).map(|s| s.accepted_per_s);
        "written/s while sending" 0 Neither "c" |r, _| st(r).map(|s| s.written_per_s);
        "unwritten when sending stopped" 0 Neither "c" |r, _| st(r).map(|s| s.unwritten_at_stop);
        "unwritten back to 0, after sending stopped (ms)" 0 Neither "c" |r, _| st(r).and_then(|s| s.drained_after_stop_s).map(|x| x * MS);
        "`store` thread CPU per message (µs)" 2 Neither "cK" |r, _| st(r).map(|s| s.cpu_us_per_message);
        "… from schedstat's nanoseconds (µs)" 2 Neither "c" |r, _| st(r).and_then(|s| s.run_us_per_message);
        "`store` thread's share of the server's CPU (%)" 1 Neither "cK" |r, _| st(r).map(|s| s.share_of_server_cpu * 100.0);
        "messages dropped by the store" 0 Neither "c" |r, _| st(r).map(|s| s.dropped);
        "on disk after a clean stop (bytes per message)" 0 Neither "c" |_, run| run.disk.as_ref().map(|d| d.bytes_per_message);
        "on disk after a clean stop (MiB)" 1 Neither "c" |_, run| run.disk.as_ref().map(|d| d.total_bytes as f64 / 1048576.0);
        "state at the end" 0 Neither "c" |r, _| st(r).map(|s| s.state.clone());
    ]
}

/// The server CPU per delivery of the processes named `name` (W9: `redis-server`).
fn cpu_of(r: &Traffic, name: &str) -> Option<f64> {
    let of = r.server.processes.iter().filter(|p| p.name == name);
    of.map(|p| p.cpu_us_per_delivery).reduce(|a, b| a + b)
}

impl Figures for Traffic {
    fn rows(id: &str) -> Vec<Row<Traffic>> {
        fn slow(r: &Traffic) -> Option<&crate::results::Slow> {
            r.slow.as_ref()
        }
        fn redis(r: &Traffic) -> Option<f64> {
            cpu_of(r, "redis-server")
        }
        fn each(r: &Traffic) -> String {
            let p = r.server.processes.iter();
            let each = p.map(|p| format!("{} {}", p.name, fmt(p.cpu_us_per_delivery, 2)));
            each.collect::<Vec<_>>().join(" + ")
        }
        let mut rows = match id {
            "w1" => rows![Traffic;
                "deliveries/s" 0 Neither "ms" |r, _| r.deliveries_per_s;
                "latency p50 (ms)" 2 Lower "ms" |r, _| r.latency.p50_us / MS;
                "latency p99 (ms)" 2 Lower "ms" |r, _| r.latency.p99_us / MS;
                "latency max (ms)" 1 Lower "ms" |r, _| r.latency.max_us / MS;
                "server CPU per delivery (µs)" 3 Lower "mKs" |r, _| r.server.cpu_us_per_delivery;
                "server CPU (cores busy)" 2 Neither "ms" |r, _| r.server.cpu_util;
                "load generator CPU per delivery (µs)" 3 Neither "m" |r, _| r.client.cpu_us_per_delivery;
                "load generator CPU (cores busy)" 2 Neither "ms" |r, _| r.client.cpu_util;
                "messages sent" 0 Neither "ms" |r, _| r.sent;
                "lost deliveries" 0 Lower "ms" |r, _| r.lost;
                "out-of-order deliveries" 0 Lower "m" |r, _| r.order_errors;
                "clients closed by the server" 0 Lower "ms" |r, _| r.clients_closed_early;
                "server threads" 0 Lower "ms" |r, _| r.server.threads;
                "server RSS max (MiB)" 1 Lower "ms" |r, _| r.server.rss_kib_max as f64 / MIB;
                "other processes' CPU share (noise)" 2 Neither "ms" |_, run| run.noise.other_cpu_share;
            ],
            "w2" | "w9" => rows![Traffic;
                "messages sent/s" 0 Neither "ms" |r, _| r.sent_per_s;
                "deliveries/s" 0 Neither "ms" |r, _| r.deliveries_per_s;
                "latency p50 (ms)" 3 Lower "ms" |r, _| r.latency.p50_us / MS;
                "latency p90 (ms)" 3 Lower "ms" |r, _| r.latency.p90_us / MS;
                "latency p99 (ms)" 3 Lower "mKs" |r, _| r.latency.p99_us / MS;
                "latency max (ms)" 2 Lower "ms" |r, _| r.latency.max_us / MS;
                "lost deliveries" 0 Lower "ms" |r, _| r.lost;
                "server CPU per delivery (µs)" 2 Lower "mKs" |r, _| r.server.cpu_us_per_delivery;
                "… of it redis-server's (%)" 1 Neither "rK" |r, _| redis(r).map(|x| x * 100.0 / r.server.cpu_us_per_delivery);
                "… by process (µs)" 0 Neither "r" |r, _| each(r);
                "redis-server CPU per message (µs)" 2 Neither "r" |r, _| redis(r).map(|x| x * r.deliveries_per_s / r.sent_per_s);
                "server CPU (cores busy)" 3 Lower "ms" |r, _| r.server.cpu_util;
                "load generator CPU (cores busy)" 3 Neither "ms" |r, _| r.client.cpu_util;
                "server threads" 0 Lower "ms" |r, _| r.server.threads;
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
        if matches!(id, "w1" | "w2") && w.servers.contains_key("chatroom_before") {
            let _ = writeln!(s, "Before and after issue 10: {}\n", prose("threads"));
            thread_table(s, w, "chatroom_before", "chatroom");
        }
        if w.servers.contains_key("chatroom_store") {
            store_section(s, id, w);
        }
        if w.servers.contains_key("chatroom_redis") {
            let _ = writeln!(s, "{}\n", prose("cluster"));
            let heads = "one process | two processes + Redis | two ÷ one";
            pair_table(s, id, w, ["chatroom", "chatroom_redis", heads], "sr");
            let threads = prose("threads");
            let _ = writeln!(s, "\nOne process and two (three processes): {threads}\n");
            thread_table(s, w, "chatroom", "chatroom_redis");
        }
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
            "server threads with all clients" 0 Lower "m" |r, _| r.server_full.threads;
            "threads per client" 3 Lower "mK" |r, _| r.threads_per_client;
            "server fds with all clients" 0 Lower "m" |r, _| r.server_full.fds;
            "memory maps per client" 2 Lower "m" |r, _| r.maps_per_client;
            "server CPU to accept them (s)" 2 Lower "m" |r, _| r.server_cpu_s_connecting;
            "over-cap attempts" 0 Neither "m" |r, _| r.over_cap_attempted;
            "over-cap refused with 503" 0 Neither "m" |r, _| r.over_cap_refused_503;
            "/healthz status afterwards" 0 Neither "m" |r, _| r.healthz_status;
            "early client got a new message (1 = yes)" 0 Neither "m" |r, _| r.probe_received;
            "… within (ms)" 2 Lower "m" |r, _| r.probe_latency_ms;
            "clients dropped by the server" 0 Lower "m" |r, _| r.dropped_by_server;
            // Per idle client, at `memory_at` clients: its own table (`k`).
            "measured at (clients connected)" 0 Neither "k" |r, _| r.memory_at;
            "server RSS" 1 Lower "k" |r, _| r.rss_kib_per_client;
            "kernel stacks (`KernelStack`)" 1 Lower "k" |r, _| r.kernel_kib_per_client.kernel_stack;
            "page tables (`PageTables`)" 1 Lower "k" |r, _| r.kernel_kib_per_client.page_tables;
            "slab (`Slab`: sockets and other kernel objects, both ends)" 1 Lower "k" |r, _| r.kernel_kib_per_client.slab;
            "server total per idle client: RSS + kernel stacks + page tables" 1 Lower "kK" |r, _| total_per_client(r);
        ]
    }
    fn error_samples(&self) -> &[String] {
        &self.error_samples
    }
    fn extra(s: &mut String, id: &str, w: &Workload<Capacity>) {
        capacity_tables(s, id, w);
    }
}

/// W3's server total per idle client: RSS + KernelStack + PageTables, KiB.
pub fn total_per_client(c: &Capacity) -> f64 {
    c.rss_kib_per_client
        + c.kernel_kib_per_client.kernel_stack
        + c.kernel_kib_per_client.page_tables
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
            "server threads after" 0 Lower "m" |r, _| r.server_after.threads;
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
            "… judged on" 0 Neither "m" |r, _| r.judged_on.clone();
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
        let _ = writeln!(s, "Per round (median over repetitions): connection threads, fds and RSS (MiB) after it.\n");
        per_server_table(s, w, ("round", ["conn. threads", "fds", "RSS"]), |c, i| {
            let r = c.per_round.get(i)?;
            let rss = fmt(r.rss_kib as f64 / MIB, 1);
            Some([fmt(r.connection_threads, 0), fmt(r.fds, 0), rss])
        });
    }
}

impl Figures for Soak {
    fn rows(_: &str) -> Vec<Row<Soak>> {
        rows![Soak;
            "clients, all kinds" 0 Neither "mK" |r, _| r.clients;
            "normal clients that failed" 0 Lower "m" |r, _| r.normal_errors;
            "threads: first third → last third (mean)" 0 Neither "m" |r, _| format!("{} → {}", fmt(r.first_third.threads, 1), fmt(r.last_third.threads, 1));
            "fds: first third → last third (mean)" 0 Neither "m" |r, _| format!("{} → {}", fmt(r.first_third.fds, 1), fmt(r.last_third.fds, 1));
            "RSS: first third → last third (mean, MiB)" 0 Neither "mK" |r, _| format!("{} → {}", fmt(r.first_third.rss_kib / MIB, 2), fmt(r.last_third.rss_kib / MIB, 2));
            "baseline threads / fds → after the churn" 0 Neither "m" |r, _| format!("{} / {} → {} / {}", r.baseline.threads, r.baseline.fds, r.after.threads, r.after.fds);
            "/healthz status afterwards" 0 Neither "m" |r, _| r.healthz_status;
        ]
    }
    fn error_samples(&self) -> &[String] {
        &self.error_samples
    }
    fn extra(s: &mut String, _: &str, w: &Workload<Soak>) {
        let Some(c) = w.ok("chatroom") else { return };
        let kinds: Vec<String> = c.by_kind.iter().map(|(k, n)| format!("{k} {n}")).collect();
        let (kinds, warm) = (kinds.join(", "), fmt(c.warmup_s, 0));
        let (first, last) = (c.first_third.samples, c.last_third.samples);
        let _ = writeln!(s, "Clients by kind: {kinds}; warm-up {warm} s, {first} and {last} samples in the first and last thirds.\n");
    }
}

/// One run typed as workload `id`'s figures (output that does not parse as them makes the run an
/// error, with serde's reason), as JSON for [`crate::results::series`]; and its progress line:
/// its key figures, or its error.
pub fn typed(id: &str, raw: RawRun) -> (Value, String) {
    fn go<T: Figures>(id: &str, raw: RawRun) -> (Value, String) {
        let why = |e| format!("the load generator's figures do not parse: {e}");
        let result = raw.result.and_then(|v| T::deserialize(v).map_err(why));
        let disk = raw.disk_bytes.zip(result.as_ref().ok()).map(|(b, r)| Disk {
            total_bytes: b,
            bytes_per_message: crate::client::round(b as f64 / r.written().max(1) as f64, 1),
        });
        let run = Run {
            tag: raw.tag,
            noise: raw.noise,
            disk,
            result,
        };
        let key = |r: &Row<T>| r.has('K') || PAIRED.iter().any(|p| p.0 == id && p.3 == r.label);
        let shown = |r: &Row<T>| key(r) && r.value(&run) != V::Missing;
        let figure = |r: &Row<T>| format!("{} {}", r.label, r.cell(Some(&run)));
        let rows = T::rows(id);
        let keys: Vec<String> = rows.iter().filter(|r| shown(r)).map(figure).collect();
        let line = match &run.result {
            Ok(_) => keys.join(", "),
            Err(e) => format!("ERROR {e}"),
        };
        (serde_json::to_value(&run).expect("serializes"), line)
    }
    match id {
        "w3" => go::<Capacity>(id, raw),
        "w4" => go::<JoinStorm>(id, raw),
        "w6" => go::<Churn>(id, raw),
        "w8" => go::<Soak>(id, raw),
        _ => go::<Traffic>(id, raw),
    }
}

/// How a server is named in the tables.
pub fn label(server: &str) -> &str {
    match server {
        "chatroom_before" => "chatroom before (a74e0fd)",
        "chatroom_store" => "chatroom, store on",
        "chatroom_redis" => "chatroom, two processes on one Redis",
        "node" => "node (ws)",
        s => s,
    }
}

/// Appends one row of a markdown table: `| a | b | … |`.
fn tr(s: &mut String, cells: impl IntoIterator<Item = impl std::fmt::Display>) {
    s.push('|');
    for c in cells {
        let _ = write!(s, " {c} |");
    }
    s.push('\n');
}

/// The whole BENCHMARKS.md.
pub fn markdown(r: &Results, checks: &[Check], notes: Option<&str>) -> String {
    let (mut s, m, link) = (String::new(), &r.machine, &r.json_link);
    let (generated, reps, pins) = (&r.generated, r.reps, r.pinned.join(", ").to_uppercase());
    let more = match r.store_reps > r.reps {
        true => format!(" ({} for chatroom memory-only and store-on in W1 and W2, whose store checks are ratios of paired runs)", r.store_reps),
        false => String::new(),
    };
    let (make, flag, warn) = match r.quick {
        true => ("make bench-quick", " --quick", " **Quick run: smaller and shorter than the real workloads; use `make bench` for figures to quote.**"),
        false => ("make bench", "", ""),
    };
    let total = fmt(r.total_s, 0);
    let _ = writeln!(s, "# Benchmarks\n\nGenerated by `{make}` (`bench/run.sh{flag}`) on {generated}: {reps} repetition(s) of each workload{more}, medians shown; {total} s in all. Every run's figures: [`{link}`]({link}).{warn}\n");
    let note = prose("paired-note");
    let _ = writeln!(
        s,
        "## Targets (chatroom)\n\n{note}\n\n| workload | target | measured | |\n|---|---|---|---|"
    );
    for c in checks {
        let (w, t, v, m) = (c.workload, &c.target, &c.value, c.verdict.markdown());
        let _ = writeln!(s, "| {w} | {t} | {v} | {m} |");
    }
    let q = |x: &Option<String>| x.clone().unwrap_or("?".into());
    let (cores, gib, cpu) = (fmt(m.nproc, 0), fmt(m.mem_gib, 1), q(&m.cpu_model));
    let (kernel, nofile, maps) = (q(&m.kernel), q(&m.rlimit_nofile), q(&m.vm_max_map_count));
    let (pids, rustc, node) = (q(&m.pid_max), q(&m.rustc), q(&m.node));
    let (ws, rev) = (q(&m.ws_package), rev(m));
    let version = |v: &String| format!("; redis-server {v}");
    let redis = m.redis.as_ref().map_or(String::new(), version);
    let _ = writeln!(s, "\n## Machine\n\n- {cores} cores ({cpu}), {gib} GiB, Linux {kernel}; RLIMIT_NOFILE {nofile}, vm.max_map_count {maps}, pid_max {pids}\n- {rustc}; Node {node} with ws {ws}{redis}\n- chatroom at git {rev}");
    for (name, command) in &r.servers {
        let _ = writeln!(s, "- `{name}`: `{command}`");
    }
    let pinned = match r.pinned.is_empty() {
        true => prose("not-pinned").to_string(),
        false => format!("**Pinned in {pins}:** {}", prose("pinned")),
    };
    let root = &r.store_data_root;
    let method = prose("method");
    let _ = writeln!(s, "\n## Method\n\n- {pinned}\n- The store-on runs' DIR is a fresh directory under `{root}`.\n{method}\n");
    // Each workload's section, in order; the noise table lists their runs.
    let (w, mut noise, at) = (&r.workloads, String::new(), stamp(generated, m));
    section(&mut s, &mut noise, &at, "w1", &w.w1);
    section(&mut s, &mut noise, &at, "w2", &w.w2);
    section(&mut s, &mut noise, &at, "w3", &w.w3);
    section(&mut s, &mut noise, &at, "w4", &w.w4);
    section(&mut s, &mut noise, &at, "w5", &w.w5);
    section(&mut s, &mut noise, &at, "w6", &w.w6);
    section(&mut s, &mut noise, &at, "w7", &w.w7);
    section(&mut s, &mut noise, &at, "w8", &w.w8);
    section(&mut s, &mut noise, &at, "w9", &w.w9);
    let note = prose("noise");
    let _ = writeln!(s, "## Noise\n\n{note}\n\n| run | load avg before | other processes' CPU share | wall (s) |\n|---|---:|---:|---:|");
    s += &noise;
    if let Some(n) = notes {
        let _ = writeln!(s, "\n{}", n.trim_end());
    }
    s
}

/// The commit chatroom was built at, and whether src/ had changes then.
fn rev(m: &Machine) -> String {
    let dirty = match m.git_dirty {
        Some(true) => " (with uncommitted changes in src/)",
        _ => "",
    };
    format!("{}{dirty}", m.git_rev.as_deref().unwrap_or("?"))
}

/// When and at which commit a run was made: each workload's `measured`.
pub fn stamp(generated: &str, m: &Machine) -> String {
    format!("on {generated} at git {}", rev(m))
}

/// A workload's section (nothing if it did not run), saying when it was measured if that was
/// not at `at` (the file's [`stamp`]); each of its runs' noise goes to `noise`, as rows of the
/// noise table.
fn section<T: Figures>(
    s: &mut String,
    noise: &mut String,
    at: &str,
    id: &str,
    w: &Option<Workload<T>>,
) {
    let Some(w) = w else { return };
    let (big, title, cmd) = (id.to_uppercase(), &w.title, &w.command);
    let _ = writeln!(s, "## {big} — {title}\n\n`chatroom-bench {cmd}`");
    if let Some(m) = w.measured.as_ref().filter(|m| *m != at) {
        let own = "in a run of its own (see the notes)";
        let _ = writeln!(s, "\n*Measured {m}, {own}.*");
    }
    let (l, f) = (&w.load_flags, &w.server_flags);
    for (what, flags) in [("load generator", l), ("server", f)] {
        for (server, f) in flags.iter().filter(|(_, f)| !f.is_empty()) {
            let _ = writeln!(s, "- {what} flags for {}: `{f}`", label(server));
        }
    }
    s.push('\n');
    // A workload without the Node peer (W7) has only its store-on table; the soak (W8) runs
    // chatroom alone.
    if w.servers.contains_key("node") || id == "w8" {
        table(s, id, w, 'm');
    }
    let (mut done, mut errors) = (Vec::new(), String::new());
    for (name, sr) in &w.servers {
        let ok = sr.runs.iter().filter(|r| r.ok().is_some()).count();
        done.push(format!("{name} {ok}"));
        for run in &sr.runs {
            let (tag, n) = (&run.tag, &run.noise);
            let sample = run.ok().and_then(|r| r.error_samples().first());
            let sample = sample.map(|e| e.replace('`', "'"));
            errors += &match (&run.result, sample) {
                (Err(e), _) => format!("- {name} run {tag}: error {e}\n"),
                (_, Some(e)) => format!("- {name} {tag}: client errors, e.g. `{e}`\n"),
                _ => String::new(),
            };
            let cells = [n.loadavg_1m_before, n.other_cpu_share, n.wall_s].map(|x| fmt(x, 2));
            tr(noise, [tag.clone()].into_iter().chain(cells));
        }
    }
    let _ = writeln!(s, "Runs that completed: {}.\n{errors}", done.join(", "));
    T::extra(s, id, w);
}

/// The servers of a comparison table, in column order: chatroom, the build before issue 10,
/// the Node peer (the store-on variant has its own section).
fn columns<T>(w: &Workload<T>) -> Vec<&'static str> {
    let cols = ["chatroom", "chatroom_before", "node"].into_iter();
    cols.filter(|n| w.servers.contains_key(*n)).collect()
}

/// The rows with `flag`, one column per server, then how far chatroom is ahead of each other:
/// o ÷ c for lower-is-better figures, c ÷ o for higher-is-better ones (above 1×: ahead).
fn table<T: Figures>(s: &mut String, id: &str, w: &Workload<T>, flag: char) {
    let cols = columns(w);
    let ahead_of = |o: &&str| format!("chatroom ahead of {}", label(o));
    let mut head = vec!["metric".to_string()];
    head.extend(cols.iter().map(|c| label(c).to_string()));
    head.extend(cols[1..].iter().map(ahead_of));
    tr(s, head);
    let _ = writeln!(s, "|---|{}", "---:|".repeat(2 * cols.len() - 1));
    for row in T::rows(id).iter().filter(|r| r.has(flag)) {
        let value = |c: &&str| w.median(c).map_or(V::Missing, |r| row.value(r));
        let v: Vec<V> = cols.iter().map(value).collect();
        let ahead = |o: &V| match (row.better, v[0].clone(), o.clone()) {
            (Lower, V::N(c), V::N(o)) if c > 0.0 && o > 0.0 => format!("{}×", fmt(o / c, 2)),
            (Higher, V::N(c), V::N(o)) if c > 0.0 && o > 0.0 => format!("{}×", fmt(c / o, 2)),
            _ => String::new(),
        };
        let cells = v.iter().map(|x| fmt(x.clone(), row.decimals));
        let title = [row.title(row.has('K'))].into_iter();
        tr(s, title.chain(cells).chain(v.iter().skip(1).map(ahead)));
    }
    s.push('\n');
}

/// A table of `N` columns per server (chatroom, before, node) over the rows `i` = 0, 1, …
/// that any server has, from each server's medians.
fn per_server_table<T, const N: usize>(
    s: &mut String,
    w: &Workload<T>,
    (first, names): (&str, [&str; N]),
    cells: impl Fn(&T, usize) -> Option<[String; N]>,
) {
    let cols = columns(w);
    let named = |c: &&str| names.map(|n| format!("{}: {n}", label(c)));
    let head = cols.iter().flat_map(named);
    tr(s, [first.to_string()].into_iter().chain(head));
    let _ = writeln!(s, "|---:|{}", "---:|".repeat(N * cols.len()));
    for i in 0.. {
        let row: Vec<Option<[String; N]>> = cols.iter().map(|c| cells(w.ok(c)?, i)).collect();
        if row.iter().all(Option::is_none) {
            break;
        }
        let blank = || std::array::from_fn(|_| "–".to_string());
        let row = row.into_iter().flat_map(|c| c.unwrap_or_else(blank));
        tr(s, [(i + 1).to_string()].into_iter().chain(row));
    }
    s.push('\n');
}

/// W3's tables after the main one: memory per client, growth by checkpoint, smaps.
fn capacity_tables(s: &mut String, id: &str, w: &Workload<Capacity>) {
    let _ = writeln!(s, "Memory per idle client (KiB) at the same number of clients for every server: the process's RSS, and the host's kernel memory (`/proc/meminfo` before and after connecting, divided by the clients):\n");
    table(s, id, w, 'k');
    let _ = writeln!(s, "The kernel figures are host-wide: they include the load generator's side of every connection (its socket in `Slab`), which is the same for every server, so the difference between the columns is the servers'.\n\nServer growth while connecting, at each checkpoint: clients, RSS (MiB), threads.\n");
    let head = ("checkpoint", ["clients", "RSS", "threads"]);
    per_server_table(s, w, head, |c, i| {
        let p = c.checkpoints.get(i)?;
        let rss = fmt(p.rss_kib as f64 / MIB, 1);
        Some([fmt(p.clients, 0), rss, fmt(p.threads, 0)])
    });
    let Some((c, sm)) = w.ok("chatroom").and_then(|c| Some((c, c.smaps.as_ref()?))) else {
        return;
    };
    let note = prose("smaps");
    let _ = writeln!(s, "### Where chatroom's per-client memory goes (measured)\n\n{note}\n\n| mapping (perms, size) | count before → after | RSS per client (KiB) |\n|---|---:|---:|");
    for g in &sm.anon_groups {
        let (perms, size, before, after) = (&g.perms, g.size_kib, g.count_before, g.count_after);
        let rss = fmt(g.rss_kib_per_client, 2);
        let _ = writeln!(s, "| `{perms}` {size} KiB | {before} → {after} | {rss} |");
    }
    let f = |x: f64| fmt(x, 2);
    let maps = f(sm.per_client_mappings_rss_kib_per_client);
    let anon = f(sm.other_anon_rss_kib_per_client);
    let heap = f(sm.brk_heap_rss_kib_per_client);
    let named = f(sm.named_rss_kib_per_client);
    let (rss, count) = (f(c.rss_kib_per_client), f(c.maps_per_client));
    let _ = writeln!(s, "\nPer client: **{maps} KiB in mappings that come one or more per client** (thread stacks; signal stacks and guard pages are mapped but not resident), **{anon} KiB in the other anonymous mappings** (malloc's per-thread arenas), {heap} KiB in the `[heap]` (main arena), {named} KiB in all named mappings (binary, libraries, `[heap]`). Total RSS per client: {rss} KiB; memory maps per client: {count}.\n");
}

/// Per repetition, `other` ÷ `base` for one row (runs pair up by index: one of each per
/// repetition, errors included); absent where either is absent or not above 0.
pub fn paired<T>(w: &Workload<T>, base: &str, other: &str, row: &Row<T>) -> Vec<Option<f64>> {
    let ratio = |(x, y): (&Run<T>, &Run<T>)| match (row.value(x), row.value(y)) {
        (V::N(x), V::N(y)) if x > 0.0 && y > 0.0 => Some(y / x),
        _ => None,
    };
    w.runs(base).iter().zip(w.runs(other)).map(ratio).collect()
}

/// The median of the ratios that exist.
pub fn median_of(v: &[Option<f64>]) -> Option<f64> {
    crate::results::median(&mut v.iter().flatten().copied().collect::<Vec<_>>())
}

/// The rows with one of `flags`, server `b` against `a` (their medians, and `b` ÷ `a` within
/// each repetition: the median and each one, and the verdict of a [`PAIRED`] check on the
/// row), under `heads` (`a | b | ratio`).
fn pair_table(s: &mut String, id: &str, w: &Workload<Traffic>, cols: [&str; 3], flags: &str) {
    let [a, b, heads] = cols;
    let head = format!("| metric | {heads} | per repetition | |");
    let _ = writeln!(s, "{head}\n|---|---:|---:|---:|---|---|");
    let (ma, mb) = (w.median(a), w.median(b));
    let has = |r: &&Row<Traffic>| r.flags.chars().any(|f| flags.contains(f));
    for row in Traffic::rows(id).iter().filter(has) {
        let per = paired(w, a, b, row);
        let pair = (id, a, b, row.label);
        let check = PAIRED.iter().find(|p| (p.0, p.1, p.2, p.3) == pair);
        let verdict = match (check, median_of(&per)) {
            (Some(p), Some(x)) => {
                let mark = if x >= p.4 && x <= p.5 { "✅" } else { "❌" };
                format!("{mark} {}", bound(p.4, p.5))
            }
            (Some(_), None) => "n/a".into(),
            _ => String::new(),
        };
        let ratio = median_of(&per).map_or(String::new(), |x| format!("{}×", fmt(x, 3)));
        let per: Vec<String> = per.into_iter().map(|x| fmt(x, 3)).collect();
        let (title, a, b) = (row.title(check.is_some()), row.cell(ma), row.cell(mb));
        tr(s, [title, a, b, ratio, per.join(", "), verdict]);
    }
}

/// The "store on" part of a workload's section.
fn store_section(s: &mut String, id: &str, w: &Workload<Traffic>) {
    let st = w.median("chatroom_store");
    let _ = writeln!(s, "### With the store on\n\n{}\n", prose("store-on"));
    let heads = "memory only | store on | store ÷ memory";
    pair_table(s, id, w, ["chatroom", "chatroom_store", heads], "s");
    let rows = Traffic::rows(id);
    let _ = writeln!(s, "\nThe store's own figures (store-on runs, medians):\n\n| metric | store on | per run |\n|---|---:|---|");
    for row in rows.iter().filter(|r| r.has('c')) {
        let runs = w.runs("chatroom_store").iter();
        let per: Vec<String> = runs.map(|r| row.cell(Some(r))).collect();
        // A text figure (the store's state) has no per-run column.
        let text = st.is_some_and(|st| matches!(row.value(st), V::S(_)));
        let per = if text { String::new() } else { per.join(", ") };
        let (title, store) = (row.title(row.has('K')), row.cell(st));
        let _ = writeln!(s, "| {title} | {store} | {per} |");
    }
    let _ = writeln!(s, "\nMemory-only and store on: {}\n", prose("threads"));
    thread_table(s, w, "chatroom", "chatroom_store");
}

/// Server CPU per delivery by kind of thread, `a` against `b`: where the CPU goes.
fn thread_table(s: &mut String, w: &Workload<Traffic>, a: &str, b: &str) {
    type Kinds = BTreeMap<String, KindCpu>;
    let none = Kinds::new();
    let by_kind = |n: &str| w.ok(n).map_or(&none, |t| &t.server.cpu_by_thread_kind);
    let (a_k, b_k) = (by_kind(a), by_kind(b));
    let kinds: BTreeSet<&String> = a_k.keys().chain(b_k.keys()).collect();
    let (a, b) = (label(a), label(b));
    let head = format!("| thread | µs, {a} | µs, {b} | difference | slices, {a} | slices, {b} |");
    let _ = writeln!(s, "{head}\n|---|---:|---:|---:|---:|---:|");
    let (mut ta, mut tb) = (0.0, 0.0);
    for k in kinds {
        // schedstat's run time where the kernel keeps it, else utime + stime.
        let us = |v: &KindCpu| v.run_us_per_delivery.unwrap_or(v.cpu_us_per_delivery);
        let slices = |m: &Kinds| fmt(m.get(k).and_then(|v| v.slices_per_1000_deliveries), 1);
        let (x, y) = (a_k.get(k).map(us), b_k.get(k).map(us));
        let (x0, y0) = (x.unwrap_or(0.0), y.unwrap_or(0.0));
        if x0 < 0.0005 && y0 < 0.0005 {
            continue;
        }
        (ta, tb) = (ta + x0, tb + y0);
        let (x, y, d, sa, sb) = (fmt(x, 4), fmt(y, 4), y0 - x0, slices(a_k), slices(b_k));
        let _ = writeln!(s, "| `{k}` | {x} | {y} | {d:+.4} | {sa} | {sb} |");
    }
    let (x, y, d) = (fmt(ta, 4), fmt(tb, 4), tb - ta);
    let _ = writeln!(s, "| all of the above | {x} | {y} | {d:+.4} | | |\n");
}

/// A piece of BENCHMARKS.md's fixed prose, from `bench/report-text.md`: the text after the line
/// `<!-- name -->`, up to the next marker.
fn prose(name: &str) -> &'static str {
    const TEXT: &str = include_str!("../report-text.md");
    let marker = format!("<!-- {name} -->\n");
    let missing = || panic!("bench/report-text.md has no {marker}");
    let (_, rest) = TEXT.split_once(&marker).unwrap_or_else(missing);
    rest.split("\n<!-- ").next().unwrap_or(rest).trim_end()
}
