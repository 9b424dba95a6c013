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
use crate::results::{Machine, Noise, Results, ServerCommand, SCHEMA};
use crate::stats::round;
use serde_json::Value;
use std::collections::BTreeMap;
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

/// One run as the suite saw it, before its figures are typed (see [`crate::report::typed`]).
pub struct RawRun {
    pub tag: String,
    pub noise: Noise,
    /// Store-on runs: the database's size after a clean stop.
    pub disk_bytes: Option<u64>,
    /// The workload's figures as it printed them, or why there are none.
    pub result: Result<Value, String>,
}

/// Runs one workload child process against `srv`: its figures plus the suite's noise figures.
/// Its stdout is kept as `<log_dir>/<tag>.json`.
fn run_one(
    exe: &Path,
    w: &Workload,
    kind: &ServerKind,
    srv: &Running,
    log_dir: &Path,
    tag: &str,
    cpu: Option<usize>,
) -> RawRun {
    let mut args = w.args.clone();
    args.extend(
        [
            "--ws",
            &srv.ws,
            "--http",
            &srv.http,
            "--pid",
            &srv.pid.to_string(),
        ]
        .map(String::from),
    );
    args.extend(if kind.chatroom {
        w.chatroom_args.clone()
    } else {
        w.node_args.clone()
    });
    let loadavg_1m_before = loadavg();
    let (m0, s0, t0) = (
        machine_cpu(),
        procfs::cpu_secs(Some(srv.pid)),
        Instant::now(),
    );
    let err_log = File::create(log_dir.join(format!("{tag}.bench.stderr.log"))).ok();
    let child = pinned(cpu, &exe.display().to_string())
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(err_log.map(Stdio::from).unwrap_or_else(Stdio::inherit))
        .spawn();
    let mut raw = RawRun {
        tag: tag.to_string(),
        noise: Noise {
            loadavg_1m_before,
            ..Noise::default()
        },
        disk_bytes: None,
        result: Err(String::new()),
    };
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            return RawRun {
                result: Err(format!("cannot start the load generator: {e}")),
                ..raw
            }
        }
    };
    let mut stdout = child.stdout.take().expect("piped stdout");
    let reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
        s
    });
    let mut timed_out = false;
    while let Ok(None) = child.try_wait() {
        if t0.elapsed() > w.timeout {
            timed_out = true;
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let wall = t0.elapsed().as_secs_f64();
    let (s1, m1) = (procfs::cpu_secs(Some(srv.pid)), machine_cpu());
    let out = reader.join().unwrap_or_default();
    let _ = fs::write(log_dir.join(format!("{tag}.json")), &out);
    let line = out.lines().rev().find(|l| l.starts_with('{'));
    let mut v: Value = match line.map(serde_json::from_str::<Value>) {
        Some(Ok(v)) => v,
        Some(Err(e)) => {
            return RawRun {
                result: Err(format!("bad JSON: {e}")),
                ..raw
            }
        }
        None if timed_out => {
            return RawRun {
                result: Err(format!("timed out after {} s", w.timeout.as_secs())),
                ..raw
            }
        }
        None => {
            return RawRun {
                result: Err("no output".to_string()),
                ..raw
            }
        }
    };
    // CPU used on this machine by everything except the server and the load generator while
    // the workload ran, as a share of the machine: the noise.
    let (client_cpu, server_cpu) = (
        v["load_generator_cpu_s"].as_f64(),
        s0.zip(s1).map(|(a, b)| b - a),
    );
    if let (Some(a), Some(b), Some(s), Some(c)) = (m0, m1, server_cpu, client_cpu) {
        let other = round((b.0 - a.0) - s - c, 2);
        raw.noise.other_cpu_share = (b.1 > a.1).then(|| round(other / (b.1 - a.1), 3));
    }
    raw.noise.wall_s = Some(round(wall, 2));
    raw.result = match procfs::alive(srv.pid) {
        true => Ok(v["result"].take()),
        false => Err("the server died during the run".to_string()),
    };
    raw
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

/// The total size of the files in a store's directory (the database, its WAL and shared memory).
fn dir_bytes(d: &Path) -> u64 {
    let files = fs::read_dir(d).into_iter().flatten().filter_map(|e| e.ok());
    files
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum()
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

fn machine_info(node: &str, node_dir: &Path) -> Machine {
    let read = |p: &str| fs::read_to_string(p).ok().map(|s| s.trim().to_string());
    let field = |file: &str, key: &str| {
        let text = read(file)?;
        text.lines().find_map(|l| {
            Some(
                l.strip_prefix(key)?
                    .trim_start_matches([' ', '\t', ':'])
                    .to_string(),
            )
        })
    };
    let mem_kib = field("/proc/meminfo", "MemTotal")
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok());
    let lock = read(&node_dir.join("package-lock.json").display().to_string());
    let lock = lock.and_then(|s| serde_json::from_str::<Value>(&s).ok());
    let git_status = [
        "status",
        "--porcelain",
        "--",
        "src",
        "Cargo.toml",
        "Cargo.lock",
    ];
    Machine {
        nproc: thread::available_parallelism().map(|n| n.get()).ok(),
        cpu_model: field("/proc/cpuinfo", "model name"),
        mem_gib: mem_kib.map(|k| round(k / 1048576.0, 1)),
        kernel: read("/proc/sys/kernel/osrelease"),
        rlimit_nofile: cmd_output("sh", &["-c", "ulimit -n"]),
        vm_max_map_count: read("/proc/sys/vm/max_map_count"),
        pid_max: read("/proc/sys/kernel/pid_max"),
        rustc: cmd_output("rustc", &["--version"]),
        node: cmd_output(node, &["--version"]),
        ws_package: lock.and_then(|v| {
            Some(
                v["packages"]["node_modules/ws"]["version"]
                    .as_str()?
                    .to_string(),
            )
        }),
        git_rev: cmd_output("git", &["rev-parse", "--short", "HEAD"]),
        git_dirty: cmd_output("git", &git_status).map(|s| !s.is_empty()),
    }
}

/// A path flag with a default.
fn path(a: &Args, name: &str, default: &str) -> PathBuf {
    PathBuf::from(a.opt_str(name).unwrap_or_else(|| default.to_string()))
}

/// The server variants to run, from `--servers`.
fn server_kinds(a: &Args) -> Result<Vec<ServerKind>, String> {
    let chatroom_bin = a
        .opt_str("chatroom")
        .unwrap_or_else(|| "target/release/chatroom".to_string());
    let node_dir = path(a, "node-peer", "bench/peers/node-ws");
    let node = a.opt_str("node").unwrap_or_else(|| "node".to_string());
    let servers = a
        .opt_str("servers")
        .unwrap_or_else(|| "chatroom,chatroom_store,node".to_string());
    let mut kinds = Vec::new();
    for s in servers.split(',') {
        let chatroom = s.starts_with("chatroom");
        if chatroom && !Path::new(&chatroom_bin).exists() {
            return Err(format!(
                "{chatroom_bin} not found: build it with cargo build --release"
            ));
        }
        if !chatroom && !node_dir.join("node_modules/ws").exists() {
            return Err(format!("{}: run npm ci there first", node_dir.display()));
        }
        // Always say where history goes: the default is a directory in the cwd. The store
        // variant gets `--data DIR` per run (see `fresh_data_dir`).
        let flags = "--addr 127.0.0.1:0 --ws-addr 127.0.0.1:0 --rate-limit off --log-level warn";
        let (name, cmd) = match s {
            "chatroom" => ("chatroom", format!("{chatroom_bin} {flags} --data none")),
            "chatroom_store" => ("chatroom_store", format!("{chatroom_bin} {flags}")),
            "node" => (
                "node",
                format!("{node} {} --port 0", node_dir.join("server.js").display()),
            ),
            other => return Err(format!("unknown server {other:?}")),
        };
        kinds.push(ServerKind {
            name,
            cmd: sv(&cmd),
            chatroom,
            store: name == "chatroom_store",
        });
    }
    Ok(kinds)
}

/// `chatroom-bench suite …`: runs everything and writes the results and the markdown; whether
/// a target check failed.
pub fn main(a: &Args) -> Result<bool, String> {
    let quick = a.flag("quick");
    let reps: usize = a.get("reps", if quick { 1 } else { 3 })?;
    let store_reps: usize = a.get("store-reps", if quick { reps } else { reps.max(7) })?;
    let node = a.opt_str("node").unwrap_or_else(|| "node".to_string());
    let node_dir = path(a, "node-peer", "bench/peers/node-ws");
    // A quick run must not overwrite the full run's figures.
    let (def_json, def_md) = match quick {
        true => (
            "target/bench-quick/results.json",
            "target/bench-quick/BENCHMARKS.md",
        ),
        false => ("bench/results.json", "BENCHMARKS.md"),
    };
    let (out_json, out_md) = (path(a, "out-json", def_json), path(a, "out-md", def_md));
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
    let notes = path(a, "notes", "bench/NOTES.md");
    let log_dir = path(a, "logs", "target/bench-logs");
    let only: Option<Vec<String>> = a
        .opt_str("only")
        .map(|s| s.split(',').map(str::to_string).collect());
    let (no_pin, pin_all) = (a.flag("no-pin"), a.flag("pin-all"));
    let data_root = a
        .opt_str("data-root")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let kinds = server_kinds(a)?;
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
    let wls: Vec<Workload> = workloads(quick)
        .into_iter()
        .filter(|w| only.as_ref().is_none_or(|o| o.iter().any(|x| x == w.id)))
        .collect();

    let started = cmd_output("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]).unwrap_or_default();
    // Before the runs: the revision that was built, not whatever is checked out at the end.
    let machine = machine_info(&node, &node_dir);
    let t_all = Instant::now();
    // runs[workload][server]
    let mut runs: Vec<Vec<Vec<RawRun>>> = wls
        .iter()
        .map(|_| kinds.iter().map(|_| Vec::new()).collect())
        .collect();
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
                let data_dir = match k
                    .store
                    .then(|| fresh_data_dir(&data_root, &tag))
                    .transpose()
                {
                    Ok(d) => d,
                    Err(e) => {
                        eprintln!("ERROR {e}");
                        runs[wi][si].push(RawRun {
                            tag,
                            noise: Noise::default(),
                            disk_bytes: None,
                            result: Err(e),
                        });
                        continue;
                    }
                };
                if let Some(d) = &data_dir {
                    extra.extend(["--data".to_string(), d.display().to_string()]);
                }
                let (server_cpu, client_cpu) = match can_pin && (w.pin || pin_all) {
                    true => (Some(0), Some(1)),
                    false => (None, None),
                };
                let mut run = match start_server(k, &extra, &log_dir, &tag, server_cpu) {
                    Ok(srv) => {
                        thread::sleep(Duration::from_millis(200));
                        let run = run_one(&exe, w, k, &srv, &log_dir, &tag, client_cpu);
                        stop(srv.child, srv.pid);
                        run
                    }
                    Err(e) => RawRun {
                        tag,
                        noise: Noise::default(),
                        disk_bytes: None,
                        result: Err(e),
                    },
                };
                if let Some(d) = &data_dir {
                    run.disk_bytes = Some(dir_bytes(d));
                    if let Err(e) = fs::remove_dir_all(d) {
                        eprintln!("suite: cannot remove {}: {e}", d.display());
                    }
                }
                eprintln!("{}", report::progress(w.id, &run));
                runs[wi][si].push(run);
                // Let TIME_WAIT sockets and the scheduler settle between runs.
                thread::sleep(Duration::from_millis(500));
            }
        }
    }

    let mut workloads = report::no_workloads();
    for (w, runs) in wls.iter().zip(runs) {
        let mut by_server = BTreeMap::new();
        for (k, runs) in kinds.iter().zip(runs).filter(|(_, r)| !r.is_empty()) {
            by_server.insert(k.name, runs);
        }
        let flags = [
            &w.args,
            &w.chatroom_args,
            &w.node_args,
            &w.chatroom_server_args,
        ]
        .map(|f| f.join(" "));
        report::file(&mut workloads, w.id, w.title, flags, by_server)?;
    }
    let results = Results {
        schema: SCHEMA.to_string(),
        generated: started,
        quick,
        reps: reps as u64,
        store_reps: store_reps as u64,
        total_s: round(t_all.elapsed().as_secs_f64(), 1),
        json_link,
        pinned: wls
            .iter()
            .filter(|w| can_pin && (w.pin || pin_all))
            .map(|w| w.id.to_string())
            .collect(),
        machine,
        servers: kinds
            .iter()
            .map(|k| ServerCommand {
                name: k.name.to_string(),
                command: k.cmd.join(" ") + if k.store { " --data DIR" } else { "" },
            })
            .collect(),
        store_data_root: data_root.display().to_string(),
        workloads,
    };
    fs::write(&out_json, results.to_json()).map_err(|e| format!("{}: {e}", out_json.display()))?;
    let failed = write_markdown(&results, &notes, &out_md)?;
    eprintln!(
        "suite: wrote {} and {} in {:.0} s",
        out_json.display(),
        out_md.display(),
        t_all.elapsed().as_secs_f64()
    );
    Ok(failed)
}

