//! Counters of what the server has done since it started, for `GET /metrics` (Prometheus text
//! format) and for the summary of refusals in the log.
//!
//! Plain atomics in [`crate::shared::Shared`]: the acceptor, readers, hub and HTTP thread add to
//! them; [`render`] writes them out for the HTTP thread. Refusals are counted by reason and
//! logged in summary, at most one line per [`REFUSAL_LOG_INTERVAL`]: a flood of refused
//! handshakes must not become a flood of log lines.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use log::warn;

/// At most one summary line of refusals per this long.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Why a WebSocket connection was refused before it joined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The server holds `--max-clients` connections (or the host's limit).
    Full,
    /// Its address holds `--max-per-ip` connections.
    PerAddress,
    /// Its address opened handshakes faster than `--handshake-rate`.
    HandshakeRate,
    /// A `Host` this server does not answer for (DNS rebinding).
    Host,
    /// A foreign `Origin`.
    Origin,
    /// A path that names no valid room.
    Room,
    /// Not a WebSocket handshake, or a malformed one.
    BadRequest,
    /// The handshake did not arrive in time.
    HandshakeTimeout,
    /// No `hello` in time after the handshake.
    NoHello,
}

impl Refused {
    pub const ALL: [Refused; 9] = [
        Refused::Full,
        Refused::PerAddress,
        Refused::HandshakeRate,
        Refused::Host,
        Refused::Origin,
        Refused::Room,
        Refused::BadRequest,
        Refused::HandshakeTimeout,
        Refused::NoHello,
    ];

    /// The `reason` label in `/metrics` and the word in the log summary.
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Full => "full",
            Refused::PerAddress => "per_address",
            Refused::HandshakeRate => "handshake_rate",
            Refused::Host => "host",
            Refused::Origin => "origin",
            Refused::Room => "room",
            Refused::BadRequest => "bad_request",
            Refused::HandshakeTimeout => "handshake_timeout",
            Refused::NoHello => "no_hello",
        }
    }
}

/// The counters. Each says who adds to it.
#[derive(Default)]
pub struct Metrics {
    /// WebSocket connections that completed their handshake (reader).
    pub connections_opened: AtomicU64,
    /// Refused connections, by [`Refused`] reason, in the order of [`Refused::ALL`].
    refused: [AtomicU64; Refused::ALL.len()],
    /// `say` messages accepted and broadcast (hub).
    pub messages: AtomicU64,
    /// `say` frames refused by a rate limit, the client's or its address's (reader).
    pub says_rate_limited: AtomicU64,
    /// `say` frames refused because Redis could not be reached (`--redis`; hub).
    pub says_unavailable: AtomicU64,
    /// Clients dropped because they did not read (hub and backlog writers).
    pub slow_consumers: AtomicU64,
    /// HTTP requests answered (HTTP thread).
    pub http_requests: AtomicU64,
    /// Times the HTTP server (tiny_http) was rebuilt after its accept loop failed or died.
    pub http_rebuilds: AtomicU64,
    /// Refusals not yet in a log line, and when the last line was written.
    refusal_log: Mutex<RefusalLog>,
}

#[derive(Default)]
struct RefusalLog {
    last: Option<Instant>,
    pending: [u64; Refused::ALL.len()],
}

impl Metrics {
    /// Counts a refusal, and logs a summary of the refusals since the last one if that was
    /// [`REFUSAL_LOG_INTERVAL`] ago (the first refusal is logged at once).
    pub fn refused(&self, reason: Refused, detail: impl FnOnce() -> String) {
        let index = reason as usize;
        self.refused[index].fetch_add(1, Ordering::Relaxed);
        let mut log = self
            .refusal_log
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        log.pending[index] += 1;
        let now = Instant::now();
        if log
            .last
            .is_some_and(|last| now.duration_since(last) < REFUSAL_LOG_INTERVAL)
        {
            return;
        }
        let total: u64 = log.pending.iter().sum();
        let mut summary = String::new();
        for (reason, count) in Refused::ALL.iter().zip(log.pending) {
            if count > 0 {
                let sep = if summary.is_empty() { "" } else { ", " };
                let _ = write!(summary, "{sep}{} {count}", reason.as_str());
            }
        }
        let window = log.last.map_or(String::new(), |last| {
            format!(" in the last {} s", now.duration_since(last).as_secs())
        });
        warn!(
            "refused {total} connection(s){window} ({summary}); latest: {}",
            detail()
        );
        log.pending = Default::default();
        log.last = Some(now);
    }

    /// Refusals so far for one reason.
    pub fn refusals(&self, reason: Refused) -> u64 {
        self.refused[reason as usize].load(Ordering::Relaxed)
    }
}

/// Values read at the moment of the scrape (not counters).
pub struct Gauges {
    pub clients: usize,
    pub max_clients: usize,
    pub rooms: usize,
    pub client_threads: usize,
    pub store_written: u64,
    pub store_unwritten: u64,
    pub store_dropped: u64,
    pub store_read_errors: u64,
    /// Whether the store's last write failed.
    pub store_failing: bool,
    pub memory_used: u64,
    pub memory_budget: u64,
    /// Bytes of the history database; `None` with `--data none`.
    pub disk_used: Option<u64>,
    pub disk_budget: Option<u64>,
    /// Whether Redis answers; `None` without `--redis`.
    pub bus_up: Option<bool>,
    /// Whether a service thread has died.
    pub failed: bool,
}

