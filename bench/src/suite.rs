//! The benchmark suite: starts each server on free ports, runs every workload against it as a
//! child process of this binary, repeats, takes medians, checks the targets and writes
//! `bench/results.json` and `BENCHMARKS.md`. Stops everything it started, by pid.
//!
//! The servers: `chatroom` (this build, history in memory only: `--data none`),
//! `chatroom_before` (the build before issue 10, `--before-bin`, also `--data none`),
//! `chatroom_store` (this build writing history to SQLite in a fresh directory under the temp
//! dir, `--data DIR`, created for each run and removed after it) and `node` (the Node peer).
//! The servers of one repetition run back to back, in reverse order every other repetition, so
//! that noise hits each pair alike.

use crate::checks::{checks, Verdict};
use crate::client::round;
use crate::procfs;
use crate::report;
use crate::results::{series, Machine, Noise, Results, SCHEMA};
use crate::Args;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// `workloads![id "title" timeout "flags" [server "load flags" "server flags", …]; …]`: the
/// workloads, the load generator's flags, and each server that runs it with its own extra
/// load-generator and server flags. `{full|quick}` picks the full or the quick size ([`pick`]).
macro_rules! workloads {
    ($($id:literal $title:literal $t:literal $args:literal [$($s:literal $l:literal $f:literal),*];)*) => {
        &[$(($id, $title, $t, $args, &[$(($s, $l, $f)),*])),*]
    };
}
type PerServer = &'static [(&'static str, &'static str, &'static str)];
const WORKLOADS: &[(&str, &str, u64, &str, PerServer)] = workloads![
    "w1" "Fan-out at full speed" 120 "fanout --clients 100 --senders 10 --window 8 --duration {10|2.5}"
        ["chatroom" "" "", "chatroom_before" "" "", "chatroom_store" "" "", "node" "" ""];
    "w2" "Moderate load" 120 "moderate --rooms 20 --per-room 20 --senders-per-room 2 --rate 20 --duration {10|3}"
        ["chatroom" "" "", "chatroom_before" "" "", "chatroom_store" "" "", "node" "" ""];
    "w3" "Capacity (idle clients)" 300 "capacity --clients {15000|1500} --memory-at {7000|1000} --checkpoint {1000|500} --smaps"
        ["chatroom" "--extra {500|200}" "{|--max-clients 1500}",
         "chatroom_before" "--clients {7000|1500} --extra {500|200}" "{|--max-clients 1500}", "node" "--extra 0" ""];
    "w4" "Join storm" 120 "joinstorm --clients {1000|500}" ["chatroom" "" "", "chatroom_before" "" "", "node" "" ""];
    "w5" "Slow consumer" 180 "moderate --rooms 20 --per-room 20 --senders-per-room 2 --rate 20 --duration {40|5} --slow --slow-pad 3900"
        ["chatroom" "" "", "chatroom_before" "" "", "node" "" ""];
    "w6" "Churn" 300 "churn --rounds {10|3} --clients {1000|500} --room-size 100" ["chatroom" "" "", "chatroom_before" "" "", "node" "" ""];
    "w7" "Store throughput" 120 "fanout --rooms 100 --clients 1 --senders 1 --window 8 --duration {10|3} --room store"
        ["chatroom" "" "", "chatroom_store" "" ""];
    "w8" "Soak: bad clients churning" 900 "soak --duration {600|60} --workers 64" ["chatroom" "" ""];
];

/// Servers in the order one repetition runs them (chatroom next to both of its pairs).
const ORDER: [&str; 4] = ["chatroom_before", "chatroom", "chatroom_store", "node"];

/// `{full|quick}` → `full` or `quick`, everywhere in `s`.
fn pick(s: &str, quick: bool) -> String {
    let (mut out, mut rest) = (String::new(), s);
    while let (Some(a), Some(b)) = (rest.find('{'), rest.find('}')) {
        let (full, small) = rest[a + 1..b].split_once('|').unwrap_or(("", ""));
        out += &rest[..a];
        out += if quick { small } else { full };
        rest = &rest[b + 1..];
    }
    out + rest
}

fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

/// One run as the suite saw it, before its figures are typed (see [`report::typed`]): its
/// noise, the database's size after a clean stop (store-on runs), and the workload's figures
/// as it printed them, or why there are none.
pub struct RawRun {
    pub tag: String,
    pub noise: Noise,
    pub disk_bytes: Option<u64>,
    pub result: Result<Value, String>,
}

/// An I/O error, with the path it concerns.
fn at(p: &Path) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{}: {e}", p.display())
}

/// Starts `cmd` (on CPU `cpu` with `taskset`, which execs it: the pid stays the program's),
/// its output into `<logs>/<tag>.{out,err}`; the child and its stdout file.
fn spawn(
    cmd: &[String],
    cpu: Option<usize>,
    logs: &Path,
    tag: &str,
) -> Result<(Child, PathBuf), String> {
    let mut c = Command::new(if cpu.is_some() { "taskset" } else { &cmd[0] });
    if let Some(n) = cpu {
        c.args(["-c", &n.to_string(), &cmd[0]]);
    }
    let (out, err) = (
        logs.join(format!("{tag}.out")),
        logs.join(format!("{tag}.err")),
    );
    let file = |p: &Path| File::create(p).map_err(at(p));
    c.args(&cmd[1..])
        .stdin(Stdio::null())
        .stdout(file(&out)?)
        .stderr(file(&err)?);
    let child = c
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", cmd.join(" ")))?;
    Ok((child, out))
}

/// Waits up to `limit` for `child` to end; whether it did.
fn wait(child: &mut Child, limit: Duration) -> bool {
    let t = Instant::now();
    while matches!(child.try_wait(), Ok(None)) {
        if t.elapsed() >= limit {
            return false;
        }
        sleep(Duration::from_millis(20));
    }
    true
}

/// SIGTERM by pid, up to 5 s to exit, then SIGKILL.
fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    if !wait(&mut child, Duration::from_secs(5)) {
        eprintln!(
            "suite: pid {} ignored SIGTERM for 5 s; killing it",
            child.id()
        );
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Starts a server and reads its addresses from its first line, `listening [http=A] ws=B`.
fn start_server(
    cmd: &[String],
    cpu: Option<usize>,
    logs: &Path,
    tag: &str,
) -> Result<(Child, String, String), String> {
    let (mut child, out) = spawn(cmd, cpu, logs, &format!("{tag}.server"))?;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) && matches!(child.try_wait(), Ok(None)) {
        let text = fs::read_to_string(&out).unwrap_or_default();
        let line = text.lines().next().unwrap_or("");
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .map(String::from)
        };
        if let Some(ws) = field("ws=") {
            let http = field("http=").unwrap_or(ws.clone());
            return Ok((child, ws, http));
        }
        sleep(Duration::from_millis(20));
    }
    stop(child);
    Err(format!(
        "{cmd:?}: no listening line within 20 s (see {})",
        out.display()
    ))
}

/// Busy and total CPU seconds of the whole machine, from /proc/stat.
fn machine_cpu() -> Option<(f64, f64)> {
    let s = fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<f64> = s
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is inside user).
    let (total, tck) = (v.iter().take(8).sum::<f64>(), procfs::clk_tck());
    Some(((total - v.get(3)? - v.get(4)?) / tck, total / tck))
}

