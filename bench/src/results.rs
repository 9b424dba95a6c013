//! The typed results: what every workload prints (one serde struct per workload), how the suite
//! files them (`bench/results.json`: per workload and server, every run and the medians), and
//! the median of several runs. Every struct denies unknown fields, so a renamed or missing field
//! is an error when the file is read, never a silent "n/a".

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// A results struct: serde both ways, unknown fields refused.
macro_rules! record {
    ($(#[$m:meta])* pub struct $name:ident $(<$t:ident>)? { $($(#[$fm:meta])* pub $f:ident: $ty:ty,)* }) => {
        $(#[$m])*
        #[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
        #[serde(deny_unknown_fields)]
        pub struct $name $(<$t>)? { $($(#[$fm])* pub $f: $ty,)* }
    };
}

record! {
    /// Latency percentiles in microseconds (all 0 when nothing was measured).
    #[derive(Default)]
    pub struct Latency { pub count: u64, pub p50_us: f64, pub p90_us: f64, pub p99_us: f64, pub max_us: f64, }
}

record! {
    /// One look at a process (`/proc/PID/status`, `fd`, `maps`).
    #[derive(Default, Copy)]
    pub struct Sample { pub rss_kib: u64, pub threads: u64, pub fds: u64, pub maps: u64, }
}

record! {
    /// The host's kernel memory that grows with connections and threads (`/proc/meminfo`), KiB
    /// or KiB per client: kernel stacks (16 KiB a thread), page tables, slab (sockets of both ends).
    #[derive(Default, Copy)]
    pub struct Meminfo { pub kernel_stack: f64, pub page_tables: f64, pub slab: f64, }
}

record! {
    /// W1, W2, W5 and W7: rooms of clients, every message checked at every receiver.
    pub struct Traffic {
        pub sent: u64,
        pub sent_per_s: f64,
        pub deliveries_per_s: f64,
        pub lost: u64,
        pub order_errors: u64,
        pub clients_closed_early: u64,
        pub error_samples: Vec<String>,
        pub latency: Latency,
        pub server: TrafficServer,
        /// The load generator's own CPU.
        pub client: ClientCpu,
        /// The history store's figures; only a server that writes history has them.
        pub store: Option<Store>,
        /// W5's stalled reader; only W5 has one.
        pub slow: Option<Slow>,
    }
}

record! {
    pub struct TrafficServer {
        pub cpu_us_per_delivery: f64,
        pub cpu_util: f64,
        pub threads: u64,
        pub rss_kib_max: u64,
        /// Per kind of thread (`ws-reader-17` → `ws-reader`), over the sending time.
        pub cpu_by_thread_kind: BTreeMap<String, KindCpu>,
    }
}

record! {
    pub struct KindCpu {
        pub cpu_us_per_delivery: f64,
        /// From `schedstat`, absent when the kernel does not keep it.
        pub run_us_per_delivery: Option<f64>,
        pub slices_per_1000_deliveries: Option<f64>,
    }
}

record! {
    pub struct ClientCpu { pub cpu_us_per_delivery: f64, pub cpu_util: f64, }
}

record! {
    /// The store's counters over the run, and its thread's CPU: from the start of sending until
    /// `unwritten` is back to 0, per message written and as a share of the server's CPU.
    pub struct Store {
        pub state: String,
        pub dropped: u64,
        pub sent_by_load_generator: u64,
        pub written_in_window: u64,
        pub accepted_per_s: f64,
        pub written_per_s: f64,
        pub unwritten_at_stop: u64,
        pub drained: bool,
        /// When `unwritten` was back to 0; absent if it never was within 10 s.
        pub drained_after_stop_s: Option<f64>,
        pub cpu_us_per_message: f64,
        /// From `schedstat`'s nanoseconds, absent when the kernel does not keep them.
        pub run_us_per_message: Option<f64>,
        pub share_of_server_cpu: f64,
    }
}

record! {
    #[derive(Default)]
    pub struct Slow {
        pub left_seen: bool,
        pub left_seen_after_s: Option<f64>,
        pub closed_by_server: bool,
        /// Absent when the connection ended without a close frame.
        pub close_code: Option<u16>,
        pub latency_other_rooms: Latency,
        pub latency_slow_room: Latency,
        pub rss_kib_growth_max: u64,
    }
}

record! {
    /// W3: idle clients up to the cap, then past it. The per-client figures are taken at
    /// `memory_at` clients (the same N for every server), the rest with every client connected.
    pub struct Capacity {
        pub clients_target: u64,
        pub connected: u64,
        pub error_samples: Vec<String>,
        pub connect_s: f64,
        pub connects_per_s: f64,
        pub connect_latency: Latency,
        pub server_before: Sample,
        pub memory_at: u64,
        pub server_at_memory: Sample,
        pub server_full: Sample,
        pub rss_kib_per_client: f64,
        pub threads_per_client: f64,
        pub maps_per_client: f64,
        /// The host's kernel memory per client (`/proc/meminfo` deltas).
        pub kernel_kib_per_client: Meminfo,
        pub server_cpu_s_connecting: f64,
        pub over_cap_attempted: u64,
        pub over_cap_refused_503: u64,
        /// Absent when `/healthz` did not answer.
        pub healthz_status: Option<u16>,
        pub probe_received: bool,
        pub probe_latency_ms: Option<f64>,
        pub dropped_by_server: u64,
        /// The server after every `--checkpoint` clients.
        pub checkpoints: Vec<Checkpoint>,
        /// Only with `--smaps`.
        pub smaps: Option<SmapsDiff>,
    }
}

record! {
    pub struct Checkpoint { pub clients: u64, pub rss_kib: u64, pub threads: u64, pub fds: u64, }
}

record! {
    /// Where the per-client memory went, from /proc/PID/smaps before and after.
    pub struct SmapsDiff {
        pub anon_groups: Vec<SmapsGroup>,
        pub per_client_mappings_rss_kib_per_client: f64,
        pub other_anon_rss_kib_per_client: f64,
        pub brk_heap_rss_kib_per_client: f64,
        pub named_rss_kib_per_client: f64,
    }
}

record! {
    pub struct SmapsGroup {
        pub perms: String,
        pub size_kib: u64,
        pub count_before: u64,
        pub count_after: u64,
        pub rss_kib_per_client: f64,
    }
}

record! {
    /// W4: everyone joins one room at once.
    pub struct JoinStorm {
        pub clients: u64,
        pub welcomed: u64,
        pub error_samples: Vec<String>,
        pub all_welcomed_s: f64,
        pub welcome_latency: Latency,
        pub joined_frames: u64,
        pub joined_frames_expected: u64,
        pub all_joined_seen_s: f64,
        pub server_cpu_s: f64,
        pub server_after: Sample,
    }
}

record! {
    /// W6: rounds of clients that come and go.
    pub struct Churn {
        pub all_back_to_baseline: bool,
        pub judged_on: String,
        pub errors: u64,
        pub error_samples: Vec<String>,
        pub baseline: Sample,
        pub connect_latency: Latency,
        pub rss_kib_by_round: Vec<u64>,
        pub rss_growth_kib_round2_to_last: i64,
        pub rss_slope_kib_per_round: f64,
        pub rss_slope_from_round: u64,
        pub server_cpu_s: f64,
        pub wall_s: f64,
        pub per_round: Vec<Round>,
    }
}

record! {
    pub struct Round {
        pub round: u64,
        pub peak_threads: u64,
        pub connection_threads: u64,
        pub threads: u64,
        pub fds: u64,
        pub rss_kib: u64,
        pub settle_ms: f64,
    }
}

record! {
    /// W8: bad clients churning for minutes; the server's threads, fds and RSS over time.
    pub struct Soak {
        pub duration_s: f64,
        pub workers: u64,
        pub clients: u64,
        pub by_kind: BTreeMap<String, u64>,
        /// Normal clients (join, say, echo, close) that failed.
        pub normal_errors: u64,
        pub error_samples: Vec<String>,
        pub baseline: Sample,
        pub warmup_s: f64,
        /// The mean RSS of each tenth of the run, warm-up included.
        pub rss_kib_by_tenth: Vec<u64>,
        pub first_third: Flat,
        pub last_third: Flat,
        /// Connection threads (`ws-reader-N`, `ws-writer-N`) gone and fds back to the baseline.
        pub back_to_baseline: bool,
        pub after: Sample,
        pub connection_threads_after: u64,
        pub settle_s: f64,
        pub healthz_status: Option<u16>,
    }
}

record! {
    /// Means of the samples in one stretch of the soak.
    pub struct Flat { pub samples: u64, pub threads: f64, pub fds: f64, pub rss_kib: f64, }
}

record! {
    /// What the suite measures around one run, the noise: other processes' CPU share and the
    /// load average before it (absent when /proc could not say), and its wall time.
    #[derive(Default)]
    pub struct Noise { pub loadavg_1m_before: Option<f64>, pub other_cpu_share: Option<f64>, pub wall_s: Option<f64>, }
}

record! {
    /// A store-on run's database after a clean stop.
    pub struct Disk { pub total_bytes: u64, pub bytes_per_message: f64, }
}

record! {
    /// One run (or, with tag `median`, the medians of a server's completed runs).
    pub struct Run<T> {
        pub tag: String,
        pub noise: Noise,
        /// Store-on runs only.
        pub disk: Option<Disk>,
        /// The workload's figures, or why there are none.
        pub result: Result<T, String>,
    }
}

impl<T> Run<T> {
    pub fn ok(&self) -> Option<&T> {
        self.result.as_ref().ok()
    }
}

record! {
    /// One server's runs of one workload.
    pub struct Series<T> {
        /// Absent when no run completed.
        pub median: Option<Run<T>>,
        pub runs: Vec<Run<T>>,
    }
}

impl<T: Serialize + DeserializeOwned> Series<T> {
    /// Files the runs with their median.
    pub fn new(runs: Vec<Run<T>>) -> Result<Series<T>, String> {
        let ok: Vec<Value> = runs
            .iter()
            .filter(|r| r.ok().is_some())
            .map(to_value)
            .collect();
        let median = match ok.is_empty() {
            true => None,
            false => {
                let mut m = merge(&ok);
                m["tag"] = json!("median");
                Some(serde_json::from_value(m).map_err(|e| format!("median: {e}"))?)
            }
        };
        Ok(Series { median, runs })
    }
}

fn to_value<S: Serialize>(s: &S) -> Value {
    serde_json::to_value(s).expect("results serialize")
}

record! {
    /// One workload: how it was run (the load generator's flags, and each server's own extra
    /// load-generator and server flags), and each server's runs.
    pub struct Workload<T> {
        pub title: String,
        pub command: String,
        pub load_flags: BTreeMap<String, String>,
        pub server_flags: BTreeMap<String, String>,
        pub servers: BTreeMap<String, Series<T>>,
    }
}

impl<T> Workload<T> {
    /// A server's runs (none if it did not run).
    pub fn runs(&self, server: &str) -> &[Run<T>] {
        self.servers.get(server).map_or(&[], |s| &s.runs)
    }

    /// A server's medians, if it completed a run.
    pub fn median(&self, server: &str) -> Option<&Run<T>> {
        self.servers.get(server)?.median.as_ref()
    }

    /// A server's median figures.
    pub fn ok(&self, server: &str) -> Option<&T> {
        self.median(server)?.ok()
    }
}

record! {
    /// Every workload (absent: not run, e.g. `--only`).
    #[derive(Default)]
    pub struct Workloads {
        pub w1: Option<Workload<Traffic>>,
        pub w2: Option<Workload<Traffic>>,
        pub w3: Option<Workload<Capacity>>,
        pub w4: Option<Workload<JoinStorm>>,
        pub w5: Option<Workload<Traffic>>,
        pub w6: Option<Workload<Churn>>,
        pub w7: Option<Workload<Traffic>>,
        pub w8: Option<Workload<Soak>>,
    }
}

record! {
    /// `bench/results.json`.
    pub struct Results {
        pub schema: String,
        pub generated: String,
        pub quick: bool,
        pub reps: u64,
        pub store_reps: u64,
        pub total_s: f64,
        pub json_link: String,
        pub pinned: Vec<String>,
        pub machine: Machine,
        /// Each server's command line.
        pub servers: BTreeMap<String, String>,
        pub store_data_root: String,
        pub workloads: Workloads,
    }
}

record! {
    /// The machine and the versions, each absent when this host could not say.
    pub struct Machine {
        pub nproc: Option<usize>,
        pub cpu_model: Option<String>,
        pub mem_gib: Option<f64>,
        pub kernel: Option<String>,
        pub rlimit_nofile: Option<String>,
        pub vm_max_map_count: Option<String>,
        pub pid_max: Option<String>,
        pub rustc: Option<String>,
        pub node: Option<String>,
        pub ws_package: Option<String>,
        pub git_rev: Option<String>,
        pub git_dirty: Option<bool>,
    }
}

pub const SCHEMA: &str = "chatroom-bench/3";

impl Results {
    /// Parses `bench/results.json`; any missing, renamed or unknown field is an error.
    pub fn parse(text: &str) -> Result<Results, String> {
        let r: Results = serde_json::from_str(text).map_err(|e| e.to_string())?;
        match r.schema == SCHEMA {
            true => Ok(r),
            false => Err(format!("schema {:?}, expected {SCHEMA:?}", r.schema)),
        }
    }

    /// The JSON as committed: nested objects one level per line down to a run, each run (and
    /// each median) on one line, so a run is one line of a diff.
    pub fn to_json(&self) -> String {
        let mut s = String::new();
        write_json(&to_value(self), 0, &mut s);
        s + "\n"
    }
}

fn write_json(v: &Value, depth: usize, out: &mut String) {
    let pad = "  ".repeat(depth);
    let items: Vec<(Option<&String>, &Value)> = match v {
        Value::Object(m) if depth < 5 => m.iter().map(|(k, x)| (Some(k), x)).collect(),
        Value::Array(a) if depth < 6 => a.iter().map(|x| (None, x)).collect(),
        _ => return out.push_str(&v.to_string()),
    };
    if items.is_empty() {
        return out.push_str(&v.to_string());
    }
    let (open, close) = if v.is_object() {
        ('{', '}')
    } else {
        ('[', ']')
    };
    out.push(open);
    for (i, (k, x)) in items.iter().enumerate() {
        out.push_str(if i == 0 { "\n" } else { ",\n" });
        out.push_str(&format!("{pad}  "));
        if let Some(k) = k {
            out.push_str(&format!("{}: ", json!(k)));
        }
        write_json(x, depth + 1, out);
    }
    out.push_str(&format!("\n{pad}{close}"));
}

/// Median of a slice (average of the two middle values for even lengths).
pub fn median(v: &mut [f64]) -> Option<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// Element-wise median of the runs: numbers → median (whole numbers stay whole), bools → all
/// true, nulls skipped, anything else → the first run's.
pub fn merge(runs: &[Value]) -> Value {
    let Some(first) = runs.first() else {
        return Value::Null;
    };
    match first {
        Value::Number(_) => {
            let mut xs: Vec<f64> = runs.iter().filter_map(Value::as_f64).collect();
            match median(&mut xs) {
                Some(m) if runs.iter().all(Value::is_u64) => json!(m.round() as u64),
                Some(m) if runs.iter().all(Value::is_i64) => json!(m.round() as i64),
                Some(m) => json!(crate::client::round(m, 4)),
                None => Value::Null,
            }
        }
        Value::Bool(_) => json!(runs.iter().all(|r| r.as_bool() == Some(true))),
        Value::Object(map) => {
            let field = |k: &String| {
                let vals = runs
                    .iter()
                    .filter_map(|r| r.get(k))
                    .filter(|v| !v.is_null());
                (k.clone(), merge(&vals.cloned().collect::<Vec<_>>()))
            };
            Value::Object(map.keys().map(field).collect::<Map<_, _>>())
        }
        Value::Array(a)
            if runs
                .iter()
                .all(|r| r.as_array().map(Vec::len) == Some(a.len())) =>
        {
            let column = |i: usize| runs.iter().map(|r| r[i].clone()).collect::<Vec<_>>();
            Value::Array((0..a.len()).map(|i| merge(&column(i))).collect())
        }
        _ => first.clone(),
    }
}