/// The Prometheus text exposition format (version 0.0.4) of the counters and gauges.
pub fn render(metrics: &Metrics, gauges: &Gauges) -> String {
    const GAUGE: &str = "gauge";
    const COUNTER: &str = "counter";
    let count = |c: &AtomicU64| c.load(Ordering::Relaxed);
    // The rows that exist only with --data (disk) or --redis (bus).
    let optional: Vec<(&str, &str, &str, u64)> = [
        gauges
            .disk_used
            .map(|used| ("disk_bytes", GAUGE, "Bytes of the history database.", used)),
        gauges.disk_budget.map(|budget| {
            (
                "disk_budget_bytes",
                GAUGE,
                "The disk budget for history (--max-disk).",
                budget,
            )
        }),
        gauges.bus_up.map(|up| {
            (
                "bus_up",
                GAUGE,
                "1 while Redis answers (--redis); says are refused while it is 0.",
                u64::from(up),
            )
        }),
    ]
    .into_iter()
    .flatten()
    .collect();
    // (name, type, help, value): one row per metric, in the order they are written.
    let rows: Vec<(&str, &str, &str, u64)> = [
        (
            "connections",
            GAUGE,
            "WebSocket connections open now.",
            gauges.clients as u64,
        ),
        (
            "max_connections",
            GAUGE,
            "The connection cap in force.",
            gauges.max_clients as u64,
        ),
        (
            "rooms",
            GAUGE,
            "Rooms with at least one member.",
            gauges.rooms as u64,
        ),
        (
            "client_threads",
            GAUGE,
            "Client threads alive (readers and backlog writers).",
            gauges.client_threads as u64,
        ),
        (
            "connections_opened_total",
            COUNTER,
            "WebSocket handshakes completed.",
            count(&metrics.connections_opened),
        ),
        (
            "messages_total",
            COUNTER,
            "Messages said and broadcast.",
            count(&metrics.messages),
        ),
        (
            "says_rate_limited_total",
            COUNTER,
            "Messages refused by a rate limit.",
            count(&metrics.says_rate_limited),
        ),
        (
            "says_unavailable_total",
            COUNTER,
            "Messages refused because Redis could not be reached.",
            count(&metrics.says_unavailable),
        ),
        (
            "slow_consumers_total",
            COUNTER,
            "Clients dropped for not reading.",
            count(&metrics.slow_consumers),
        ),
        (
            "http_requests_total",
            COUNTER,
            "HTTP requests answered.",
            count(&metrics.http_requests),
        ),
        (
            "http_rebuilds_total",
            COUNTER,
            "Times the HTTP server was rebuilt after its accept loop failed.",
            count(&metrics.http_rebuilds),
        ),
        (
            "store_written_total",
            COUNTER,
            "Messages committed to the history database.",
            gauges.store_written,
        ),
        (
            "store_unwritten",
            GAUGE,
            "Messages waiting to be committed.",
            gauges.store_unwritten,
        ),
        (
            "store_dropped_total",
            COUNTER,
            "Messages that will never be written.",
            gauges.store_dropped,
        ),
        (
            "store_read_errors_total",
            COUNTER,
            "Failed reads of a room's history.",
            gauges.store_read_errors,
        ),
        (
            "store_failing",
            GAUGE,
            "1 while the history database's writes fail.",
            u64::from(gauges.store_failing),
        ),
        (
            "memory_history_bytes",
            GAUGE,
            "Bytes of history held in memory.",
            gauges.memory_used,
        ),
        (
            "memory_budget_bytes",
            GAUGE,
            "The memory budget for history (--memory-budget).",
            gauges.memory_budget,
        ),
    ]
    .into_iter()
    .chain(optional)
    .chain([(
        "service_failed",
        GAUGE,
        "1 when a service thread has died and the server should be restarted.",
        u64::from(gauges.failed),
    )])
    .collect();
    let mut out = String::with_capacity(4096);
    for (name, kind, help, value) in rows {
        let _ = writeln!(
            out,
            "# HELP chatroom_{name} {help}\n# TYPE chatroom_{name} {kind}\nchatroom_{name} {value}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP chatroom_refused_total WebSocket connections refused, by reason.\n\
         # TYPE chatroom_refused_total counter"
    );
    for reason in Refused::ALL {
        let _ = writeln!(
            out,
            "chatroom_refused_total{{reason=\"{}\"}} {}",
            reason.as_str(),
            metrics.refusals(reason)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_counted_by_reason() {
        let metrics = Metrics::default();
        for _ in 0..3 {
            metrics.refused(Refused::PerAddress, || "x".into());
        }
        metrics.refused(Refused::Host, || "x".into());
        assert_eq!(metrics.refusals(Refused::PerAddress), 3);
        assert_eq!(metrics.refusals(Refused::Host), 1);
        assert_eq!(metrics.refusals(Refused::Full), 0);
    }
}