/// Runs the load generator `args` against server `pid` (on CPU `cpu`), for at most `limit`:
/// its figures plus the suite's noise figures. Its stdout stays in `<logs>/<tag>.out`.
fn run_load(
    args: &[String],
    pid: u32,
    cpu: Option<usize>,
    limit: Duration,
    logs: &Path,
    tag: &str,
) -> RawRun {
    let loadavg = fs::read_to_string("/proc/loadavg").ok();
    let loadavg = loadavg.and_then(|s| s.split_whitespace().next()?.parse().ok());
    let (m0, s0, t0) = (machine_cpu(), procfs::cpu_secs(Some(pid)), Instant::now());
    let result = spawn(args, cpu, logs, tag).and_then(|(mut child, out)| {
        if !wait(&mut child, limit) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("timed out after {} s", limit.as_secs()));
        }
        let text = fs::read_to_string(out).unwrap_or_default();
        let line = text
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .ok_or("no output")?;
        serde_json::from_str::<Value>(line).map_err(|e| format!("bad JSON: {e}"))
    });
    let (s1, m1) = (procfs::cpu_secs(Some(pid)), machine_cpu());
    // CPU used on this machine by everything except the server and the load generator while
    // the workload ran, as a share of the machine: the noise.
    let client = result
        .as_ref()
        .ok()
        .and_then(|v| v["load_generator_cpu_s"].as_f64());
    let other_cpu_share = match (m0, m1, s0, s1, client) {
        (Some(a), Some(b), Some(s0), Some(s1), Some(c)) if b.1 > a.1 => {
            Some(round(((b.0 - a.0) - (s1 - s0) - c) / (b.1 - a.1), 3))
        }
        _ => None,
    };
    let wall_s = Some(round(t0.elapsed().as_secs_f64(), 2));
    let noise = Noise {
        loadavg_1m_before: loadavg,
        other_cpu_share,
        wall_s,
    };
    let result = match procfs::alive(pid) {
        true => result.map(|mut v| v["result"].take()),
        false => Err("the server died during the run".into()),
    };
    RawRun {
        tag: tag.into(),
        noise,
        disk_bytes: None,
        result,
    }
}

/// A command's trimmed stdout, if it ran and succeeded.
fn cmd_output(cmd: &str, args: &[&str]) -> Option<String> {
    let o = Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    Some(String::from_utf8(o.stdout).ok()?.trim().to_string())
}

fn machine_info(node: &str, node_dir: &Path) -> Machine {
    let read = |p: &Path| fs::read_to_string(p).ok().map(|s| s.trim().to_string());
    let proc = |p: &str| read(Path::new(p));
    let field = |file: &str, key: &str| {
        let text = proc(file)?;
        let value = text.lines().find_map(|l| l.strip_prefix(key))?;
        Some(value.trim_start_matches([' ', '\t', ':']).to_string())
    };
    let mem_kib = field("/proc/meminfo", "MemTotal")
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok());
    let lock = read(&node_dir.join("package-lock.json"))
        .and_then(|s| serde_json::from_str::<Value>(&s).ok());
    let ws_version = lock.and_then(|v| {
        Some(
            v["packages"]["node_modules/ws"]["version"]
                .as_str()?
                .to_string(),
        )
    });
    let dirty = cmd_output(
        "git",
        &[
            "status",
            "--porcelain",
            "--",
            "src",
            "Cargo.toml",
            "Cargo.lock",
        ],
    );
    Machine {
        nproc: std::thread::available_parallelism().map(|n| n.get()).ok(),
        cpu_model: field("/proc/cpuinfo", "model name"),
        mem_gib: mem_kib.map(|k| round(k / 1048576.0, 1)),
        kernel: proc("/proc/sys/kernel/osrelease"),
        rlimit_nofile: cmd_output("sh", &["-c", "ulimit -n"]),
        vm_max_map_count: proc("/proc/sys/vm/max_map_count"),
        pid_max: proc("/proc/sys/kernel/pid_max"),
        rustc: cmd_output("rustc", &["--version"]),
        node: cmd_output(node, &["--version"]),
        ws_package: ws_version,
        git_rev: cmd_output("git", &["rev-parse", "--short", "HEAD"]),
        git_dirty: dirty.map(|s| !s.is_empty()),
    }
}

/// A path flag with a default.
fn path(a: &Args, name: &str, default: &str) -> PathBuf {
    PathBuf::from(a.opt_str(name).unwrap_or_else(|| default.to_string()))
}

