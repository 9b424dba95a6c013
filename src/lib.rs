//! chatroom: a small real-time browser chat server on std threads.
//!
//! Blocking I/O and one thread per job keep every piece readable on its own: no async runtime,
//! no `unsafe`, and channels instead of shared locks wherever data moves between threads.
//!
//! # Layout
//! - [`config`]: flags, defaults and their reasons (pure).
//! - [`protocol`]: the only module that knows JSON (pure).
//! - [`room`]: room names; one room's people, history and ids (pure).
//! - [`rate`]: the per-client token bucket (pure).
//! - [`limits`]: what the host lets this process hold (threads, maps, descriptors).
//! - [`shared`]: the state every thread can see (config, counts, registry, failure record).
//! - [`wire`]: WebSocket frames as the server sends them, encoded once (pure).
//! - [`connection`]: one client's sending side: write without blocking, a backlog writer
//!   thread only while the socket is full; the registry of connections.
//! - [`hub`]: the one thread that owns every room and fans messages out.
//! - [`store`]: the one thread that owns the SQLite history database.
//! - [`bus`]: Redis as the rooms' shared store (`--redis`): keys, scripts, connections.
//! - [`cluster`]: the bus and follower threads between the hub and Redis.
//! - [`handshake`]: the WebSocket opening handshake, parsed and answered (pure).
//! - [`admission`]: the connection cap and the handshake's room and Origin checks.
//! - [`ws`]: the WebSocket accept loop and the 503 refuser.
//! - [`client`]: one connection's reader thread.
//! - [`heartbeat`]: the one thread that pings every client.
//! - [`http`]: tiny_http serving the page, assets and `/healthz`.
//!
//! One message's path: page → reader ([`client`]) → hub ([`hub`]) → every member's socket,
//! written by the hub without blocking ([`connection`]) → page. ARCHITECTURE.md tells it in
//! full.
//!
//! # Log levels
//! `info`: start-up, one line per WebSocket connect and disconnect (connection id, peer
//! address; never the room, whose name is its key: that is at `debug`).
//! `warn`: refused handshakes in summary (at most one line per 10 s, with counts by reason),
//! slow consumers dropped, limits lowered. `error`: accept and spawn failures. `debug`: details
//! of failed handshakes and writes. Message text is never logged.
#![forbid(unsafe_code)]

pub mod addresses;
pub mod admission;
pub mod bus;
pub mod client;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod handshake;
pub mod heartbeat;
pub mod http;
pub mod hub;
pub mod limits;
pub mod metrics;
pub mod protocol;
pub mod rate;
pub mod room;
pub mod shared;
pub mod store;
pub mod wire;
pub mod ws;

pub use config::{Config, CrashForTests, RateLimit};
pub use shared::{ServiceFailure, Shared};

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use log::{error, info, warn};

use crate::admission::Admission;
use crate::bus::BusHealth;
use crate::connection::{ClientThreads, ConnectionRegistry};
use crate::hub::HubCommand;
use crate::limits::HostLimits;
use crate::store::StoreHealth;

/// Commands waiting for the hub. When it is full, readers wait: that is the backpressure that
/// keeps a flood of input from growing memory, and no command (a `Leave` above all) is lost.
const HUB_QUEUE: usize = 16 * 1024;
/// Stack of the hub, acceptor, refuser and HTTP threads.
const SERVICE_STACK_BYTES: usize = 512 * 1024;
/// Shutdown gives clients until this long after it started to take their close frame and go
/// (a browser answers within milliseconds)...
const CLOSE_GRACE: Duration = Duration::from_millis(500);
/// ...then cuts the rest and, unless the process is about to exit, waits this much longer for
/// their threads.
const KILL_GRACE: Duration = Duration::from_millis(300);

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Lives on a service thread's stack: when the thread ends (returns or unwinds) while the
/// server is not stopping, it records the failure, logs it and tells `main`. Without it a dead
/// hub would leave a server that accepts clients and never welcomes them.
struct ServiceGuard {
    thread: &'static str,
    shared: Arc<Shared>,
}

