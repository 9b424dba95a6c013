//! The `chatroom` binary: parse flags, start logging, raise the open-files limit, run the
//! server until SIGINT or SIGTERM (exit 0) or until one of its service threads dies (exit 1).
//!
//! Everything else lives in the library (`src/lib.rs`), so tests run the same server in-process.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use chatroom::config::{parse_args, Command, USAGE};
use chatroom::limits::HostLimits;
use chatroom::Server;
use nix::sys::resource::{getrlimit, setrlimit, Resource};

fn main() -> ExitCode {
    let (config, log_level) = match parse_args(std::env::args().skip(1)) {
        Ok(Command::Run { config, log_level }) => (config, log_level),
        Ok(Command::Backup { data_dir, dest }) => {
            return match chatroom::store::backup(&data_dir, &dest) {
                Ok(()) => {
                    eprintln!("chatroom: history copied to {}", dest.display());
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("chatroom: backup failed: {err}");
                    ExitCode::FAILURE
                }
            };
        }
        Ok(Command::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("chatroom {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("chatroom: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // tiny_http logs every accept timeout as an error; its idle timeouts are ours, not errors.
    let logger = simple_logger::SimpleLogger::new()
        .with_level(log_level)
        .with_module_level("tiny_http", log::LevelFilter::Off)
        .with_module_level("tungstenite", log::LevelFilter::Warn);
    log::set_max_level(logger.max_level());
    if let Err(err) = log::set_boxed_logger(Box::new(SurvivingLogger(logger))) {
        eprintln!("chatroom: cannot start logging: {err}");
    }

    raise_open_files_limit(config.max_clients);

    // Signals arrive on another thread; the main thread waits for the first one here.
    let (stop_tx, stop_rx) = crossbeam_channel::bounded(1);
    if let Err(err) = ctrlc::set_handler(move || {
        let _ = stop_tx.try_send(());
    }) {
        eprintln!("chatroom: cannot handle signals: {err}");
        return ExitCode::FAILURE;
    }

    let server = match Server::start(*config) {
        Ok(server) => server,
        Err(err) => {
            eprintln!("chatroom: cannot start: {err}");
            return ExitCode::FAILURE;
        }
    };
    // Scripts (tests, benchmarks) read the bound ports from this first line of stdout.
    println!(
        "listening http={} ws={}",
        server.http_addr(),
        server.ws_addr()
    );
    // Wait for a signal, or for a service thread to die: a half-alive server (say, a dead hub
    // that never welcomes anyone) must exit non-zero so a supervisor restarts it.
    crossbeam_channel::select! {
        recv(stop_rx) -> _ => {
            log::info!("signal received; shutting down");
            server.shutdown_for_exit();
            ExitCode::SUCCESS
        }
        recv(server.failures()) -> failure => {
            if let Ok(failure) = failure {
                eprintln!("chatroom: {failure}; exiting so a supervisor can restart it");
            }
            server.shutdown_for_exit();
            ExitCode::FAILURE
        }
    }
}

/// Raises the soft open-files limit toward the hard one, as Go servers do at start-up (the soft
/// default is often 1,024, which would leave no WebSocket slot beside HTTP's reserve), but
/// only as far as the server can use: see [`HostLimits::open_files_wanted`] for why not to
/// the hard limit itself. Done here, not in the library: a process-wide setting belongs to
/// the program, not to a library that tests start many times in one process.
fn raise_open_files_limit(max_clients: usize) {
    let wanted = HostLimits::read().open_files_wanted(max_clients) as u64;
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(err) => {
            log::warn!("cannot read the open-files limit: {err}");
            return;
        }
    };
    let target = wanted.min(hard);
    if target <= soft {
        return;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
        Ok(()) => log::info!("raised the open-files limit from {soft} to {target} (hard {hard})"),
        Err(err) => log::warn!("cannot raise the open-files limit from {soft} to {target}: {err}"),
    }
}

/// simple_logger writes with `println!`, which panics when the output is gone (a closed pipe:
/// the reader of our logs exited). A log line must never take the server down, least of all
/// during shutdown: a line that cannot be written is dropped.
struct SurvivingLogger(simple_logger::SimpleLogger);

impl log::Log for SurvivingLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        self.0.enabled(metadata)
    }

    fn log(&self, record: &log::Record) {
        let written = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.0.log(record)));
        drop(written);
    }

    fn flush(&self) {}
}
