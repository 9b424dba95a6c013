//! The benchmark suite: starts each server on free ports, runs every workload against it as a
//! child process of this binary, repeats, takes medians, checks the targets and writes
//! `bench/results.json` and `BENCHMARKS.md`. Stops everything it started, by pid.
//!
//! The servers: `chatroom` (this build, history in memory only: `--data none`),
//! `chatroom_before` (the build before issue 10, `--before-bin`, also `--data none`),
//! `chatroom_store` (this build writing history to SQLite in a fresh directory under the temp
//! dir, `--data DIR`, created for each run and removed after it), `chatroom_redis` (two
//! processes of this build sharing rooms through a redis-server started for each run: W9) and
//! `node` (the Node peer). The servers of one repetition run back to back, in reverse order every other repetition, so
//! that noise hits each pair alike.

use crate::checks::{checks, Check, Verdict};
use crate::client::round;
use crate::procfs;
use crate::report;
use crate::results::{series, Machine, Noise, Results, SCHEMA};
use crate::Args;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::TcpStream;
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
type Wl = (&'static str, &'static str, u64, &'static str, PerServer);
const WORKLOADS: &[Wl] = workloads![
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
    "w9" "W2 over two processes on one Redis" 120 "moderate --rooms 20 --per-room 20 --senders-per-room 2 --rate 20 --duration {10|3}"
        ["chatroom" "" "", "chatroom_redis" "" ""];
];

/// Servers in the order one repetition runs them (chatroom next to both of its pairs).
const ORDER: [&str; 5] = [
    "chatroom_before",
    "chatroom",
    "chatroom_store",
    "chatroom_redis",
    "node",
];

/// `chatroom_redis`: how many chatroom processes share the redis-server.
const CLUSTER_PROCESSES: usize = 2;
/// How long a redis-server may take to answer its first PING.
const REDIS_START: Duration = Duration::from_secs(10);

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

impl RawRun {
    fn new(tag: String, (noise, result): Ran) -> RawRun {
        let disk_bytes = None;
        RawRun {
            tag,
            noise,
            disk_bytes,
            result,
        }
    }
}

/// A run's noise and its figures (or why there are none).
type Ran = (Noise, Result<Value, String>);
/// Each server's command line.
type Cmds = BTreeMap<&'static str, Vec<String>>;

/// An I/O error, with the path it concerns.
fn at(p: &Path) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{}: {e}", p.display())
}

/// Starts `cmd` (on CPU `cpu` with `taskset`, which execs it: the pid stays the program's),
/// its output into `<log>.out` and `<log>.err`; the child and its stdout file.
fn spawn(cmd: &[String], cpu: Option<usize>, log: &str) -> Result<(Child, PathBuf), String> {
    let mut c = Command::new(if cpu.is_some() { "taskset" } else { &cmd[0] });
    if let Some(n) = cpu {
        c.args(["-c", &n.to_string(), &cmd[0]]);
    }
    let (out, err) = (PathBuf::from(format!("{log}.out")), format!("{log}.err"));
    let file = |p: &Path| File::create(p).map_err(at(p));
    c.args(&cmd[1..]).stdin(Stdio::null());
    c.stdout(file(&out)?).stderr(file(Path::new(&err))?);
    let cannot = |e| format!("cannot start {cmd:?}: {e}");
    Ok((c.spawn().map_err(cannot)?, out))
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

/// Starts a server (see [`spawn`]) into `procs` and waits up to 20 s for its first line,
/// `listening [http=A] ws=B`: A (B for a server with one port) and B.
fn start(cmd: &[String], cpu: Option<usize>, log: &str, procs: &mut Vec<Child>) -> Started {
    let (child, out) = spawn(cmd, cpu, log)?;
    procs.push(child);
    let (t, child) = (Instant::now(), procs.last_mut().expect("just pushed"));
    while t.elapsed().as_secs() < 20 && matches!(child.try_wait(), Ok(None)) {
        sleep(Duration::from_millis(20));
        let text = fs::read_to_string(&out).unwrap_or_default();
        let first = text.lines().next().unwrap_or("");
        let words: Vec<&str> = first.split_whitespace().collect();
        let field = |k: &str| words.iter().find_map(|w| w.strip_prefix(k));
        if let Some(ws) = field("ws=") {
            return Ok((field("http=").unwrap_or(ws).to_string(), ws.to_string()));
        }
    }
    let out = out.display();
    Err(format!(
        "{cmd:?}: no listening line within 20 s (see {out})"
    ))
}

/// A started server's addresses (http, ws), or why it did not start.
type Started = Result<(String, String), String>;

/// Whether a Redis on 127.0.0.1:`port` answers PING.
fn redis_pong(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let mut reply = [0u8; 5];
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut reply).is_ok() && &reply == b"+PONG"
}

