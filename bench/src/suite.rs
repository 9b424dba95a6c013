//! The benchmark suite: starts each server on free ports, runs every workload against it as a
//! child process of this binary, repeats, takes medians, checks the targets and writes
//! `bench/results.json` and `BENCHMARKS.md`. Stops everything it started, by pid.
//!
//! chatroom runs in two variants: `chatroom` keeps history in memory only (`--data none`, the
//! figures every earlier run measured), and `chatroom_store` writes it to SQLite in a fresh
//! directory under the temp dir (`--data DIR`), created for each run and removed after it. The
//! two run back to back in every repetition, in alternating order, so noise hits both alike.

use crate::args::Args;
use crate::procfs;
use crate::report;
use crate::stats::{median, round};
use serde_json::{json, Map, Value};
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// A server under test.
#[derive(Clone, Debug)]
struct ServerKind {
    /// `chatroom`, `chatroom_store` or `node`.
    name: &'static str,
    /// Program and arguments.
    cmd: Vec<String>,
    /// chatroom, in either variant (takes the workload's chatroom flags).
    chatroom: bool,
    /// Started with `--data DIR`, a fresh directory per run.
    store: bool,
}

/// A running server.
struct Running {
    child: Child,
    pid: u32,
    ws: String,
    http: String,
}

/// One workload of the suite.
#[derive(Clone, Debug)]
pub struct Workload {
    /// `w1` … `w6`.
    pub id: &'static str,
    /// Human title.
    pub title: &'static str,
    /// Subcommand and flags for every server.
    pub args: Vec<String>,
    /// Extra flags for chatroom only.
    pub chatroom_args: Vec<String>,
    /// Extra flags for the Node peer only.
    pub node_args: Vec<String>,
    /// Extra server flags for chatroom (e.g. a smaller cap in quick mode).
    pub chatroom_server_args: Vec<String>,
    /// Longest the workload may take.
    pub timeout: Duration,
    /// Pin the server to CPU 0 and the load generator to CPU 1.
    pub pin: bool,
    /// Also run chatroom with its history store on (`chatroom_store`).
    pub store: bool,
    /// The store must not cost this workload more than 10%: its memory-only and store-on
    /// pair runs `--store-reps` times, since one pair's p99 ratio varies by ±20%.
    pub store_check: bool,
    /// Also run the Node peer.
    pub node: bool,
}