/// Writes the markdown and prints every check, then the failed ones again; whether any failed.
fn write_markdown(results: &Results, notes: &Path, out_md: &Path) -> Result<bool, String> {
    let checks = report::checks(results);
    let notes_text = fs::read_to_string(notes).ok();
    fs::write(
        out_md,
        report::markdown(results, &checks, notes_text.as_deref()),
    )
    .map_err(|e| format!("{}: {e}", out_md.display()))?;
    for c in &checks {
        eprintln!(
            "  {:4} {} — {}: {}",
            c.verdict.word(),
            c.workload,
            c.target,
            c.value
        );
    }
    let failed: Vec<&report::Check> = checks
        .iter()
        .filter(|c| c.verdict == report::Verdict::Fail)
        .collect();
    if !failed.is_empty() {
        eprintln!("suite: {} target check(s) FAILED:", failed.len());
        for c in &failed {
            eprintln!("  FAIL {} — {}: {}", c.workload, c.target, c.value);
        }
    }
    Ok(report::failed(&checks))
}

/// `chatroom-bench report [--json bench/results.json] [--out-md BENCHMARKS.md] [--notes bench/NOTES.md]`
/// rewrites the markdown from a results file, e.g. after editing the notes, and the file itself
/// in its canonical layout. A results file that does not parse is an error; failed checks are
/// printed, and do not change the exit code.
pub fn report_main(a: &Args) -> Result<(), String> {
    let json = path(a, "json", "bench/results.json");
    let (out_md, notes) = (
        path(a, "out-md", "BENCHMARKS.md"),
        path(a, "notes", "bench/NOTES.md"),
    );
    a.finish()?;
    let text = fs::read_to_string(&json).map_err(|e| format!("{}: {e}", json.display()))?;
    let results = Results::parse(&text).map_err(|e| format!("{}: {e}", json.display()))?;
    fs::write(&json, results.to_json()).map_err(|e| format!("{}: {e}", json.display()))?;
    write_markdown(&results, &notes, &out_md).map(|_| ())
}