/// SIGTERM by pid, up to 5 s to exit, then SIGKILL.
fn stop(mut child: Child) {
    let pid = child.id();
    let _ = Command::new("kill").arg(pid.to_string()).status();
    if !wait(&mut child, Duration::from_secs(5)) {
        eprintln!("suite: pid {pid} ignored SIGTERM for 5 s; killing it");
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Busy and total CPU seconds of the whole machine, from /proc/stat.
fn machine_cpu() -> Option<(f64, f64)> {
    let s = fs::read_to_string("/proc/stat").ok()?;
    let cpu = s.lines().next()?.split_whitespace().skip(1);
    let v: Vec<f64> = cpu.filter_map(|t| t.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest is inside user).
    let (total, tck) = (v.iter().take(8).sum::<f64>(), procfs::clk_tck());
    Some(((total - v.get(3)? - v.get(4)?) / tck, total / tck))
}

/// Runs the load generator `args` against the server processes `pids` (on CPU `cpu`), for at
/// most `limit`: the suite's noise figures and the workload's. Its stdout stays in `<log>.out`.
fn run_load(args: &[String], pids: &[u32], cpu: Option<usize>, limit: u64, log: &str) -> Ran {
    let loadavg = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let loadavg = loadavg.split(' ').next().and_then(|s| s.parse().ok());
    let cpu_of = |p: &u32| procfs::cpu_secs(Some(*p));
    let servers = || pids.iter().map(cpu_of).sum::<Option<f64>>();
    let (m0, s0, t0) = (machine_cpu(), servers(), Instant::now());
    let result = spawn(args, cpu, log).and_then(|(mut child, out)| {
        if !wait(&mut child, Duration::from_secs(limit)) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("timed out after {limit} s"));
        }
        let text = fs::read_to_string(out).unwrap_or_default();
        let line = text.lines().rev().find(|l| l.starts_with('{'));
        let bad = |e| format!("bad JSON: {e}");
        serde_json::from_str::<Value>(line.ok_or("no output")?).map_err(bad)
    });
    let (s1, m1) = (servers(), machine_cpu());
    // CPU used on this machine by everything except the server and the load generator while
    // the workload ran, as a share of the machine: the noise.
    let client = result.as_ref().map(|v| v["load_generator_cpu_s"].as_f64());
    let other_cpu_share = match (m0, m1, s0, s1, client.unwrap_or_default()) {
        (Some(a), Some(b), Some(s0), Some(s1), Some(c)) if b.1 > a.1 => {
            Some(round(((b.0 - a.0) - (s1 - s0) - c) / (b.1 - a.1), 3))
        }
        _ => None,
    };
    let noise = Noise {
        loadavg_1m_before: loadavg,
        other_cpu_share,
        wall_s: Some(round(t0.elapsed().as_secs_f64(), 2)),
    };
    let result = match pids.iter().all(|&p| procfs::alive(p)) {
        true => result.map(|mut v| v["result"].take()),
        false => Err("the server died during the run".into()),
    };
    (noise, result)
}

/// A command's trimmed stdout, if it ran and succeeded.
fn cmd_output(cmd: &str, args: &[&str]) -> Option<String> {
    let o = Command::new(cmd).args(args).output().ok()?;
    let out = String::from_utf8(o.stdout).ok()?;
    o.status.success().then(|| out.trim().to_string())
}

