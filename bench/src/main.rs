//! chatroom-bench: the load generator and benchmark suite for chatroom (owned by `bench/`).
//!
//! Thousands of WebSocket clients on a two-worker tokio runtime (never a thread per client:
//! threads are the server's budget). Each workload subcommand prints one JSON object on stdout;
//! `suite` starts the servers, runs every workload against chatroom and the Node peer, and writes
//! `BENCHMARKS.md` and `bench/results.json`. See `bench/run.sh`.
//!
//! ```text
//! chatroom-bench fanout    --ws 127.0.0.1:PORT [--http 127.0.0.1:PORT] [--pid PID] [--rooms 1 --clients 100 --senders 10 --window 8 --duration 10]
//! chatroom-bench moderate  --ws … [--rooms 20 --per-room 20 --senders-per-room 2 --rate 20 --duration 10] [--slow]
//! chatroom-bench capacity  --ws … --http … [--clients 7000 --room-size 100 --extra 500] [--smaps]
//! chatroom-bench joinstorm --ws … [--clients 1000]
//! chatroom-bench churn     --ws … [--rounds 10 --clients 1000 --room-size 100]
//! chatroom-bench suite     [--quick] [--reps 3] [--chatroom PATH] [--node-peer DIR] [--only w1,w3]
//!                          [--store-reps 7] [--servers chatroom,chatroom_store,node] [--data-root DIR]
//! chatroom-bench report    [--json bench/results.json] [--out-md BENCHMARKS.md]  (rewrite the markdown)
//! ```

mod args;
mod capacity;
mod churn;
mod health;
mod joinstorm;
mod procfs;
mod report;

mod stats;
mod storereport;
mod suite;

mod traffic;
mod ws;

use args::Args;
use serde_json::Value;
use std::net::SocketAddr;

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = argv.first().cloned() else {
        eprintln!(
            "usage: chatroom-bench <fanout|moderate|capacity|joinstorm|churn|suite> [--flags]"
        );
        std::process::exit(2);
    };
    let args = match Args::parse(&argv[1..]) {
        Ok(a) => a,
        Err(e) => die(&e),
    };
    ws::init_clock();
    let result = match cmd.as_str() {
        "suite" => suite::main(&args),
        "report" => suite::report_main(&args),
        "fanout" | "moderate" | "capacity" | "joinstorm" | "churn" => run_workload(&cmd, &args),
        "-h" | "--help" | "help" => {
            println!("see the doc comment at the top of bench/src/main.rs");
            Ok(())
        }
        other => Err(format!("unknown subcommand {other:?}")),
    };
    if let Err(e) = result {
        die(&e);
    }
}

fn die(msg: &str) -> ! {
    eprintln!("chatroom-bench: {msg}");
    std::process::exit(2);
}

fn addr(args: &Args, name: &str) -> Result<Option<SocketAddr>, String> {
    args.opt::<SocketAddr>(name)
}

fn run_workload(cmd: &str, a: &Args) -> Result<(), String> {
    let ws = addr(a, "ws")?.ok_or("--ws HOST:PORT is required")?;
    let pid: Option<u32> = a.opt("pid")?;
    let http = addr(a, "http")?;
    let workers: usize = a.get("workers", 2)?;
    let fut: std::pin::Pin<Box<dyn std::future::Future<Output = Value> + Send>> = match cmd {
        "fanout" => {
            let p = traffic::Params {
                label: "fanout".to_string(),
                addr: ws,
                pid,
                http,
                rooms: a.get("rooms", 1)?,
                per_room: a.get("clients", 100)?,
                senders_per_room: a.get("senders", 10)?,
                mode: traffic::SendMode::ClosedLoop {
                    window: a.get("window", 8)?,
                    all_receivers: match a.opt_str("window-scope").as_deref() {
                        None | Some("all") => true,
                        Some("own") => false,
                        Some(o) => return Err(format!("--window-scope all|own, not {o:?}")),
                    },
                },
                duration: a.secs("duration", 10.0)?,
                drain_timeout: a.secs("drain-timeout", 5.0)?,
                pad: a.get("pad", 0)?,
                slow: None,
                room_prefix: a.opt_str("room").unwrap_or_else(|| "fanout".to_string()),
                connect_concurrency: 50,
                read_buffer: a.get("read-buffer", 8 * 1024)?,
                settle: a.secs("settle", 0.3)?,
            };
            Box::pin(traffic::run(p))
        }
        "moderate" => {
            let slow = a.flag("slow").then_some(traffic::SlowSpec {
                room: 0,
                rcvbuf: a.opt("slow-rcvbuf")?,
                room_pad: a.get("slow-pad", 0)?,
            });
            let p = traffic::Params {
                label: if slow.is_some() {
                    "slow_consumer"
                } else {
                    "moderate"
                }
                .to_string(),
                addr: ws,
                pid,
                http,
                rooms: a.get("rooms", 20)?,
                per_room: a.get("per-room", 20)?,
                senders_per_room: a.get("senders-per-room", 2)?,
                mode: traffic::SendMode::OpenLoop {
                    rate_hz: a.get("rate", 20.0)?,
                },
                duration: a.secs("duration", 10.0)?,
                drain_timeout: a.secs("drain-timeout", 5.0)?,
                pad: a.get("pad", 0)?,
                slow,
                room_prefix: a.opt_str("room").unwrap_or_else(|| "mod".to_string()),
                connect_concurrency: 50,
                read_buffer: a.get("read-buffer", 8 * 1024)?,
                settle: a.secs("settle", 0.5)?,
            };
            Box::pin(traffic::run(p))
        }
        "capacity" => {
            let p = capacity::Params {
                addr: ws,
                http,
                pid,
                clients: a.get("clients", 7000)?,
                room_size: a.get("room-size", 100)?,
                extra: a.get("extra", 500)?,
                concurrency: a.get("concurrency", 64)?,
                checkpoint: a.get("checkpoint", 1000)?,
                read_buffer: a.get("read-buffer", 4096)?,
                smaps: a.flag("smaps"),
            };
            Box::pin(capacity::run(p))
        }
        "joinstorm" => {
            let p = joinstorm::Params {
                addr: ws,
                pid,
                clients: a.get("clients", 1000)?,
                room: a.opt_str("room").unwrap_or_else(|| "storm".to_string()),
                read_buffer: a.get("read-buffer", 8 * 1024)?,
            };
            Box::pin(joinstorm::run(p))
        }
        "churn" => {
            let p = churn::Params {
                addr: ws,
                pid,
                rounds: a.get("rounds", 10)?,
                clients: a.get("clients", 1000)?,
                room_size: a.get("room-size", 100)?,
                concurrency: a.get("concurrency", 200)?,
                settle_timeout: a.secs("settle-timeout", 10.0)?,
            };
            Box::pin(churn::run(p))
        }
        _ => unreachable!(),
    };
    a.finish()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.max(1))
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let mut v = rt.block_on(fut);
    // Whole-process figures, for the suite's noise accounting.
    v["process"] = serde_json::json!({
        "cpu_s": procfs::cpu_secs(None),
        "rss_kib": procfs::self_rss_kib(),
        "workers": workers,
    });
    println!("{v}");
    // Don't wait for thousands of idle client tasks to be torn down one by one.
    std::process::exit(0);
}