/// Each server's command line (without the store-on run's `--data DIR`).
fn server_commands(
    a: &Args,
    servers: &str,
    node: &str,
    node_dir: &Path,
) -> Result<BTreeMap<&'static str, Vec<String>>, String> {
    let chatroom = a
        .opt_str("chatroom")
        .unwrap_or("target/release/chatroom".into());
    let before = a.opt_str("before-bin");
    // Always say where history goes: the default is a directory in the cwd. The store variant
    // gets `--data DIR` per run.
    let flags = "--addr 127.0.0.1:0 --ws-addr 127.0.0.1:0 --rate-limit off --log-level warn";
    let mut out = BTreeMap::new();
    for s in servers.split(',') {
        let (bin, data) = match s {
            // The load comes from one address: lift the per-address limits (the "before"
            // build has none, and no such flags).
            "chatroom" => (
                Some(&chatroom),
                " --data none --max-per-ip off --handshake-rate off",
            ),
            "chatroom_before" => (before.as_ref(), " --data none"),
            "chatroom_store" => (Some(&chatroom), " --max-per-ip off --handshake-rate off"),
            "node" => (None, ""),
            other => return Err(format!("unknown server {other:?}")),
        };
        let cmd = match bin {
            Some(bin) if Path::new(bin).exists() => format!("{bin} {flags}{data}"),
            Some(bin) => return Err(format!("{bin} not found: build it (bench/run.sh does)")),
            None if s != "node" => return Err("chatroom_before needs --before-bin PATH".into()),
            None if node_dir.join("node_modules/ws").exists() => {
                format!("{node} {} --port 0", node_dir.join("server.js").display())
            }
            None => return Err(format!("{}: run npm ci there first", node_dir.display())),
        };
        out.insert(
            ORDER.into_iter().find(|o| *o == s).unwrap_or("node"),
            words(&cmd),
        );
    }
    Ok(out)
}

