//! chatroom-bench: the load generator and benchmark suite for chatroom (owned by `bench/`).
//!
//! Thousands of WebSocket clients on a two-worker tokio runtime (never a thread per client:
//! threads are the server's budget). Each workload subcommand prints one JSON object on stdout;
//! `suite` starts the servers, runs every workload against chatroom, the build before issue 10
//! and the Node peer, and writes `BENCHMARKS.md` and `bench/results.json`. See `bench/run.sh`.
//!
//! ```text
//! chatroom-bench fanout    --ws 127.0.0.1:PORT --pid PID [--http 127.0.0.1:PORT] [--rooms 1 --clients 100 --senders 10 --window 8 --duration 10]
//! chatroom-bench moderate  --ws A[,B…] --pid P[,Q…] [--rooms 20 --per-room 20 --senders-per-room 2 --rate 20 --duration 10] [--slow --slow-pad N]
//! chatroom-bench capacity  --ws … --pid … --http … [--clients 15000 --memory-at N --room-size 100 --extra 500] [--smaps]
//! chatroom-bench joinstorm --ws … --pid … [--clients 1000]
//! chatroom-bench churn     --ws … --pid … [--rounds 10 --clients 1000 --room-size 100]
//! chatroom-bench soak      --ws … --pid … --http … [--duration 600 --workers 64]
//! chatroom-bench suite     [--quick] [--reps 3] [--store-reps 7] [--chatroom PATH] [--before-bin PATH] [--only w1,w3]
//!                          [--servers chatroom,chatroom_before,chatroom_store,chatroom_redis,node] [--data-root DIR]
//!                          [--redis-server PATH] [--no-pin]
//! chatroom-bench report    [--json bench/results.json] [--out-md BENCHMARKS.md]  (rewrite the markdown)
//! ```
//!
//! `fanout` and `moderate` take several servers sharing rooms (`--ws` and `--pid` lists, one pid
//! per address, then any more processes whose CPU counts as the servers', e.g. their Redis): the
//! k-th client of each room joins server k mod n.

mod capacity;
mod checks;
mod churn;
mod client;
mod procfs;
mod report;
mod results;
mod soak;
mod suite;
mod traffic;

use client::Target;
use serde::Serialize;
use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = argv.first() else {
        die("usage: chatroom-bench <fanout|moderate|capacity|joinstorm|churn|soak|suite|report> [--flags]");
    };
    client::init_clock();
    if let Err(e) = Args::parse(&argv[1..]).and_then(|a| run(cmd, &a)) {
        die(&e);
    }
}

fn run(cmd: &str, a: &Args) -> Result<(), String> {
    match cmd {
        // Exit 1 when a target check fails (after writing the results), 2 on any other error.
        "suite" => std::process::exit(i32::from(suite::main(a)?)),
        "report" => suite::report_main(a),
        "fanout" | "moderate" => workload(a, traffic::run(a, cmd == "fanout")?),
        "capacity" => workload(a, capacity::run(a)?),
        "joinstorm" => {
            let (t, clients) = (Target::from_args(a)?, a.get("clients", 1000)?);
            workload(a, churn::join_storm(t, clients))
        }
        "churn" => workload(a, churn::run(a)?),
        "soak" => {
            let (t, duration) = (Target::from_args(a)?, a.secs("duration", 600.0)?);
            workload(a, soak::run(t, duration, a.get("workers", 64)?))
        }
        other => Err(format!("unknown subcommand {other:?}")),
    }
}

fn die(msg: &str) -> ! {
    eprintln!("chatroom-bench: {msg}");
    std::process::exit(2);
}

/// Runs one workload on a two-worker runtime and prints its figures as one line of JSON, plus
/// the load generator's whole-process CPU (for the suite's noise accounting).
fn workload<T: Serialize>(a: &Args, fut: impl Future<Output = T>) -> Result<(), String> {
    a.finish()?;
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.worker_threads(2).enable_all();
    let rt = rt.build().map_err(|e| format!("runtime: {e}"))?;
    let result = rt.block_on(fut);
    let cpu_s = procfs::cpu_secs(None);
    let out = serde_json::json!({ "result": result, "load_generator_cpu_s": cpu_s });
    println!("{out}");
    // Don't wait for thousands of idle client tasks to be torn down one by one.
    std::process::exit(0);
}

/// Flags given as `--name value`, `--name=value` or bare `--name` (a switch, with no value); a
/// later value of the same flag wins (the suite appends per-server flags to a workload's).
pub struct Args {
    values: HashMap<String, Option<String>>,
    /// The flags that were asked for: any other is a typo ([`Args::finish`]).
    used: RefCell<Vec<String>>,
}

impl Args {
    pub fn parse(args: &[String]) -> Result<Args, String> {
        let (mut values, mut it) = (HashMap::new(), args.iter().peekable());
        while let Some(a) = it.next() {
            let bad = || format!("unexpected argument {a:?}");
            let name = a.strip_prefix("--").ok_or_else(bad)?;
            let value = match name.split_once('=') {
                Some((k, v)) => (k, Some(v.to_string())),
                None => (name, it.next_if(|v| !v.starts_with("--")).cloned()),
            };
            values.insert(value.0.to_string(), value.1);
        }
        Ok(Args {
            values,
            used: RefCell::default(),
        })
    }

    fn lookup(&self, name: &str) -> Option<&Option<String>> {
        self.used.borrow_mut().push(name.into());
        self.values.get(name)
    }

    /// A switch such as `--quick`.
    pub fn flag(&self, name: &str) -> bool {
        self.lookup(name) == Some(&None)
    }

    /// A string value, if given.
    pub fn opt_str(&self, name: &str) -> Option<String> {
        self.lookup(name).cloned().flatten()
    }

    /// A parsed value, if given.
    pub fn opt<T: FromStr>(&self, name: &str) -> Result<Option<T>, String> {
        let bad = |v: &str| format!("--{name}: cannot parse {v:?}");
        let parse = |v: String| v.parse().map_err(|_| bad(&v));
        self.opt_str(name).map(parse).transpose()
    }

    /// A parsed value with a default.
    pub fn get<T: FromStr>(&self, name: &str, default: T) -> Result<T, String> {
        Ok(self.opt(name)?.unwrap_or(default))
    }

    /// A comma-separated list of parsed values (empty if not given).
    pub fn list<T: FromStr>(&self, name: &str) -> Result<Vec<T>, String> {
        let bad = |v: &str| format!("--{name}: cannot parse {v:?}");
        let s = self.opt_str(name).unwrap_or_default();
        let items = s.split(',').filter(|v| !v.is_empty());
        items.map(|v| v.parse().map_err(|_| bad(v))).collect()
    }

    /// A parsed value that must be given.
    pub fn required<T: FromStr>(&self, name: &str) -> Result<T, String> {
        let missing = || format!("--{name} is required");
        self.opt(name)?.ok_or_else(missing)
    }

    /// Seconds (fractions allowed), at most an hour.
    pub fn secs(&self, name: &str, default: f64) -> Result<Duration, String> {
        let s: f64 = self.get(name, default)?;
        match (0.0..=3600.0).contains(&s) {
            true => Ok(Duration::from_secs_f64(s)),
            false => Err(format!("--{name}: {s} s is out of range")),
        }
    }

    /// Fails on any flag that no accessor asked for (catches typos).
    pub fn finish(&self) -> Result<(), String> {
        let used = self.used.borrow();
        match self.values.keys().find(|k| !used.contains(k)) {
            Some(k) => Err(format!("unknown flag --{k}")),
            None => Ok(()),
        }
    }
}