impl Drop for ServiceGuard {
    fn drop(&mut self) {
        if self.shared.stopping.load(Ordering::Acquire) {
            return;
        }
        let failure = ServiceFailure {
            thread: self.thread.to_owned(),
            panicked: thread::panicking(),
        };
        error!("{failure}: the server cannot go on and should be restarted");
        let mut failed = lock(&self.shared.failed);
        if failed.is_none() {
            *failed = Some(failure.clone());
            let _ = self.shared.failure_tx.try_send(failure);
        }
    }
}

/// Runs a function when dropped, however the scope ends (a panic included).
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// Starts servers; see [`ServerHandle`].
pub struct Server;

/// A running server: its bound addresses, a few live counts, and [`ServerHandle::shutdown`].
/// Dropping the handle shuts the server down too.
pub struct ServerHandle {
    http_addr: SocketAddr,
    ws_addr: SocketAddr,
    max_clients: usize,
    shared: Arc<Shared>,
    hub: Sender<HubCommand>,
    threads: Vec<JoinHandle<()>>,
    /// A second handle on the WebSocket listening socket, to close it at shutdown.
    ws_listener: TcpListener,
    /// Receives the first [`ServiceFailure`], if any.
    failures: Receiver<ServiceFailure>,
    /// Dropped at shutdown: the heartbeat thread's sleep ends with it.
    heartbeat_stop: Option<Sender<()>>,
}

/// Connections the kernel queues before `accept` takes them. std's `bind` asks for 128; a
/// join storm of a thousand reconnecting pages then meets dropped SYNs and one-second retries.
const LISTEN_BACKLOG: i32 = 1024;

/// Binds a listener with a deep accept queue (and `SO_REUSEADDR`, so a restart can take the
/// port back at once).
fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Starts one of the server's service threads, watched by a [`ServiceGuard`].
fn spawn_service(
    name: &'static str,
    shared: &Arc<Shared>,
    body: impl FnOnce() + Send + 'static,
) -> io::Result<JoinHandle<()>> {
    let guard = ServiceGuard {
        thread: name,
        shared: Arc::clone(shared),
    };
    thread::Builder::new()
        .name(name.to_owned())
        .stack_size(SERVICE_STACK_BYTES)
        .spawn(move || {
            let _guard = guard;
            body();
        })
}

