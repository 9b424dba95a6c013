//! chatroom-bench: the load generator and benchmark suite for chatroom (owned by `bench/`).
//!
//! Thousands of WebSocket clients on a two-worker tokio runtime (never a thread per client:
//! threads are the server's budget). Each workload subcommand prints one JSON object on stdout;
//! `suite` starts the servers, runs every workload against chatroom and the Node peer, and writes
//! `BENCHMARKS.md` and `bench/results.json`. See `bench/run.sh`.
//!
//! ```text
//! chatroom-bench fanout    --ws 127.0.0.1:PORT --pid PID [--http 127.0.0.1:PORT] [--rooms 1 --clients 100 --senders 10 --window 8 --duration 10]
//! chatroom-bench moderate  --ws … --pid … [--rooms 20 --per-room 20 --senders-per-room 2 --rate 20 --duration 10] [--slow]
//! chatroom-bench capacity  --ws … --pid … --http … [--clients 7000 --room-size 100 --extra 500] [--smaps]
//! chatroom-bench joinstorm --ws … --pid … [--clients 1000]
//! chatroom-bench churn     --ws … --pid … [--rounds 10 --clients 1000 --room-size 100]
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
mod results;
mod stats;
mod suite;
mod traffic;
mod ws;

use args::Args;
use serde::Serialize;
use std::future::Future;

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = argv.first().cloned() else {
        eprintln!("usage: chatroom-bench <fanout|moderate|capacity|joinstorm|churn|suite|report> [--flags]");
        std::process::exit(2);
    };
    let args = Args::parse(&argv[1..]).unwrap_or_else(|e| die(&e));
    ws::init_clock();
    let result =
        match cmd.as_str() {
            // Exit 1 when a target check fails (after writing the results), 2 on any other error.
            "suite" => suite::main(&args).map(|failed| std::process::exit(i32::from(failed))),
            "report" => suite::report_main(&args),
            "fanout" => traffic::Params::from_args(&args, true)
                .and_then(|p| workload(&args, traffic::run(p))),
            "moderate" => traffic::Params::from_args(&args, false)
                .and_then(|p| workload(&args, traffic::run(p))),
            "capacity" => {
                capacity::Params::from_args(&args).and_then(|p| workload(&args, capacity::run(p)))
            }
            "joinstorm" => {
                joinstorm::Params::from_args(&args).and_then(|p| workload(&args, joinstorm::run(p)))
            }
            "churn" => churn::Params::from_args(&args).and_then(|p| workload(&args, churn::run(p))),
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

/// Runs one workload on a runtime of `--workers` threads and prints its figures as one line of
/// JSON, plus the load generator's whole-process CPU (for the suite's noise accounting).
fn workload<T: Serialize>(a: &Args, fut: impl Future<Output = T>) -> Result<(), String> {
    let workers: usize = a.get("workers", 2)?;
    // The suite passes `--http` to every workload; W4 and W6 have no use for it.
    let _ = a.opt_str("http");
    a.finish()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.max(1))
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let result = rt.block_on(fut);
    let cpu_s = procfs::cpu_secs(None);
    println!(
        "{}",
        serde_json::json!({ "result": result, "load_generator_cpu_s": cpu_s })
    );
    // Don't wait for thousands of idle client tasks to be torn down one by one.
    std::process::exit(0);
}