fn machine_info(node: &str, node_dir: &Path, redis: &str) -> Machine {
    let read = |p: &str| fs::read_to_string(p).ok().map(|s| s.trim().to_string());
    let field = |file: &str, key: &str| {
        let text = read(file)?;
        let value = text.lines().find_map(|l| l.strip_prefix(key))?;
        Some(value.trim_start_matches([' ', '\t', ':']).to_string())
    };
    let mem_kib = field("/proc/meminfo", "MemTotal").unwrap_or_default();
    let mem_kib: Option<f64> = mem_kib.split(' ').next().and_then(|v| v.parse().ok());
    let lock = read(&node_dir.join("package-lock.json").display().to_string());
    let lock: Value = serde_json::from_str(&lock.unwrap_or_default()).unwrap_or_default();
    let ws = &lock["packages"]["node_modules/ws"]["version"];
    let git = |args: &str| cmd_output("git", &args.split(' ').collect::<Vec<_>>());
    let dirty = git("status --porcelain -- src Cargo.toml Cargo.lock");
    Machine {
        nproc: std::thread::available_parallelism().map(|n| n.get()).ok(),
        cpu_model: field("/proc/cpuinfo", "model name"),
        mem_gib: mem_kib.map(|k| round(k / 1048576.0, 1)),
        kernel: read("/proc/sys/kernel/osrelease"),
        rlimit_nofile: cmd_output("sh", &["-c", "ulimit -n"]),
        vm_max_map_count: read("/proc/sys/vm/max_map_count"),
        pid_max: read("/proc/sys/kernel/pid_max"),
        rustc: cmd_output("rustc", &["--version"]),
        node: cmd_output(node, &["--version"]),
        ws_package: ws.as_str().map(String::from),
        git_rev: git("rev-parse --short HEAD"),
        git_dirty: dirty.map(|s| !s.is_empty()),
        redis: cmd_output(redis, &["--version"]).and_then(|v| {
            let version = v.split_whitespace().find_map(|w| w.strip_prefix("v="));
            version.map(String::from)
        }),
    }
}

/// A path flag with a default.
fn path(a: &Args, name: &str, default: &str) -> PathBuf {
    PathBuf::from(a.opt_str(name).unwrap_or_else(|| default.to_string()))
}

/// How the suite runs: each server's command line (without the store-on run's `--data DIR`),
/// where logs, store-on data and Redis' directories go, this binary (the load generator), the
/// redis-server binary, and whether W1 pins.
struct Suite {
    quick: bool,
    servers: Cmds,
    logs: PathBuf,
    data_root: PathBuf,
    exe: String,
    redis: String,
    pin: bool,
}

impl Suite {
    /// The server command lines for `--servers`.
    fn servers(list: &str, bins: [Option<&str>; 3], node_dir: &Path) -> Result<Cmds, String> {
        let [chatroom, before, node] = bins;
        // Always say where history goes: the default is a directory in the cwd. The store
        // variant gets `--data DIR` per run. The load comes from one address: lift the
        // per-address limits (the "before" build has none, and no such flags).
        let flags = "--addr 127.0.0.1:0 --ws-addr 127.0.0.1:0 --rate-limit off --log-level warn";
        let limits = " --max-per-ip off --handshake-rate off";
        let mut out = BTreeMap::new();
        for s in list.split(',') {
            let (bin, data) = match s {
                "chatroom" => (chatroom, format!(" --data none{limits}")),
                "chatroom_before" => (before, " --data none".into()),
                "chatroom_store" => (chatroom, limits.into()),
                "chatroom_redis" => (chatroom, format!(" --data none{limits}")),
                "node" => (None, String::new()),
                other => return Err(format!("unknown server {other:?}")),
            };
            let peer = node_dir.join("server.js");
            let cmd = match bin {
                Some(bin) if Path::new(bin).exists() => format!("{bin} {flags}{data}"),
                Some(bin) => return Err(format!("{bin} not found: build it (bench/run.sh does)")),
                None if s != "node" => return Err("chatroom_before needs --before-bin PATH".into()),
                None if node_dir.join("node_modules/ws").exists() => {
                    format!("{} {} --port 0", node.unwrap_or_default(), peer.display())
                }
                None => return Err(format!("{}: run npm ci there first", node_dir.display())),
            };
            let kind = ORDER.into_iter().find(|o| *o == s).unwrap_or("node");
            out.insert(kind, words(&cmd));
        }
        Ok(out)
    }