/// `chatroom-bench suite …`: runs everything and writes the results and the markdown; whether
/// a target check failed.
pub fn main(a: &Args) -> Result<bool, String> {
    let quick = a.flag("quick");
    let reps: usize = a.get("reps", if quick { 1 } else { 3 })?;
    let store_reps: usize = a.get("store-reps", if quick { reps } else { reps.max(7) })?;
    let node = a.opt_str("node").unwrap_or("node".into());
    let node_dir = path(a, "node-peer", "bench/peers/node-ws");
    // A quick run must not overwrite the full run's figures.
    let (dir, json_dir) = if quick {
        ("target/bench-quick/", "target/bench-quick/")
    } else {
        ("", "bench/")
    };
    let out_json = path(a, "out-json", &format!("{json_dir}results.json"));
    let out_md = path(a, "out-md", &format!("{dir}BENCHMARKS.md"));
    // How the markdown links to the JSON.
    let json_link = match (out_md.parent(), out_json.parent(), out_json.file_name()) {
        (Some(a), Some(b), Some(name)) if a == b => name.to_string_lossy().to_string(),
        _ => out_json.display().to_string(),
    };
    let (notes, logs) = (
        path(a, "notes", "bench/NOTES.md"),
        path(a, "logs", "target/bench-logs"),
    );
    let only = a.opt_str("only");
    let data_root = a
        .opt_str("data-root")
        .map_or_else(std::env::temp_dir, PathBuf::from);
    let all = [
        "chatroom,chatroom_store,node",
        "chatroom,chatroom_before,chatroom_store,node",
    ];
    let default = all[usize::from(a.opt_str("before-bin").is_some())];
    let servers = a.opt_str("servers").unwrap_or(default.into());
    let kinds = server_commands(a, &servers, &node, &node_dir)?;
    let no_pin = a.flag("no-pin");
    a.finish()?;
    for d in [out_json.parent(), out_md.parent(), Some(&logs)]
        .into_iter()
        .flatten()
    {
        if !d.as_os_str().is_empty() {
            fs::create_dir_all(d).map_err(at(d))?;
        }
    }
    let exe = std::env::current_exe()
        .map_err(|e| e.to_string())?
        .display()
        .to_string();
    // W1 compares CPU per delivery: the server on CPU 0, the load generator on CPU 1.
    let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
    let can_pin = !no_pin && nproc >= 2 && cmd_output("taskset", &["-c", "0", "true"]).is_some();
    let chosen =
        |w: &&(&str, _, _, _, _)| only.as_ref().is_none_or(|o| o.split(',').any(|x| x == w.0));
    let wls: Vec<_> = WORKLOADS.iter().filter(chosen).collect();

    let started = cmd_output("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]).unwrap_or_default();
    // Before the runs: the revision that was built, not whatever is checked out at the end.
    let machine = machine_info(&node, &node_dir);
    let t_all = Instant::now();
    let mut runs: BTreeMap<&str, BTreeMap<String, Vec<Value>>> = BTreeMap::new();
    for rep in 0..reps.max(store_reps) {
        for &&(id, _, timeout, args, per_server) in &wls {
            let runs_here = |s: &&str| {
                // Repetitions past `reps` are only for the store's pairs (W1, W2); the soak
                // is long enough to be its own repetition.
                let store_pair = matches!((id, *s), ("w1" | "w2", "chatroom" | "chatroom_store"));
                kinds.contains_key(s) && (rep < reps || store_pair) && (id != "w8" || rep == 0)
            };
            let mut order: Vec<_> = per_server.iter().filter(|p| runs_here(&p.0)).collect();
            order.sort_by_key(|p| ORDER.iter().position(|o| *o == p.0));
            if rep % 2 == 1 {
                order.reverse();
            }
            for &(server, load_flags, server_flags) in order {
                let tag = format!("{id}-{server}-r{}", rep + 1);
                eprint!("suite: {tag} … ");
                let mut cmd = kinds[server].clone();
                cmd.extend(words(&pick(server_flags, quick)));
                let data = (server == "chatroom_store").then(|| {
                    data_root.join(format!("chatroom-bench-{}-{tag}", std::process::id()))
                });
                if let Some(d) = &data {
                    let _ = fs::remove_dir_all(d);
                    fs::create_dir_all(d).map_err(at(d))?;
                    cmd.extend(["--data".into(), d.display().to_string()]);
                }
                let [srv_cpu, load_cpu] = [0, 1].map(|c| Some(c).filter(|_| can_pin && id == "w1"));
                let mut run = match start_server(&cmd, srv_cpu, &logs, &tag) {
                    Ok((child, ws, http)) => {
                        sleep(Duration::from_millis(200));
                        let mut load = vec![exe.clone()];
                        load.extend(words(&pick(args, quick)));
                        let pid = child.id().to_string();
                        load.extend(
                            ["--ws", &ws, "--http", &http, "--pid", &pid].map(String::from),
                        );
                        load.extend(words(&pick(load_flags, quick)));
                        let limit = Duration::from_secs(timeout);
                        let run = run_load(&load, child.id(), load_cpu, limit, &logs, &tag);
                        stop(child);
                        run
                    }
                    Err(e) => RawRun {
                        tag: tag.clone(),
                        noise: Noise::default(),
                        disk_bytes: None,
                        result: Err(e),
                    },
                };
                if let Some(d) = &data {
                    let files = fs::read_dir(d).into_iter().flatten().flatten();
                    run.disk_bytes = Some(files.map(|e| e.metadata().map_or(0, |m| m.len())).sum());
                    if let Err(e) = fs::remove_dir_all(d) {
                        eprintln!("suite: cannot remove {}: {e}", d.display());
                    }
                }
                let (run, line) = report::typed(id, run);
                eprintln!("{line}");
                runs.entry(id)
                    .or_default()
                    .entry(server.into())
                    .or_default()
                    .push(run);
                // Let TIME_WAIT sockets and the scheduler settle between runs.
                sleep(Duration::from_millis(500));
            }
        }
    }

    // Every workload as JSON, typed in one go: a renamed or missing field fails here.
    let mut workloads = serde_json::Map::new();
    for &&(id, title, _, args, per_server) in &wls {
        let runs = runs.remove(id).unwrap_or_default();
        let flags = |i: usize| {
            let flags = per_server.iter().map(|p| (p.0, pick([p.1, p.2][i], quick)));
            flags
                .filter(|(s, f)| !f.is_empty() && runs.contains_key(*s))
                .collect::<BTreeMap<_, _>>()
        };
        let (load_flags, server_flags, command) = (flags(0), flags(1), pick(args, quick));
        let servers: serde_json::Map<_, _> =
            runs.into_iter().map(|(k, r)| (k, series(r))).collect();
        let w = json!({ "title": title, "command": command, "load_flags": load_flags, "server_flags": server_flags, "servers": servers });
        workloads.insert(id.into(), w);
    }
    let workloads =
        serde_json::from_value(workloads.into()).map_err(|e| format!("results: {e}"))?;
    let store_data = |k: &&str| {
        if *k == "chatroom_store" {
            " --data DIR"
        } else {
            ""
        }
    };
    let servers = kinds
        .iter()
        .map(|(k, c)| (k.to_string(), c.join(" ") + store_data(k)));
    let results = Results {
        schema: SCHEMA.into(),
        generated: started,
        quick,
        reps: reps as u64,
        store_reps: store_reps as u64,
        total_s: round(t_all.elapsed().as_secs_f64(), 1),
        json_link,
        pinned: if can_pin { vec!["w1".into()] } else { vec![] },
        machine,
        servers: servers.collect(),
        store_data_root: data_root.display().to_string(),
        workloads,
    };
    fs::write(&out_json, results.to_json()).map_err(at(&out_json))?;
    let failed = write_markdown(&results, &notes, &out_md)?;
    let (j, m, t) = (
        out_json.display(),
        out_md.display(),
        t_all.elapsed().as_secs_f64(),
    );
    eprintln!("suite: wrote {j} and {m} in {t:.0} s");
    Ok(failed)
}

/// Writes the markdown and prints every check, then the failed ones again; whether any failed.
fn write_markdown(results: &Results, notes: &Path, out_md: &Path) -> Result<bool, String> {
    let checks = checks(results);
    let notes = fs::read_to_string(notes).ok();
    fs::write(out_md, report::markdown(results, &checks, notes.as_deref())).map_err(at(out_md))?;
    for c in &checks {
        eprintln!(
            "  {:4} {} — {}: {}",
            c.verdict.word(),
            c.workload,
            c.target,
            c.value
        );
    }
    let bad: Vec<_> = checks
        .iter()
        .filter(|c| c.verdict == Verdict::Fail)
        .collect();
    if !bad.is_empty() {
        eprintln!("suite: {} target check(s) FAILED:", bad.len());
        for c in &bad {
            eprintln!("  FAIL {} — {}: {}", c.workload, c.target, c.value);
        }
    }
    Ok(!bad.is_empty())
}

/// `chatroom-bench report [--json bench/results.json] [--out-md BENCHMARKS.md] [--notes bench/NOTES.md]`
/// rewrites the markdown from a results file, e.g. after editing the notes, and the file itself
/// in its canonical layout. A results file that does not parse is an error; failed checks are
/// printed, and do not change the exit code.
pub fn report_main(a: &Args) -> Result<(), String> {
    let (json, out_md) = (
        path(a, "json", "bench/results.json"),
        path(a, "out-md", "BENCHMARKS.md"),
    );
    let notes = path(a, "notes", "bench/NOTES.md");
    a.finish()?;
    let text = fs::read_to_string(&json).map_err(at(&json))?;
    let results = Results::parse(&text).map_err(|e| format!("{}: {e}", json.display()))?;
    fs::write(&json, results.to_json()).map_err(at(&json))?;
    write_markdown(&results, &notes, &out_md).map(|_| ())
}
