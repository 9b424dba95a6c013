//! The typed results: what every workload prints (one serde struct per workload), how the suite
//! files them (`bench/results.json`: per workload and server, every run and the medians), and
//! the median of several runs. Every struct denies unknown fields and has no defaults, so a
//! renamed or missing field is an error when the file is read, never a silent "n/a".

use crate::procfs::{Meminfo, Sample};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// Latency percentiles in microseconds (all 0 when nothing was measured).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Latency {
    pub count: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

/// W1, W2, W5 and W7: rooms of clients, every message checked at every receiver.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
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
    pub client: ClientCpu,
    /// The history store's figures; only a server that writes history has them.
    pub store: Option<Store>,
    /// W5's stalled reader; only W5 has one.
    pub slow: Option<Slow>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrafficServer {
    pub cpu_us_per_delivery: f64,
    pub cpu_util: f64,
    pub threads: u64,
    pub rss_kib_max: u64,
    /// Per kind of thread (`ws-writer-17` → `ws-writer`), over the sending time.
    pub cpu_by_thread_kind: BTreeMap<String, KindCpu>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KindCpu {
    pub cpu_us_per_delivery: f64,
    /// From `schedstat`, absent when the kernel does not keep it.
    pub run_us_per_delivery: Option<f64>,
    pub slices_per_1000_deliveries: Option<f64>,
}

/// The load generator's own CPU.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClientCpu {
    pub cpu_us_per_delivery: f64,
    pub cpu_util: f64,
}

/// The store's counters over the run, and its thread's CPU.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
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
    pub drained_after_deliveries_s: Option<f64>,
    pub window_s: f64,
    pub thread: StoreThread,
    pub thread_states_while_sending: ThreadStates,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StoreThread {
    pub cpu_us_per_message: f64,
    pub run_us_per_message: Option<f64>,
    pub cpu_us_per_delivery: f64,
    pub share_of_server_cpu: f64,
    pub busy_share_of_a_core: f64,
    pub slices_per_message: Option<f64>,
    pub runqueue_wait_ms: Option<f64>,
}

/// Samples of the store thread's state: the share per state (`R`, `S`, `D`), and the most
/// frequent (state, wait channel) pairs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ThreadStates {
    pub share: BTreeMap<String, f64>,
    pub top: Vec<Wchan>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Wchan {
    pub state: String,
    pub wchan: String,
    pub share: f64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
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

/// W3: idle clients up to the cap, then past it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Capacity {
    pub clients_target: u64,
    pub connected: u64,
    pub error_samples: Vec<String>,
    pub connect_s: f64,
    pub connects_per_s: f64,
    pub connect_latency: Latency,
    pub server_before: Sample,
    pub server_full: Sample,
    pub rss_kib_per_client: f64,
    pub rss_kib_per_client_slope: f64,
    pub threads_per_client: f64,
    pub maps_per_client: f64,
    /// The host's kernel memory per client (`/proc/meminfo` deltas); absent in results
    /// recorded before it was measured.
    pub kernel_kib_per_client: Option<Meminfo<f64>>,
    pub server_cpu_s_connecting: f64,
    pub over_cap: OverCap,
    /// Absent when `/healthz` did not answer.
    pub healthz_status: Option<u16>,
    pub probe_received: bool,
    pub probe_latency_ms: Option<f64>,
    pub dropped_by_server: u64,
    pub checkpoints: Vec<Checkpoint>,
    /// Only with `--smaps`.
    pub smaps: Option<SmapsDiff>,
}

/// The server after every `--checkpoint` clients.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub clients: u64,
    pub rss_kib: u64,
    pub threads: u64,
    pub fds: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OverCap {
    pub attempted: u64,
    pub refused_503: u64,
}

/// Where the per-client memory went, from /proc/PID/smaps before and after.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SmapsDiff {
    pub anon_groups: Vec<SmapsGroup>,
    pub per_client_mappings_rss_kib_per_client: f64,
    pub other_anon_rss_kib_per_client: f64,
    pub brk_heap_rss_kib_per_client: f64,
    pub named_rss_kib_per_client: f64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SmapsGroup {
    pub perms: String,
    pub size_kib: u64,
    pub count_before: u64,
    pub count_after: u64,
    pub rss_kib_per_client: f64,
}

/// W4: everyone joins one room at once.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
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

/// W6: rounds of clients that come and go.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
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

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Round {
    pub round: u64,
    pub peak_threads: u64,
    pub connection_threads: u64,
    pub threads: u64,
    pub fds: u64,
    pub rss_kib: u64,
    pub settle_ms: f64,
}

/// What the suite measures around one run, the noise: other processes' CPU share and the
/// load average before it (absent when /proc could not say), and its wall time.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Noise {
    pub loadavg_1m_before: Option<f64>,
    pub other_cpu_share: Option<f64>,
    pub wall_s: Option<f64>,
}