    /// One run of workload `w` against `server`: a fresh server (store on: with a fresh data
    /// directory; `chatroom_redis`: see [`Suite::cluster`]), the load generator, then every
    /// process stopped by pid, the one started first last.
    fn run(&self, w: &Wl, server: &(&str, &str, &str), rep: usize) -> Result<RawRun, String> {
        let &(server, load_flags, server_flags) = server;
        let (id, quick) = (w.0, self.quick);
        let tag = format!("{id}-{server}-r{}", rep + 1);
        eprint!("suite: {tag} … ");
        let log = self.logs.join(&tag).display().to_string();
        let mut cmd = self.servers[server].clone();
        cmd.extend(words(&pick(server_flags, quick)));
        let data = format!("chatroom-bench-{}-{tag}", std::process::id());
        let store = server == "chatroom_store";
        let data = (store || server == "chatroom_redis").then(|| self.data_root.join(data));
        if let Some(d) = &data {
            let _ = fs::remove_dir_all(d);
            fs::create_dir_all(d).map_err(at(d))?;
            if store {
                cmd.extend(["--data".into(), d.display().to_string()]);
            }
        }
        // W1 compares CPU per delivery: the server on CPU 0, the load generator on CPU 1.
        let [srv_cpu, load_cpu] = [0, 1].map(|c| Some(c).filter(|_| self.pin && id == "w1"));
        let mut procs = Vec::new();
        let started = match &data {
            Some(d) if !store => self.cluster(&cmd, d, &log, &mut procs),
            _ => start(&cmd, srv_cpu, &format!("{log}.server"), &mut procs),
        };
        let ran = match started {
            Ok((http, ws)) => {
                sleep(Duration::from_millis(200));
                // The chatroom processes first, in the order of their addresses; Redis, which
                // started first, last.
                let mut pids: Vec<u32> = procs.iter().map(Child::id).collect();
                pids.rotate_left(usize::from(server == "chatroom_redis"));
                let list: Vec<String> = pids.iter().map(u32::to_string).collect();
                let (exe, pid) = (&self.exe, list.join(","));
                let (args, extra) = (pick(w.3, quick), pick(load_flags, quick));
                let load = format!("{exe} {args} --ws {ws} --http {http} --pid {pid} {extra}");
                run_load(&words(&load), &pids, load_cpu, w.2, &log)
            }
            Err(e) => (Noise::default(), Err(e)),
        };
        let mut run = RawRun::new(tag, ran);
        procs.into_iter().rev().for_each(stop);
        if let Some(d) = &data {
            let files = fs::read_dir(d).into_iter().flatten().flatten();
            let bytes = files.map(|e| e.metadata().map_or(0, |m| m.len())).sum();
            run.disk_bytes = store.then_some(bytes);
            if let Err(e) = fs::remove_dir_all(d) {
                eprintln!("suite: cannot remove {}: {e}", d.display());
            }
        }
        Ok(run)
    }