fn sv(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

/// The seven workloads, full size or quick.
pub fn workloads(quick: bool) -> Vec<Workload> {
    let w = |id, title, args: &str, cr: &str, node: &str, srv: &str, t: u64| Workload {
        id,
        title,
        args: sv(args),
        chatroom_args: sv(cr),
        node_args: sv(node),
        chatroom_server_args: sv(srv),
        timeout: Duration::from_secs(t),
        // W1 compares CPU per delivery: give the server and the load generator a core each,
        // as the design notes' measurements did. The others run as a deployment would.
        pin: id == "w1",
        // The fan-out workloads, and W7 which exists for it, also run with the store on.
        store: matches!(id, "w1" | "w2" | "w7"),
        store_check: matches!(id, "w1" | "w2"),
        // W7 measures the store against chatroom without it; Node has none.
        node: id != "w7",
    };
    if quick {
        vec![
            w("w1", "Fan-out at full speed", "fanout --clients 100 --senders 10 --window 8 --duration 2.5", "", "", "", 60),
            w("w2", "Moderate load", "moderate --rooms 20 --per-room 20 --senders-per-room 2 --rate 20 --duration 3", "", "", "", 60),
            w("w3", "Capacity (idle clients)", "capacity --clients 1500 --room-size 100 --checkpoint 500 --smaps", "--extra 200", "--extra 0", "--max-clients 1500", 90),
            w("w4", "Join storm", "joinstorm --clients 500", "", "", "", 60),
            w("w5", "Slow consumer", "moderate --rooms 20 --per-room 20 --senders-per-room 2 --rate 20 --duration 5 --slow --slow-pad 3900", "", "", "", 60),
            w("w6", "Churn", "churn --rounds 3 --clients 500 --room-size 100", "", "", "", 90),
            w("w7", "Store throughput", "fanout --rooms 100 --clients 1 --senders 1 --window 8 --duration 3 --room store", "", "", "", 60),
        ]
    } else {
        vec![
            w("w1", "Fan-out at full speed", "fanout --clients 100 --senders 10 --window 8 --duration 10", "", "", "", 120),
            w("w2", "Moderate load", "moderate --rooms 20 --per-room 20 --senders-per-room 2 --rate 20 --duration 10", "", "", "", 120),
            w("w3", "Capacity (idle clients)", "capacity --clients 7000 --room-size 100 --checkpoint 1000 --smaps", "--extra 500", "--extra 0", "", 300),
            w("w4", "Join storm", "joinstorm --clients 1000", "", "", "", 120),
            w("w5", "Slow consumer", "moderate --rooms 20 --per-room 20 --senders-per-room 2 --rate 20 --duration 40 --slow --slow-pad 3900", "", "", "", 180),
            w("w6", "Churn", "churn --rounds 10 --clients 1000 --room-size 100", "", "", "", 300),
            w("w7", "Store throughput", "fanout --rooms 100 --clients 1 --senders 1 --window 8 --duration 10 --room store", "", "", "", 120),
        ]
    }
}

/// `taskset -c CPU` in front of a command when pinning, else nothing.
fn pinned(cpu: Option<usize>, program: &str) -> Command {
    match cpu {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.args(["-c", &c.to_string(), program]);
            cmd
        }
        None => Command::new(program),
    }
}

fn start_server(
    kind: &ServerKind,
    extra: &[String],
    log_dir: &Path,
    tag: &str,
    cpu: Option<usize>,
) -> Result<Running, String> {
    // taskset execs the server: the pid stays the server's.
    let mut cmd = pinned(cpu, &kind.cmd[0]);
    cmd.args(&kind.cmd[1..]).args(extra);
    let err_log =
        File::create(log_dir.join(format!("{tag}.stderr.log"))).map_err(|e| e.to_string())?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(err_log));
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", kind.cmd.join(" ")))?;
    let pid = child.id();
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel::<String>();
    let out_path = log_dir.join(format!("{tag}.stdout.log"));
    thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut first = String::new();
        let _ = r.read_line(&mut first);
        let _ = tx.send(first);
        // Keep draining so the server never blocks on a full pipe.
        if let Ok(mut f) = File::create(out_path) {
            let _ = std::io::copy(&mut r, &mut f);
        }
    });
    let line = match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(l) => l,
        Err(_) => {
            stop(child, pid);
            return Err(format!("{}: no listening line within 20 s", kind.name));
        }
    };
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|t| t.strip_prefix(key).map(str::to_string))
    };
    let Some(ws) = field("ws=") else {
        stop(child, pid);
        return Err(format!("{}: unexpected first line {line:?}", kind.name));
    };
    let http = field("http=").unwrap_or_else(|| ws.clone());
    Ok(Running {
        child,
        pid,
        ws,
        http,
    })
}

/// SIGTERM by pid, wait up to 5 s, then SIGKILL.
fn stop(mut child: Child, pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .stderr(Stdio::null())
        .status();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    eprintln!("suite: pid {pid} ignored SIGTERM for 5 s; killing it");
    let _ = child.kill();
    let _ = child.wait();
}

/// Busy and total CPU seconds of the whole machine, from /proc/stat.
fn machine_cpu() -> Option<(f64, f64)> {
    let s = fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().next()?;
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    if v.len() < 5 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest is inside user).
    let total: f64 = v.iter().take(8).sum();
    let idle = v[3] + v[4];
    let tck = procfs::clk_tck();
    Some(((total - idle) / tck, total / tck))
}

