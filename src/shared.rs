//! The state every thread of the server can see: the configuration, live counts for
//! `/healthz`, the connection registry and client-thread count, and the record of a dead
//! service thread.
//!
//! Made once by [`crate::Server::start`] and shared as an `Arc` by the hub, the readers, the
//! acceptor, the heartbeat and HTTP; each field says who writes it. Everything else moves
//! between threads by channel, not through here.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_channel::Sender;

use crate::bus::{BusHealth, BusState};
use crate::config::Config;
use crate::connection::{ClientThreads, ConnectionRegistry};
use crate::metrics::{Gauges, Metrics};
use crate::protocol;
use crate::store::StoreHealth;
use crate::store::StoreState;

/// The tiny_http servers answering requests (the live one, and retired ones still draining),
/// so shutdown can wake the HTTP threads. Written by the HTTP thread ([`crate::http`]).
pub type LiveServers = Mutex<Vec<Arc<tiny_http::Server>>>;

/// State shared by the server's threads. Each field says who writes it.
pub struct Shared {
    pub config: Config,
    /// The WebSocket port the page should use (the bound one, when the config said 0).
    pub ws_port: u16,
    /// Set once by shutdown; every accept loop checks it after waking.
    pub stopping: AtomicBool,
    /// The connection cap in force: `--max-clients`, lowered at start-up to what the host
    /// can hold.
    pub max_clients: usize,
    /// Connections counted against the cap: +1 in the acceptor before a thread exists, −1 when
    /// the connection's reader ends.
    pub clients: AtomicUsize,
    /// Rooms with at least one member, kept by the hub for `/healthz`.
    pub active_rooms: AtomicUsize,
    /// The history store's state and counts, kept by the hub and the store for `/healthz`.
    pub store_health: StoreHealth,
    /// Whether Redis answers (`--redis`), kept by the bus and follower threads for `/healthz`.
    pub bus_health: Arc<BusHealth>,
    /// Counters for `/metrics` and the refusal log; each counter says who adds to it.
    pub metrics: Metrics,
    /// Client threads alive (readers and backlog writers), so shutdown can wait for zero.
    pub client_threads: Arc<ClientThreads>,
    /// Every connection, so shutdown can close them all (and cut those that do not go).
    pub connections: ConnectionRegistry,
    /// The tiny_http servers answering requests, so shutdown can wake the HTTP threads.
    pub(crate) http_servers: LiveServers,
    /// The first service thread that ended while the server was not stopping, set by its
    /// `ServiceGuard` (lib.rs); `/healthz` then answers 503.
    pub(crate) failed: Mutex<Option<ServiceFailure>>,
    /// Tells the `ServerHandle`'s owner (`main`) about that failure, once. Bounded to one:
    /// only the first failure is sent, and sending never waits.
    pub(crate) failure_tx: Sender<ServiceFailure>,
}

/// A service thread (hub, store, heartbeat, acceptor, refuser or HTTP) that ended while the
/// server was not stopping. The server cannot do its job without it, so it should be restarted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceFailure {
    /// The thread's name: `hub`, `store`, `heartbeat`, `ws-acceptor`, `ws-refuser` or `http`.
    pub thread: String,
    /// Whether it panicked (else it returned early).
    pub panicked: bool,
}

impl std::fmt::Display for ServiceFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = if self.panicked { "panicked" } else { "ended" };
        write!(f, "the {} thread {how}", self.thread)
    }
}

impl Shared {
    /// The values `/metrics` reports beside the counters, read now.
    pub fn gauges(&self) -> Gauges {
        let store = &self.store_health;
        let on_disk = store.state() != StoreState::Memory;
        Gauges {
            clients: self.clients.load(Ordering::Relaxed),
            max_clients: self.max_clients,
            rooms: self.active_rooms.load(Ordering::Relaxed),
            client_threads: self.client_threads.live(),
            store_written: store.written.load(Ordering::Relaxed),
            store_unwritten: store.unwritten.load(Ordering::Relaxed),
            store_dropped: store.dropped.load(Ordering::Relaxed),
            store_read_errors: store.read_errors.load(Ordering::Relaxed),
            store_failing: store.state() == StoreState::Failing,
            memory_used: store.memory_bytes.load(Ordering::Relaxed),
            memory_budget: self.config.memory_budget as u64,
            disk_used: on_disk.then(|| store.disk_bytes.load(Ordering::Relaxed)),
            disk_budget: self.config.max_disk.filter(|_| on_disk),
            bus_up: match self.bus_health.state() {
                BusState::Off => None,
                state => Some(state == BusState::Up),
            },
            failed: self.failed.lock().map_or(true, |f| f.is_some()),
        }
    }

    /// The `/healthz` answer: its status code (503 once a service thread has died, so a load
    /// balancer or supervisor that reads only the code sees it too) and its JSON body.
    pub fn health_report(&self) -> (u16, String) {
        let store = &self.store_health;
        let error = store.error();
        let failure = self.failure();
        let body = protocol::encode_health(
            failure.as_ref().map(|f| f.thread.as_str()),
            self.clients.load(Ordering::Relaxed),
            self.active_rooms.load(Ordering::Relaxed),
            protocol::StoreHealthOut {
                state: store.state().as_str(),
                written: store.written.load(Ordering::Relaxed),
                unwritten: store.unwritten.load(Ordering::Relaxed),
                dropped: store.dropped.load(Ordering::Relaxed),
                read_errors: store.read_errors.load(Ordering::Relaxed),
                error: error.as_deref(),
            },
            protocol::MemoryOut {
                used: store.memory_bytes.load(Ordering::Relaxed),
                budget: self.config.memory_budget as u64,
            },
            (store.state() != StoreState::Memory).then(|| protocol::DiskOut {
                used: store.disk_bytes.load(Ordering::Relaxed),
                file: store.disk_file_bytes.load(Ordering::Relaxed),
                budget: self.config.max_disk,
            }),
            (self.bus_health.state() != BusState::Off).then(|| protocol::BusOut {
                state: self.bus_health.state().as_str(),
                redis: self.bus_health.redis().to_owned(),
                error: self.bus_health.error(),
            }),
        );
        let code = if failure.is_some() { 503 } else { 200 };
        (code, body)
    }

    /// The service thread that died, if one did (see [`ServiceFailure`]).
    pub fn failure(&self) -> Option<ServiceFailure> {
        self.failed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}