impl Server {
    /// Opens the history database, binds both listeners, starts the store, hub, acceptor,
    /// refuser and HTTP threads, and returns once the server accepts clients.
    pub fn start(config: Config) -> io::Result<ServerHandle> {
        // The ports first: opening the database marks the run unclean until its clean end, so
        // a start that fails on a port in use must not have opened it (the next start would
        // give every room a new epoch for nothing).
        let ws_listener = bind(config.ws_addr)?;
        let http_listener = bind(config.http_addr)?;
        http::set_idle_timeout(&http_listener, config.http_idle_timeout)?;
        let ws_addr = ws_listener.local_addr()?;
        let ws_listener_handle = ws_listener.try_clone()?;
        let http_addr = http_listener.local_addr()?;
        // With --redis, history lives in Redis: the database is not opened. Both Redis
        // connections are made now, so a bad URL, a refused login or a silent Redis stop the
        // start with one clear line.
        let bus = match &config.redis {
            Some(url) => Some(
                cluster::connect(url, &config.redis_prefix)
                    .map_err(|e| io::Error::other(e.to_string()))?,
            ),
            None => None,
        };
        let store = match (&config.data_dir, &bus) {
            (Some(dir), None) => Some(store::open(dir, config.history, config.retain)?),
            _ => None,
        };
        let bus_health = Arc::new(BusHealth::new(bus.as_ref().map(cluster::Connected::target)));

        let host = HostLimits::read();
        let max_clients = config.max_clients.min(host.max_clients());
        if max_clients < config.max_clients {
            warn!(
                "this host can hold about {max_clients} clients, not {}: lowering the cap \
                 (vm.max_map_count={}, kernel.pid_max={}, open files={})",
                config.max_clients, host.max_map_count, host.pid_max, host.open_files
            );
        }

        let history = config.history;
        let (failure_tx, failures) = crossbeam_channel::bounded(1);
        let shared = Arc::new(Shared {
            config,
            ws_port: ws_addr.port(),
            stopping: AtomicBool::new(false),
            max_clients,
            clients: AtomicUsize::new(0),
            active_rooms: AtomicUsize::new(0),
            store_health: StoreHealth::new(store.is_some()),
            bus_health: Arc::clone(&bus_health),
            metrics: Default::default(),
            client_threads: ClientThreads::new(host.safe_threads()),
            connections: ConnectionRegistry::default(),
            http_servers: Mutex::new(Vec::new()),
            failed: Mutex::new(None),
            failure_tx,
        });
        let admission = Arc::new(Admission::new(Arc::clone(&shared), max_clients));
        let (hub_tx, hub_rx) = crossbeam_channel::bounded(HUB_QUEUE);
        let (refuse_tx, refuse_rx) = crossbeam_channel::bounded(ws::REFUSAL_QUEUE);

        let mut threads = Vec::new();
        let store_tx = match store {
            Some(mut store) => {
                if let Some(CrashForTests::StoreOnLoad(room)) = &shared.config.crash_for_tests {
                    store.crash_on_load_for_tests(room.clone());
                }
                let (link, inbox) = store::channels();
                let (store_shared, store_hub) = (Arc::clone(&shared), hub_tx.clone());
                threads.push(spawn_service("store", &shared, move || {
                    // However the store ends (a panic included), the hub hears it, so no room
                    // waits for a load that will never come. After a clean stop the hub has
                    // ended first: the send fails at once, and that is fine.
                    let stopped = store_hub.clone();
                    let _tell_hub = OnDrop(move || {
                        let _ = stopped.send(HubCommand::StoreStopped);
                    });
                    let deliver = move |room, loaded| {
                        store_hub
                            .send(HubCommand::RoomLoaded { room, loaded })
                            .is_ok()
                    };
                    store::run(store, inbox, deliver, &store_shared.store_health)
                })?);
                Some(link)
            }
            None => None,
        };
        let bus_link = match bus {
            Some(connected) => {
                let redis = connected.target();
                let bus_hub = hub_tx.clone();
                let deliver = move |event| bus_hub.send(HubCommand::Bus(event)).is_ok();
                let retain = shared.config.retain;
                let (link, bus_body, follower_body) =
                    connected.start(history, retain, bus_health, deliver);
                threads.push(spawn_service("bus", &shared, bus_body)?);
                // Not joined at shutdown: it may be blocked in a read for a few seconds when
                // Redis is gone, and it ends on its own (the bus thread tells it to).
                spawn_service("bus-follower", &shared, follower_body)?;
                info!("rooms are shared through Redis at {redis}");
                Some(link)
            }
            None => None,
        };
        let hub_shared = Arc::clone(&shared);
        threads.push(spawn_service("hub", &shared, move || {
            hub::run(hub_rx, store_tx, bus_link, history, hub_shared)
        })?);
        threads.push(spawn_service("ws-refuser", &shared, move || {
            ws::run_refuser(refuse_rx)
        })?);
        let (acceptor_shared, acceptor_hub) = (Arc::clone(&shared), hub_tx.clone());
        threads.push(spawn_service("ws-acceptor", &shared, move || {
            ws::run_acceptor(
                ws_listener,
                acceptor_shared,
                acceptor_hub,
                admission,
                refuse_tx,
            )
        })?);
        let (heartbeat_stop, heartbeat_stopped) = crossbeam_channel::bounded(0);
        let heartbeat_shared = Arc::clone(&shared);
        threads.push(spawn_service("heartbeat", &shared, move || {
            heartbeat::run(heartbeat_shared, heartbeat_stopped)
        })?);
        let http_shared = Arc::clone(&shared);
        threads.push(spawn_service("http", &shared, move || {
            http::run_http(http_listener, http_shared)
        })?);

        info!("listening on http://{http_addr} (page) and ws://{ws_addr} (websocket)");
        Ok(ServerHandle {
            http_addr,
            ws_addr,
            max_clients,
            shared,
            hub: hub_tx,
            threads,
            ws_listener: ws_listener_handle,
            failures,
            heartbeat_stop: Some(heartbeat_stop),
        })
    }
}