fn loadavg() -> Option<f64> {
    fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Runs one workload child process against `srv`; its JSON plus the suite's own measurements.
fn run_one(
    exe: &Path,
    w: &Workload,
    kind: &ServerKind,
    srv: &Running,
    log_dir: &Path,
    tag: &str,
    cpu: Option<usize>,
) -> Value {
    let mut args = w.args.clone();
    args.extend(["--ws".to_string(), srv.ws.clone()]);
    args.extend(["--http".to_string(), srv.http.clone()]);
    args.extend(["--pid".to_string(), srv.pid.to_string()]);
    let server = kind.name;
    args.extend(if kind.chatroom {
        w.chatroom_args.clone()
    } else {
        w.node_args.clone()
    });
    let idle = procfs::sample_with_maps(srv.pid);
    let load0 = loadavg();
    let m0 = machine_cpu();
    let s0 = procfs::cpu_secs(Some(srv.pid));
    let t0 = Instant::now();
    let err_log = File::create(log_dir.join(format!("{tag}.bench.stderr.log"))).ok();
    let child = pinned(cpu, &exe.display().to_string())
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(err_log.map(Stdio::from).unwrap_or_else(Stdio::inherit))
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return json!({"error": format!("cannot start the load generator: {e}")}),
    };
    let mut stdout = child.stdout.take().expect("piped stdout");
    let reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
        s
    });
    let mut timed_out = false;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if t0.elapsed() > w.timeout => {
                timed_out = true;
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            Ok(None) => thread::sleep(Duration::from_millis(50)),
            Err(_) => break,
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let s1 = procfs::cpu_secs(Some(srv.pid));
    let m1 = machine_cpu();
    let out = reader.join().unwrap_or_default();
    let mut v: Value = match out.lines().rev().find(|l| l.starts_with('{')) {
        Some(l) => {
            serde_json::from_str(l).unwrap_or_else(|e| json!({"error": format!("bad JSON: {e}")}))
        }
        None => {
            json!({"error": if timed_out { format!("timed out after {} s", w.timeout.as_secs()) } else { "no output".to_string() }})
        }
    };
    let server_cpu = match (s0, s1) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let client_cpu = v["process"]["cpu_s"].as_f64();
    let other = match (m0, m1, server_cpu, client_cpu) {
        (Some(a), Some(b), Some(s), Some(c)) => Some(round((b.0 - a.0) - s - c, 2)),
        _ => None,
    };
    v["suite"] = json!({
        "server": server,
        "tag": tag,
        "args": args,
        "wall_s": round(wall, 2),
        "timed_out": timed_out,
        "server_idle_before": idle.map(|s| s.to_json()),
        "server_cpu_s_whole_run": server_cpu.map(|c| round(c, 3)),
        "loadavg_1m_before": load0,
        // CPU used on this machine by everything except the server and the load generator
        // while the workload ran: the noise.
        "other_cpu_s": other,
        "other_cpu_share": match (other, m0, m1) {
            (Some(o), Some(a), Some(b)) if b.1 > a.1 => Some(round(o / (b.1 - a.1), 3)),
            _ => None,
        },
        "server_alive_after": procfs::alive(srv.pid),
    });
    v
}

