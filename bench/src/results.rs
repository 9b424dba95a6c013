//! The typed results: what every workload prints (one serde struct per workload), how the suite
//! files them (`bench/results.json`: per workload and server, every run and the medians), and
//! the median of several runs. Every struct denies unknown fields, so a renamed or missing field
//! is an error when the file is read, never a silent "n/a".

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// Results structs: serde both ways, unknown fields refused.
macro_rules! records {
    ($($(#[$m:meta])* pub struct $name:ident $(<$t:ident>)? { $($(#[$fm:meta])* pub $f:ident: $ty:ty,)* })*) => {$(
        $(#[$m])*
        #[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
        #[serde(deny_unknown_fields)]
        pub struct $name $(<$t>)? { $($(#[$fm])* pub $f: $ty,)* }
    )*};
}

records! {
    /// Latency percentiles in microseconds (all 0 when nothing was measured).
    #[derive(Default)]
    pub struct Latency { pub count: u64, pub p50_us: f64, pub p90_us: f64, pub p99_us: f64, pub max_us: f64, }

    /// One look at a process (`/proc/PID/status`, `fd`, `maps`).
    #[derive(Default, Copy)]
    pub struct Sample { pub rss_kib: u64, pub threads: u64, pub fds: u64, pub maps: u64, }

    /// The host's kernel memory that grows with connections and threads (`/proc/meminfo`), KiB
    /// or KiB per client: kernel stacks (16 KiB a thread), page tables, slab (sockets of both ends).
    #[derive(Default, Copy)]
    pub struct Meminfo { pub kernel_stack: f64, pub page_tables: f64, pub slab: f64, }

    /// W1, W2, W5 and W7: rooms of clients, every message checked at every receiver. `client`
    /// is the load generator's own CPU; only a server that writes history has `store`, and
    /// only W5 (its stalled reader) has `slow`.
    pub struct Traffic {
        pub sent: u64, pub sent_per_s: f64, pub deliveries_per_s: f64,
        pub lost: u64, pub order_errors: u64, pub clients_closed_early: u64,
        pub error_samples: Vec<String>, pub latency: Latency,
        pub server: TrafficServer, pub client: ClientCpu,
        pub store: Option<Store>, pub slow: Option<Slow>,
    }

    /// The server side: every process of `--pid` together (several servers and their Redis:
    /// CPU and memory summed), and `processes`, each one's CPU (absent from runs before issue
    /// 12). `cpu_by_thread_kind`: per kind of thread (`ws-reader-17` → `ws-reader`), over the
    /// sending time.
    pub struct TrafficServer {
        pub cpu_us_per_delivery: f64, pub cpu_util: f64, pub threads: u64, pub rss_kib_max: u64,
        pub cpu_by_thread_kind: BTreeMap<String, KindCpu>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub processes: Vec<ProcessCpu>,
    }

    /// One process of the server side, by name (`chatroom`, `redis-server`).
    pub struct ProcessCpu { pub name: String, pub cpu_us_per_delivery: f64, }

    /// The `schedstat` figures are absent when the kernel does not keep it.
    pub struct KindCpu {
        pub cpu_us_per_delivery: f64,
        pub run_us_per_delivery: Option<f64>, pub slices_per_1000_deliveries: Option<f64>,
    }

    pub struct ClientCpu { pub cpu_us_per_delivery: f64, pub cpu_util: f64, }

    /// The store's counters over the run, and its thread's CPU: from the start of sending until
    /// `unwritten` is back to 0, per message written and as a share of the server's CPU.
    /// `drained_after_stop_s` is absent if `unwritten` was not back to 0 within 10 s, and
    /// `run_us_per_message` (`schedstat`'s nanoseconds) when the kernel does not keep them.
    pub struct Store {
        pub state: String, pub dropped: u64,
        pub sent_by_load_generator: u64, pub written_in_window: u64,
        pub accepted_per_s: f64, pub written_per_s: f64,
        pub unwritten_at_stop: u64, pub drained: bool, pub drained_after_stop_s: Option<f64>,
        pub cpu_us_per_message: f64, pub run_us_per_message: Option<f64>,
        pub share_of_server_cpu: f64,
    }

    /// W5's stalled reader; `close_code` is absent when its connection ended without a close
    /// frame.
    #[derive(Default)]
    pub struct Slow {
        pub left_seen: bool, pub left_seen_after_s: Option<f64>,
        pub closed_by_server: bool, pub close_code: Option<u16>,
        pub latency_other_rooms: Latency, pub latency_slow_room: Latency,
        pub rss_kib_growth_max: u64,
    }

    /// W3: idle clients up to the cap, then past it. The per-client figures are taken at
    /// `memory_at` clients (the same N for every server), the rest with every client connected;
    /// `kernel_kib_per_client` from `/proc/meminfo` deltas. `healthz_status` is absent when
    /// `/healthz` did not answer, `checkpoints` is the server after every `--checkpoint`
    /// clients, `smaps` is only there with `--smaps`.
    pub struct Capacity {
        pub clients_target: u64, pub connected: u64, pub error_samples: Vec<String>,
        pub connect_s: f64, pub connects_per_s: f64, pub connect_latency: Latency,
        pub server_before: Sample, pub memory_at: u64, pub server_at_memory: Sample,
        pub server_full: Sample,
        pub rss_kib_per_client: f64, pub threads_per_client: f64, pub maps_per_client: f64,
        pub kernel_kib_per_client: Meminfo, pub server_cpu_s_connecting: f64,
        pub over_cap_attempted: u64, pub over_cap_refused_503: u64, pub healthz_status: Option<u16>,
        pub probe_received: bool, pub probe_latency_ms: Option<f64>, pub dropped_by_server: u64,
        pub checkpoints: Vec<Checkpoint>, pub smaps: Option<SmapsDiff>,
    }

    pub struct Checkpoint { pub clients: u64, pub rss_kib: u64, pub threads: u64, pub fds: u64, }

    /// Where the per-client memory went, from /proc/PID/smaps before and after.
    pub struct SmapsDiff {
        pub anon_groups: Vec<SmapsGroup>,
        pub per_client_mappings_rss_kib_per_client: f64,
        pub other_anon_rss_kib_per_client: f64,
        pub brk_heap_rss_kib_per_client: f64,
        pub named_rss_kib_per_client: f64,
    }

    pub struct SmapsGroup {
        pub perms: String, pub size_kib: u64, pub count_before: u64, pub count_after: u64,
        pub rss_kib_per_client: f64,
    }

    /// W4: everyone joins one room at once.
    pub struct JoinStorm {
        pub clients: u64, pub welcomed: u64, pub error_samples: Vec<String>,
        pub all_welcomed_s: f64, pub welcome_latency: Latency,
        pub joined_frames: u64, pub joined_frames_expected: u64, pub all_joined_seen_s: f64,
        pub server_cpu_s: f64, pub server_after: Sample,
    }

    /// W6: rounds of clients that come and go.
    pub struct Churn {
        pub all_back_to_baseline: bool, pub judged_on: String,
        pub errors: u64, pub error_samples: Vec<String>,
        pub baseline: Sample, pub connect_latency: Latency,
        pub rss_kib_by_round: Vec<u64>, pub rss_growth_kib_round2_to_last: i64,
        pub rss_slope_kib_per_round: f64, pub rss_slope_from_round: u64,
        pub server_cpu_s: f64, pub wall_s: f64, pub per_round: Vec<Round>,
    }

    pub struct Round {
        pub round: u64, pub peak_threads: u64, pub connection_threads: u64,
        pub threads: u64, pub fds: u64, pub rss_kib: u64, pub settle_ms: f64,
    }

    /// W8: bad clients churning for minutes; the server's threads, fds and RSS over time.
    /// `normal_errors`: normal clients (join, say, echo, close) that failed; `rss_kib_by_tenth`:
    /// the mean RSS of each tenth of the run, warm-up included; `back_to_baseline`: connection
    /// threads (`ws-reader-N`, `ws-writer-N`) gone and fds back to the baseline.
    pub struct Soak {
        pub duration_s: f64, pub workers: u64, pub clients: u64,
        pub by_kind: BTreeMap<String, u64>, pub normal_errors: u64,
        pub error_samples: Vec<String>, pub baseline: Sample, pub warmup_s: f64,
        pub rss_kib_by_tenth: Vec<u64>, pub first_third: Flat, pub last_third: Flat,
        pub back_to_baseline: bool, pub after: Sample, pub connection_threads_after: u64,
        pub settle_s: f64, pub healthz_status: Option<u16>,
    }

    /// Means of the samples in one stretch of the soak.
    pub struct Flat { pub samples: u64, pub threads: f64, pub fds: f64, pub rss_kib: f64, }

    /// What the suite measures around one run, the noise: other processes' CPU share and the
    /// load average before it (absent when /proc could not say), and its wall time.
    #[derive(Default)]
    pub struct Noise { pub loadavg_1m_before: Option<f64>, pub other_cpu_share: Option<f64>, pub wall_s: Option<f64>, }

    /// A store-on run's database after a clean stop.
    pub struct Disk { pub total_bytes: u64, pub bytes_per_message: f64, }

    /// One run (or, with tag `median`, the medians of a server's completed runs): `disk` for
    /// store-on runs only, and the workload's figures or why there are none.
    pub struct Run<T> { pub tag: String, pub noise: Noise, pub disk: Option<Disk>, pub result: Result<T, String>, }

    /// One server's runs of one workload; `median` is absent when no run completed.
    pub struct Series<T> { pub median: Option<Run<T>>, pub runs: Vec<Run<T>>, }

    /// One workload: when and at which commit it ran (absent from runs before issue 12; may
    /// differ from the file's when a rerun was merged in), how (the load generator's flags,
    /// and each server's own extra load-generator and server flags), and each server's runs.
    pub struct Workload<T> {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub measured: Option<String>,
        pub title: String, pub command: String,
        pub load_flags: BTreeMap<String, String>, pub server_flags: BTreeMap<String, String>,
        pub servers: BTreeMap<String, Series<T>>,
    }

    /// Every workload (absent: not run, e.g. `--only`).
    #[derive(Default)]
    pub struct Workloads {
        pub w1: Option<Workload<Traffic>>, pub w2: Option<Workload<Traffic>>,
        pub w3: Option<Workload<Capacity>>, pub w4: Option<Workload<JoinStorm>>,
        pub w5: Option<Workload<Traffic>>, pub w6: Option<Workload<Churn>>,
        pub w7: Option<Workload<Traffic>>, pub w8: Option<Workload<Soak>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub w9: Option<Workload<Traffic>>,
    }

    /// `bench/results.json`; `servers` holds each server's command line.
    pub struct Results {
        pub schema: String, pub generated: String, pub quick: bool,
        pub reps: u64, pub store_reps: u64, pub total_s: f64,
        pub json_link: String, pub pinned: Vec<String>, pub machine: Machine,
        pub servers: BTreeMap<String, String>, pub store_data_root: String,
        pub workloads: Workloads,
    }

    /// The machine and the versions, each absent when this host could not say.
    pub struct Machine {
        pub nproc: Option<usize>, pub cpu_model: Option<String>, pub mem_gib: Option<f64>,
        pub kernel: Option<String>, pub rlimit_nofile: Option<String>,
        pub vm_max_map_count: Option<String>, pub pid_max: Option<String>,
        pub rustc: Option<String>, pub node: Option<String>, pub ws_package: Option<String>,
        pub git_rev: Option<String>, pub git_dirty: Option<bool>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub redis: Option<String>,
    }
}

impl<T> Run<T> {
    pub fn ok(&self) -> Option<&T> {
        self.result.as_ref().ok()
    }
}

/// A server's runs (none if it did not run), its medians and median figures (if it completed
/// a run).
impl<T> Workload<T> {
    pub fn runs(&self, server: &str) -> &[Run<T>] {
        self.servers.get(server).map_or(&[], |s| &s.runs)
    }
    pub fn median(&self, server: &str) -> Option<&Run<T>> {
        self.servers.get(server)?.median.as_ref()
    }
    pub fn ok(&self, server: &str) -> Option<&T> {
        self.median(server)?.ok()
    }
}

/// A [`Series`] as JSON: the runs (each a [`Run`] as JSON) and the median of those that completed.
pub fn series(runs: Vec<Value>) -> Value {
    let ok: Vec<&Value> = runs
        .iter()
        .filter(|r| r["result"].get("Ok").is_some())
        .collect();
    let mut median = merge(&ok);
    if let Some(m) = median.as_object_mut() {
        m.insert("tag".into(), json!("median"));
    }
    json!({ "median": median, "runs": runs })
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
        let (v, mut s) = (
            serde_json::to_value(self).expect("serializes"),
            String::new(),
        );
        write_json(&v, 0, &mut s);
        s + "\n"
    }
}

fn write_json(v: &Value, depth: usize, out: &mut String) {
    let items: Vec<(Option<&String>, &Value)> = match v {
        Value::Object(m) if depth < 5 => m.iter().map(|(k, x)| (Some(k), x)).collect(),
        Value::Array(a) if depth < 6 => a.iter().map(|x| (None, x)).collect(),
        _ => vec![],
    };
    if items.is_empty() {
        return out.push_str(&v.to_string());
    }
    let pad = "  ".repeat(depth);
    out.push(if v.is_object() { '{' } else { '[' });
    for (i, (k, x)) in items.into_iter().enumerate() {
        out.push_str(&format!("{}\n{pad}  ", if i == 0 { "" } else { "," }));
        if let Some(k) = k {
            out.push_str(&format!("{}: ", json!(k)));
        }
        write_json(x, depth + 1, out);
    }
    out.push_str(&format!("\n{pad}{}", if v.is_object() { '}' } else { ']' }));
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
/// true, nulls (a field absent from some runs) skipped, anything else → the first run's.
pub fn merge(runs: &[&Value]) -> Value {
    let runs: Vec<&Value> = runs.iter().copied().filter(|v| !v.is_null()).collect();
    let Some(first) = runs.first() else {
        return Value::Null;
    };
    let column = |f: &dyn Fn(&Value) -> Option<&Value>| {
        merge(&runs.iter().filter_map(|r| f(r)).collect::<Vec<_>>())
    };
    let len = |v: &Value| v.as_array().map_or(0, Vec::len);
    match first {
        Value::Number(_) => {
            let mut xs: Vec<f64> = runs.iter().filter_map(|r| r.as_f64()).collect();
            match median(&mut xs) {
                Some(m) if runs.iter().all(|r| r.is_u64()) => json!(m.round() as u64),
                Some(m) if runs.iter().all(|r| r.is_i64()) => json!(m.round() as i64),
                Some(m) => json!(crate::client::round(m, 4)),
                None => Value::Null,
            }
        }
        Value::Bool(_) => json!(runs.iter().all(|r| r.as_bool() == Some(true))),
        Value::Object(m) => {
            let field = |k: &String| (k.clone(), column(&|r| r.get(k)));
            Value::Object(m.keys().map(field).collect())
        }
        Value::Array(a) if runs.iter().all(|r| len(r) == a.len()) => {
            (0..a.len()).map(|i| column(&|r| r.get(i))).collect()
        }
        _ => (*first).clone(),
    }
}