impl ServerHandle {
    /// The address the page is served on.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The address WebSocket clients connect to.
    pub fn ws_addr(&self) -> SocketAddr {
        self.ws_addr
    }

    /// Client threads alive right now: a reader per connection, and a writer per connection
    /// that has a backlog.
    pub fn client_threads(&self) -> usize {
        self.shared.client_threads.live()
    }

    /// WebSocket connections counted against the cap right now.
    pub fn client_count(&self) -> usize {
        self.shared.clients.load(Ordering::Acquire)
    }

    /// The connection cap in force (after any lowering at start-up).
    pub fn max_clients(&self) -> usize {
        self.max_clients
    }

    /// The service thread that died, if one did: the server is then only half alive,
    /// `/healthz` answers 503, and the owner should shut it down and exit non-zero.
    pub fn failure(&self) -> Option<ServiceFailure> {
        self.shared.failure()
    }

    /// Receives the first [`ServiceFailure`] when it happens, for `select!` beside other
    /// events (the binary waits on it and on signals).
    pub fn failures(&self) -> &Receiver<ServiceFailure> {
        &self.failures
    }

    /// Stops accepting, closes every client with 1001, writes pending history, and joins
    /// every thread, within about 2 s however many clients never answer their close frame.
    pub fn shutdown(mut self) {
        self.stop(true);
    }

    /// The same as [`ServerHandle::shutdown`] for a process about to exit: every client is
    /// sent close 1001 and the history is written, but the readers of clients that never
    /// answer are cut and not waited for. Ending ten thousand threads one by one takes the
    /// kernel longer than the rest of the shutdown; the process's exit ends them at once.
    pub fn shutdown_for_exit(mut self) {
        self.stop(false);
    }

    fn stop(&mut self, join_clients: bool) {
        if self.shared.stopping.swap(true, Ordering::AcqRel) {
            return;
        }
        let started = Instant::now();
        // Close the WebSocket port: shutting the listening socket down fails the acceptor's
        // blocked `accept` (it then sees `stopping`). Then wake the HTTP thread, stop the
        // heartbeat, and end the hub (which tells the store to write what is pending and end).
        let _ = socket2::SockRef::from(&self.ws_listener).shutdown(Shutdown::Both);
        http::wake(&self.shared);
        self.heartbeat_stop = None;
        let _ = self.hub.send(HubCommand::Shutdown);
        // Every open connection gets close 1001 ("going away"); handshakes in progress are cut.
        let closing = self.shared.connections.close_all();
        info!("closing {closing} connections");
        // The service threads end without the clients. A service thread that panicked has
        // been reported by its ServiceGuard already.
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        let left = self
            .shared
            .client_threads
            .wait_for_none(started + CLOSE_GRACE);
        if left > 0 {
            // Peers that neither read their close frame nor answer it: cut them.
            self.shared.connections.kill_all();
            if join_clients {
                let left = self
                    .shared
                    .client_threads
                    .wait_for_none(Instant::now() + KILL_GRACE);
                if left > 0 {
                    warn!("{left} client threads still running at shutdown");
                }
            }
        }
        info!("stopped in {} ms", started.elapsed().as_millis());
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop(true);
    }
}