/// A new, empty directory for one store-on run: `<root>/chatroom-bench-<suite pid>-<tag>`.
fn fresh_data_dir(root: &Path, tag: &str) -> Result<PathBuf, String> {
    let d = root.join(format!("chatroom-bench-{}-{tag}", std::process::id()));
    if d.exists() {
        fs::remove_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
    Ok(d)
}

/// The files of a store's directory and their sizes (the database, its WAL and shared memory).
fn dir_sizes(d: &Path) -> Value {
    let mut files = Map::new();
    let mut total = 0u64;
    for e in fs::read_dir(d).into_iter().flatten().filter_map(|e| e.ok()) {
        let len = e.metadata().map(|m| m.len()).unwrap_or(0);
        total += len;
        files.insert(e.file_name().to_string_lossy().to_string(), json!(len));
    }
    json!({"files": files, "total_bytes": total})
}

/// Element-wise median of the runs: numbers → median, bools → all true, others → first run's.
pub fn merge(runs: &[Value]) -> Value {
    let Some(first) = runs.first() else {
        return Value::Null;
    };
    match first {
        Value::Number(_) => {
            let mut xs: Vec<f64> = runs.iter().filter_map(Value::as_f64).collect();
            match median(&mut xs) {
                Some(m) if first.is_u64() && runs.iter().all(Value::is_u64) => {
                    json!(m.round() as u64)
                }
                Some(m) => json!(round(m, 4)),
                None => Value::Null,
            }
        }
        Value::Bool(_) => json!(runs.iter().all(|r| r.as_bool().unwrap_or(false))),
        Value::Object(map) => {
            let mut out = Map::new();
            for k in map.keys() {
                let vals: Vec<Value> = runs
                    .iter()
                    .map(|r| r.get(k).cloned().unwrap_or(Value::Null))
                    .collect();
                out.insert(k.clone(), merge_nonnull(&vals));
            }
            Value::Object(out)
        }
        Value::Array(a) => {
            if runs
                .iter()
                .all(|r| r.as_array().map(|x| x.len()) == Some(a.len()))
            {
                Value::Array(
                    (0..a.len())
                        .map(|i| merge(&runs.iter().map(|r| r[i].clone()).collect::<Vec<_>>()))
                        .collect(),
                )
            } else {
                first.clone()
            }
        }
        _ => first.clone(),
    }
}

fn merge_nonnull(vals: &[Value]) -> Value {
    let nn: Vec<Value> = vals.iter().filter(|v| !v.is_null()).cloned().collect();
    if nn.is_empty() {
        Value::Null
    } else {
        merge(&nn)
    }
}

fn cmd_output(cmd: &str, args: &[&str]) -> Option<String> {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
}

fn machine_info(node: &str, node_dir: &Path) -> Value {
    let cpu = fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
        s.lines().find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
    });
    let mem_kib = fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines().find_map(|l| {
            l.strip_prefix("MemTotal:")
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
    });
    let read = |p: &str| fs::read_to_string(p).ok().map(|s| s.trim().to_string());
    let ws_version = fs::read_to_string(node_dir.join("package-lock.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<Value>(&s).ok())
        .and_then(|v| {
            v["packages"]["node_modules/ws"]["version"]
                .as_str()
                .map(str::to_string)
        });
    json!({
        "nproc": thread::available_parallelism().map(|n| n.get()).ok(),
        "cpu_model": cpu,
        "mem_gib": mem_kib.map(|k| round(k as f64 / 1048576.0, 1)),
        "kernel": read("/proc/sys/kernel/osrelease"),
        "rlimit_nofile": cmd_output("sh", &["-c", "ulimit -n"]),
        "vm_max_map_count": read("/proc/sys/vm/max_map_count"),
        "pid_max": read("/proc/sys/kernel/pid_max"),
        "rustc": cmd_output("rustc", &["--version"]),
        "node": cmd_output(node, &["--version"]),
        "ws_package": ws_version,
        "git_rev": cmd_output("git", &["rev-parse", "--short", "HEAD"]),
        "git_dirty": cmd_output("git", &["status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock"]).map(|s| !s.is_empty()),
    })
}

/// `chatroom-bench suite …`
pub fn main(a: &Args) -> Result<(), String> {
    let quick = a.flag("quick");
    let reps: usize = a.get("reps", if quick { 1 } else { 3 })?;
    let store_reps: usize = a.get("store-reps", if quick { reps } else { reps.max(7) })?;
    let chatroom_bin = a
        .opt_str("chatroom")
        .unwrap_or_else(|| "target/release/chatroom".to_string());
    let node_dir = PathBuf::from(
        a.opt_str("node-peer")
            .unwrap_or_else(|| "bench/peers/node-ws".to_string()),
    );
    let node = a.opt_str("node").unwrap_or_else(|| "node".to_string());
    // A quick run must not overwrite the full run's figures.
    let (def_json, def_md) = if quick {
        (
            "target/bench-quick/results.json",
            "target/bench-quick/BENCHMARKS.md",
        )
    } else {
        ("bench/results.json", "BENCHMARKS.md")
    };
    let out_json = PathBuf::from(
        a.opt_str("out-json")
            .unwrap_or_else(|| def_json.to_string()),
    );
    let out_md = PathBuf::from(a.opt_str("out-md").unwrap_or_else(|| def_md.to_string()));
    for p in [&out_json, &out_md] {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
    }
    // How the markdown links to the JSON.
    let json_link = match (out_md.parent(), out_json.parent(), out_json.file_name()) {
        (Some(a), Some(b), Some(name)) if a == b => name.to_string_lossy().to_string(),
        _ => out_json.display().to_string(),
    };
    let notes = PathBuf::from(
        a.opt_str("notes")
            .unwrap_or_else(|| "bench/NOTES.md".to_string()),
    );
    let log_dir = PathBuf::from(
        a.opt_str("logs")
            .unwrap_or_else(|| "target/bench-logs".to_string()),
    );
    let only: Option<Vec<String>> = a
        .opt_str("only")
        .map(|s| s.split(',').map(str::to_string).collect());
    let no_pin = a.flag("no-pin");
    let pin_all = a.flag("pin-all");
    let data_root = a
        .opt_str("data-root")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let servers_sel: Vec<String> = a
        .opt_str("servers")
        .unwrap_or_else(|| "chatroom,chatroom_store,node".to_string())
        .split(',')
        .map(str::to_string)
        .collect();
    a.finish()?;
    fs::create_dir_all(&log_dir).map_err(|e| format!("{}: {e}", log_dir.display()))?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // Server on CPU 0, load generator on CPU 1: neither steals the other's core.
    let nproc = thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let can_pin = !no_pin && nproc >= 2 && cmd_output("taskset", &["-c", "0", "true"]).is_some();
    if !no_pin && !can_pin {
        eprintln!("suite: not pinning (needs 2+ CPUs and taskset)");
    }
    let (server_cpu, client_cpu) = if can_pin {
        (Some(0), Some(1))
    } else {
        (None, None)
    };

    let mut kinds = Vec::new();
    for s in &servers_sel {
        match s.as_str() {
            "chatroom" | "chatroom_store" => {
                if !Path::new(&chatroom_bin).exists() {
                    return Err(format!(
                        "{chatroom_bin} not found: build it with cargo build --release"
                    ));
                }
                let store = s == "chatroom_store";
                // Always say where history goes: the default is a directory in the cwd.
                // The store variant gets `--data DIR` per run (see `fresh_data_dir`).
                kinds.push(ServerKind {
                    name: if store { "chatroom_store" } else { "chatroom" },
                    cmd: sv(&format!(
                        "{chatroom_bin} --addr 127.0.0.1:0 --ws-addr 127.0.0.1:0 --rate-limit off --log-level warn{}",
                        if store { "" } else { " --data none" }
                    )),
                    chatroom: true,
                    store,
                })
            }
            "node" => {
                let js = node_dir.join("server.js");
                if !node_dir.join("node_modules/ws").exists() {
                    return Err(format!("{}: run npm ci there first", node_dir.display()));
                }
                kinds.push(ServerKind {
                    name: "node",
                    cmd: vec![
                        node.clone(),
                        js.display().to_string(),
                        "--port".into(),
                        "0".into(),
                    ],
                    chatroom: false,
                    store: false,
                })
            }
            other => return Err(format!("unknown server {other:?}")),
        }
    }
    let wls: Vec<Workload> = workloads(quick)
        .into_iter()
        .filter(|w| {
            only.as_ref()
                .map(|o| o.iter().any(|x| x == w.id))
                .unwrap_or(true)
        })
        .collect();

    let started = cmd_output("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]);
    // Before the runs: the revision that was built, not whatever is checked out at the end.
    let machine = machine_info(&node, &node_dir);
    let t_all = Instant::now();
    // runs[workload][server] = Vec<Value>
    let mut runs: Vec<Vec<Vec<Value>>> = vec![vec![Vec::new(); kinds.len()]; wls.len()];
    for rep in 0..reps.max(store_reps) {
        for (wi, w) in wls.iter().enumerate() {
            // Repetitions past `reps` are only for the store's pairs.
            let extra_pair = rep >= reps;
            if extra_pair && !w.store_check {
                continue;
            }
            // Memory-only and store-on back to back, the first of them alternating by repetition.
            let mut order: Vec<usize> = (0..kinds.len())
                .filter(|&si| (w.store || !kinds[si].store) && (w.node || kinds[si].chatroom))
                .filter(|&si| !extra_pair || kinds[si].chatroom)
                .collect();
            if rep % 2 == 1 {
                let c = order.iter().position(|&si| kinds[si].name == "chatroom");
                let cs = order.iter().position(|&si| kinds[si].store);
                if let (Some(c), Some(cs)) = (c, cs) {
                    order.swap(c, cs);
                }
            }
            for si in order {
                let k = &kinds[si];
                let tag = format!("{}-{}-r{}", w.id, k.name, rep + 1);
                eprint!("suite: {tag} … ");
                let _ = std::io::stderr().flush();
                let mut extra = if k.chatroom {
                    w.chatroom_server_args.clone()
                } else {
                    Vec::new()
                };
                let data_dir = if k.store {
                    match fresh_data_dir(&data_root, &tag) {
                        Ok(d) => {
                            extra.extend(["--data".to_string(), d.display().to_string()]);
                            Some(d)
                        }
                        Err(e) => {
                            eprintln!("ERROR {e}");
                            runs[wi][si].push(json!({ "error": e }));
                            continue;
                        }
                    }
                } else {
                    None
                };
                let (server_cpu, client_cpu) = if w.pin || pin_all {
                    (server_cpu, client_cpu)
                } else {
                    (None, None)
                };
                let mut v = match start_server(k, &extra, &log_dir, &tag, server_cpu) {
                    Ok(srv) => {
                        thread::sleep(Duration::from_millis(200));
                        let mut v = run_one(&exe, w, k, &srv, &log_dir, &tag, client_cpu);
                        if let Some(d) = &data_dir {
                            v["suite"]["store_disk_before_stop"] = dir_sizes(d);
                        }
                        stop(srv.child, srv.pid);
                        v
                    }
                    Err(e) => json!({"error": e}),
                };
                if let Some(d) = &data_dir {
                    if v.get("suite").is_some() {
                        v["suite"]["data_dir"] = json!(d.display().to_string());
                        v["suite"]["store_disk_after_stop"] = dir_sizes(d);
                        let written = v["store"]["written_in_window"].as_u64().filter(|n| *n > 0);
                        let bytes = v["suite"]["store_disk_after_stop"]["total_bytes"].as_u64();
                        v["suite"]["disk_bytes_per_message"] = json!(written
                            .zip(bytes)
                            .map(|(n, b)| round(b as f64 / n as f64, 1)));
                    }
                    if let Err(e) = fs::remove_dir_all(d) {
                        eprintln!("suite: cannot remove {}: {e}", d.display());
                    }
                }
                eprintln!("{}", report::one_line(w.id, &v));
                runs[wi][si].push(v);
                // Let TIME_WAIT sockets and the scheduler settle between runs.
                thread::sleep(Duration::from_millis(500));
            }
        }
    }

    let mut wl_out = Map::new();
    for (wi, w) in wls.iter().enumerate() {
        let mut per = Map::new();
        per.insert("title".into(), json!(w.title));
        per.insert("command".into(), json!(w.args.join(" ")));
        per.insert("chatroom_flags".into(), json!(w.chatroom_args.join(" ")));
        per.insert("node_flags".into(), json!(w.node_args.join(" ")));
        per.insert(
            "chatroom_server_flags".into(),
            json!(w.chatroom_server_args.join(" ")),
        );
        for (si, k) in kinds.iter().enumerate() {
            if runs[wi][si].is_empty() {
                continue;
            }
            let ok: Vec<Value> = runs[wi][si]
                .iter()
                .filter(|v| v.get("error").is_none())
                .cloned()
                .collect();
            per.insert(
                k.name.to_string(),
                json!({"median": merge(&ok), "runs": runs[wi][si], "ok_runs": ok.len()}),
            );
        }
        wl_out.insert(w.id.to_string(), Value::Object(per));
    }
    let mut results = json!({
        "schema": "chatroom-bench/1",
        "generated": started,
        "quick": quick,
        "reps": reps,
        "store_reps": store_reps,
        "json_link": json_link,
        "pinned": wls.iter().filter(|w| can_pin && (w.pin || pin_all)).map(|w| w.id).collect::<Vec<_>>(),
        "total_s": round(t_all.elapsed().as_secs_f64(), 1),
        "machine": machine,
        "servers": kinds.iter().map(|k| json!({
            "name": k.name,
            "command": format!("{}{}", k.cmd.join(" "), if k.store { " --data DIR" } else { "" }),
        })).collect::<Vec<_>>(),
        "store_data_root": data_root.display().to_string(),
        "store_data_fs": cmd_output("findmnt", &["-n", "-o", "FSTYPE,SOURCE", "-T", &data_root.display().to_string()]),
        "workloads": Value::Object(wl_out),
    });
    results["checks"] = report::checks(&results);
    let text = serde_json::to_string_pretty(&results).map_err(|e| e.to_string())?;
    fs::write(&out_json, text + "\n").map_err(|e| format!("{}: {e}", out_json.display()))?;
    let notes_text = fs::read_to_string(&notes).ok();
    fs::write(&out_md, report::markdown(&results, notes_text.as_deref()))
        .map_err(|e| format!("{}: {e}", out_md.display()))?;
    eprintln!(
        "suite: wrote {} and {} in {:.0} s",
        out_json.display(),
        out_md.display(),
        t_all.elapsed().as_secs_f64()
    );
    for c in results["checks"].as_array().into_iter().flatten() {
        eprintln!(
            "  {:4} {} — {}: {}",
            if c["pass"].as_bool() == Some(true) {
                "PASS"
            } else if c["pass"].is_null() {
                "n/a"
            } else {
                "FAIL"
            },
            c["workload"].as_str().unwrap_or(""),
            c["target"].as_str().unwrap_or(""),
            c["value"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

/// `chatroom-bench report [--json bench/results.json] [--out-md BENCHMARKS.md] [--notes bench/NOTES.md]`:
/// rewrites the markdown (and the checks) from a results file, e.g. after editing the notes.
pub fn report_main(a: &Args) -> Result<(), String> {
    let json = PathBuf::from(
        a.opt_str("json")
            .unwrap_or_else(|| "bench/results.json".to_string()),
    );
    let out_md = PathBuf::from(
        a.opt_str("out-md")
            .unwrap_or_else(|| "BENCHMARKS.md".to_string()),
    );
    let notes = PathBuf::from(
        a.opt_str("notes")
            .unwrap_or_else(|| "bench/NOTES.md".to_string()),
    );
    a.finish()?;
    let text = fs::read_to_string(&json).map_err(|e| format!("{}: {e}", json.display()))?;
    let mut results: Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", json.display()))?;
    results["checks"] = report::checks(&results);
    let pretty = serde_json::to_string_pretty(&results).map_err(|e| e.to_string())?;
    fs::write(&json, pretty + "\n").map_err(|e| format!("{}: {e}", json.display()))?;
    let notes_text = fs::read_to_string(&notes).ok();
    fs::write(&out_md, report::markdown(&results, notes_text.as_deref()))
        .map_err(|e| format!("{}: {e}", out_md.display()))
}