/// A store-on run's database after a clean stop.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    pub total_bytes: u64,
    pub bytes_per_message: f64,
}

/// One run (or, with tag `median`, the medians of a server's completed runs).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Run<T> {
    pub tag: String,
    pub noise: Noise,
    /// Store-on runs only.
    pub disk: Option<Disk>,
    /// The workload's figures, or why there are none.
    pub result: Result<T, String>,
}

impl<T> Run<T> {
    pub fn ok(&self) -> Option<&T> {
        self.result.as_ref().ok()
    }
}

/// One server's runs of one workload.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Series<T> {
    /// Absent when no run completed.
    pub median: Option<Run<T>>,
    pub runs: Vec<Run<T>>,
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

    pub fn ok_runs(&self) -> usize {
        self.runs.iter().filter(|r| r.ok().is_some()).count()
    }
}

fn to_value<S: Serialize>(s: &S) -> Value {
    serde_json::to_value(s).expect("results serialize")
}

/// One workload: how it was run, and each server's runs (absent: that server did not run it).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Workload<T> {
    pub title: String,
    pub command: String,
    pub chatroom_flags: String,
    pub node_flags: String,
    pub chatroom_server_flags: String,
    pub chatroom: Option<Series<T>>,
    pub chatroom_store: Option<Series<T>>,
    pub node: Option<Series<T>>,
}

impl<T> Workload<T> {
    /// The servers that ran it, in report order.
    pub fn servers(&self) -> Vec<(&'static str, &Series<T>)> {
        let all = [
            ("chatroom", &self.chatroom),
            ("chatroom_store", &self.chatroom_store),
            ("node", &self.node),
        ];
        all.into_iter()
            .filter_map(|(n, s)| Some((n, s.as_ref()?)))
            .collect()
    }

    /// A server's medians, if it completed a run.
    pub fn median(&self, server: &str) -> Option<&Run<T>> {
        self.servers()
            .into_iter()
            .find(|(n, _)| *n == server)?
            .1
            .median
            .as_ref()
    }
}

/// Every workload (absent: not run, e.g. `--only`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Workloads {
    pub w1: Option<Workload<Traffic>>,
    pub w2: Option<Workload<Traffic>>,
    pub w3: Option<Workload<Capacity>>,
    pub w4: Option<Workload<JoinStorm>>,
    pub w5: Option<Workload<Traffic>>,
    pub w6: Option<Workload<Churn>>,
    pub w7: Option<Workload<Traffic>>,
}

/// `bench/results.json`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
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
    pub servers: Vec<ServerCommand>,
    pub store_data_root: String,
    pub workloads: Workloads,
}

/// The machine and the versions, each absent when this host could not say.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
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

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerCommand {
    pub name: String,
    pub command: String,
}

pub const SCHEMA: &str = "chatroom-bench/2";

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
    let pad = |d: usize| "  ".repeat(d);
    let expand = depth < 4 || (depth == 4 && v.is_array());
    match v {
        Value::Object(m) if expand && !m.is_empty() => {
            out.push_str("{\n");
            for (i, (k, x)) in m.iter().enumerate() {
                out.push_str(&format!("{}{}: ", pad(depth + 1), json!(k)));
                write_json(x, depth + 1, out);
                out.push_str(if i + 1 < m.len() { ",\n" } else { "\n" });
            }
            out.push_str(&format!("{}}}", pad(depth)));
        }
        Value::Array(a) if expand && !a.is_empty() => {
            out.push_str("[\n");
            for (i, x) in a.iter().enumerate() {
                out.push_str(&pad(depth + 1));
                write_json(x, depth + 1, out);
                out.push_str(if i + 1 < a.len() { ",\n" } else { "\n" });
            }
            out.push_str(&format!("{}]", pad(depth)));
        }
        _ => out.push_str(&v.to_string()),
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
            match crate::stats::median(&mut xs) {
                Some(m) if runs.iter().all(Value::is_u64) => json!(m.round() as u64),
                Some(m) if runs.iter().all(Value::is_i64) => json!(m.round() as i64),
                Some(m) => json!(crate::stats::round(m, 4)),
                None => Value::Null,
            }
        }
        Value::Bool(_) => json!(runs.iter().all(|r| r.as_bool() == Some(true))),
        Value::Object(map) => {
            let mut out = Map::new();
            for k in map.keys() {
                let vals: Vec<Value> = runs
                    .iter()
                    .filter_map(|r| r.get(k))
                    .filter(|v| !v.is_null())
                    .cloned()
                    .collect();
                out.insert(k.clone(), merge(&vals));
            }
            Value::Object(out)
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