    /// `chatroom_redis`: a redis-server on a free port of 127.0.0.1 (no persistence, `dir` its
    /// directory), then [`CLUSTER_PROCESSES`] chatroom processes `cmd` sharing rooms through
    /// it, all into `procs`; the first one's HTTP address and every WebSocket address.
    fn cluster(&self, cmd: &[String], dir: &Path, log: &str, procs: &mut Vec<Child>) -> Started {
        let free = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr());
        let port = free.map_err(|e| format!("no free port: {e}"))?.port();
        let args = format!("--port {port} --bind 127.0.0.1 --appendonly no --save");
        let mut redis = [vec![self.redis.clone()], words(&args)].concat();
        redis.extend([String::new(), "--dir".into(), dir.display().to_string()]);
        procs.push(spawn(&redis, None, &format!("{log}.redis"))?.0);
        let why = format!("{redis:?}: no PING answer, see {log}.redis.out");
        let t = Instant::now();
        while !redis_pong(port) {
            if t.elapsed() > REDIS_START || !matches!(procs[0].try_wait(), Ok(None)) {
                return Err(why);
            }
            sleep(Duration::from_millis(20));
        }
        let url = format!("redis://127.0.0.1:{port}");
        let cmd = [cmd, &["--redis".into(), url]].concat();
        let mut addrs = Vec::new();
        for i in 1..=CLUSTER_PROCESSES {
            addrs.push(start(&cmd, None, &format!("{log}.server{i}"), procs)?);
        }
        let ws: Vec<&str> = addrs.iter().map(|a| a.1.as_str()).collect();
        Ok((addrs[0].0.clone(), ws.join(",")))
    }
}

/// `chatroom-bench suite …`: runs everything and writes the results and the markdown; whether
/// a target check failed.
pub fn main(a: &Args) -> Result<bool, String> {
    let quick = a.flag("quick");
    let reps: usize = a.get("reps", if quick { 1 } else { 3 })?;
    let store_reps: usize = a.get("store-reps", if quick { reps } else { reps.max(7) })?;
    let node = a.get("node", "node".to_string())?;
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
    let notes = path(a, "notes", "bench/NOTES.md");
    let logs = path(a, "logs", "target/bench-logs");
    let only = a.get("only", "w1,w2,w3,w4,w5,w6,w7,w8,w9".to_string())?;
    let data_root = a.get("data-root", std::env::temp_dir())?;
    let chatroom = a.get("chatroom", "target/release/chatroom".to_string())?;
    let before = a.opt_str("before-bin");
    let redis = a.get("redis-server", "redis-server".to_string())?;
    let mut all = "chatroom,chatroom_before,chatroom_store,chatroom_redis,node".to_string();
    if before.is_none() {
        all = all.replace("chatroom_before,", "");
    }
    if cmd_output(&redis, &["--version"]).is_none() {
        eprintln!("suite: {redis} not found (apt-get install redis-server): W9 will not run");
        all = all.replace("chatroom_redis,", "");
    }
    let list = a.get("servers", all)?;
    let no_pin = a.flag("no-pin");
    a.finish()?;
    let bins = [
        Some(chatroom.as_str()),
        before.as_deref(),
        Some(node.as_str()),
    ];
    let servers = Suite::servers(&list, bins, &node_dir)?;
    let dirs = [out_json.parent(), out_md.parent(), Some(&logs)];
    for d in dirs.into_iter().flatten() {
        fs::create_dir_all(d).map_err(at(d))?;
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pin = !no_pin && nproc >= 2 && cmd_output("taskset", &["-c", "0", "true"]).is_some();
    let exe = exe.display().to_string();
    let suite = Suite {
        quick,
        servers,
        logs,
        data_root,
        exe,
        redis,
        pin,
    };
    // W9 is about the servers sharing rooms through Redis: not run without them.
    let cluster = suite.servers.contains_key("chatroom_redis");
    let chosen = |w: &&Wl| only.split(',').any(|x| x == w.0) && (w.0 != "w9" || cluster);
    let wls: Vec<&Wl> = WORKLOADS.iter().filter(chosen).collect();

    let started = cmd_output("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]).unwrap_or_default();
    // Before the runs: the revision that was built, not whatever is checked out at the end.
    let machine = machine_info(&node, &node_dir, &suite.redis);
    let measured = report::stamp(&started, &machine);
    let t_all = Instant::now();
    let mut runs: BTreeMap<&str, BTreeMap<String, Vec<Value>>> = BTreeMap::new();
    for rep in 0..reps.max(store_reps) {
        for &w in &wls {
            let id = w.0;
            // Repetitions past `reps` are only for the store's pairs (W1, W2); the soak is long
            // enough to be its own repetition.
            let runs_here = |s: &str| {
                let store_pair = matches!((id, s), ("w1" | "w2", "chatroom" | "chatroom_store"));
                suite.servers.contains_key(s)
                    && (rep < reps || store_pair)
                    && (id != "w8" || rep == 0)
            };
            let mut order: Vec<_> = w.4.iter().filter(|p| runs_here(p.0)).collect();
            order.sort_by_key(|p| ORDER.iter().position(|o| *o == p.0));
            if rep % 2 == 1 {
                order.reverse();
            }
            for server in order {
                let (run, line) = report::typed(id, suite.run(w, server, rep)?);
                eprintln!("{line}");
                let by_server = runs.entry(id).or_default();
                by_server.entry(server.0.into()).or_default().push(run);
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
            let keep = |(s, f): &(&str, String)| !f.is_empty() && runs.contains_key(*s);
            flags.filter(keep).collect::<BTreeMap<_, _>>()
        };
        let (load_flags, server_flags, command) = (flags(0), flags(1), pick(args, quick));
        let mut servers = serde_json::Map::new();
        for (server, runs) in runs {
            servers.insert(server, series(runs));
        }
        let w = json!({ "measured": measured, "title": title, "command": command, "load_flags": load_flags, "server_flags": server_flags, "servers": servers });
        workloads.insert(id.into(), w);
    }
    let workloads = serde_json::from_value(workloads.into());
    let mut servers: BTreeMap<String, String> = BTreeMap::new();
    for (k, c) in &suite.servers {
        servers.insert(k.to_string(), c.join(" "));
    }
    servers
        .entry("chatroom_store".into())
        .and_modify(|c| c.push_str(" --data DIR"));
    let r = &suite.redis;
    let redis = format!("{r} --port PORT --bind 127.0.0.1 --appendonly no --save '' --dir DIR");
    servers.entry("chatroom_redis".into()).and_modify(|c| {
        *c = format!("{CLUSTER_PROCESSES} × {c} --redis redis://127.0.0.1:PORT; {redis}")
    });
    let results = Results {
        schema: SCHEMA.into(),
        generated: started,
        quick,
        reps: reps as u64,
        store_reps: store_reps as u64,
        total_s: round(t_all.elapsed().as_secs_f64(), 1),
        json_link,
        pinned: if pin { vec!["w1".into()] } else { vec![] },
        machine,
        servers,
        store_data_root: suite.data_root.display().to_string(),
        workloads: workloads.map_err(|e| format!("results: {e}"))?,
    };
    fs::write(&out_json, results.to_json()).map_err(at(&out_json))?;
    let failed = write_markdown(&results, &notes, &out_md)?;
    let (j, m, t) = (out_json.display(), out_md.display(), t_all.elapsed());
    eprintln!("suite: wrote {j} and {m} in {:.0} s", t.as_secs_f64());
    Ok(failed)
}

/// Writes the markdown and prints every check, then the failed ones again; whether any failed.
fn write_markdown(results: &Results, notes: &Path, out_md: &Path) -> Result<bool, String> {
    let checks = checks(results);
    let notes = fs::read_to_string(notes).ok();
    let md = report::markdown(results, &checks, notes.as_deref());
    fs::write(out_md, md).map_err(at(out_md))?;
    for c in &checks {
        let (word, w, t, v) = (c.verdict.word(), c.workload, &c.target, &c.value);
        eprintln!("  {word:4} {w} — {t}: {v}");
    }
    let failed = |c: &&Check| c.verdict == Verdict::Fail;
    let bad: Vec<&Check> = checks.iter().filter(failed).collect();
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
    let json = path(a, "json", "bench/results.json");
    let out_md = path(a, "out-md", "BENCHMARKS.md");
    let notes = path(a, "notes", "bench/NOTES.md");
    a.finish()?;
    let text = fs::read_to_string(&json).map_err(at(&json))?;
    let results = Results::parse(&text).map_err(|e| format!("{}: {e}", json.display()))?;
    fs::write(&json, results.to_json()).map_err(at(&json))?;
    write_markdown(&results, &notes, &out_md).map(|_| ())
}
