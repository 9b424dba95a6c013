//! A real redis-server for the tests that need one (`redis_bus`, `cluster`): started on a free
//! port of 127.0.0.1 (no persistence unless a test asks for it), stopped by its PID on drop,
//! and restarted on the same port when a test takes Redis away under running servers.
//!
//! Without `redis-server` on the PATH, [`RedisServer::start`] says so loudly and returns
//! `None`, so the test passes without running, unless `CHATROOM_REQUIRE_REDIS=1` (set by
//! .ci/run), which makes a missing redis-server a failure. Also: [`clustered`], a chatroom
//! server in this process that shares its rooms through a given Redis.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use chatroom::{Config, ServerHandle};

use crate::support::{self, TIMEOUT};

/// How long redis-server may take to answer its first PING.
const START_LIMIT: Duration = Duration::from_secs(10);

/// A redis-server child, killed by its PID on drop.
pub(crate) struct RedisServer {
    child: Child,
    port: u16,
    /// The arguments after the defaults, kept for [`RedisServer::restart`].
    extra: Vec<String>,
    /// Reads the child's log to its end (so the pipe never fills); ends when the child does.
    log_reader: Option<thread::JoinHandle<()>>,
}

impl RedisServer {
    /// Starts one, or returns `None` (after saying so) when redis-server is not installed.
    /// Ready means: its log says it accepts connections, and it answers a PING. `extra`
    /// comes after the defaults (`--save '' --appendonly no`), so it may override them.
    pub(crate) fn start(extra: &[&str]) -> Option<RedisServer> {
        if Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            if std::env::var("CHATROOM_REQUIRE_REDIS").as_deref() == Ok("1") {
                panic!("redis-server is not installed, and CHATROOM_REQUIRE_REDIS=1");
            }
            eprintln!(
                "\n!!! SKIPPED: redis-server is not installed, so the Redis bus is NOT tested \
                 (apt-get install redis-server; CI sets CHATROOM_REQUIRE_REDIS=1) !!!\n"
            );
            return None;
        }
        // A free port can be taken between our check and redis-server's bind: try a few.
        for _ in 0..5 {
            if let Some(server) = RedisServer::spawn(free_port(), extra) {
                return Some(server);
            }
        }
        panic!("redis-server did not start on any of 5 ports");
    }

    /// Starts redis-server on `port` and waits until it is ready; `None` if it ended first
    /// (the port was taken) or took too long.
    fn spawn(port: u16, extra: &[&str]) -> Option<RedisServer> {
        let mut child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--loglevel", "notice"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let log = child.stdout.take().unwrap();
        let (ready_tx, ready) = mpsc::channel();
        let log_reader = thread::spawn(move || {
            for line in BufReader::new(log).lines() {
                let Ok(line) = line else { break };
                if line.contains("Ready to accept connections") {
                    let _ = ready_tx.send(());
                }
            }
        });
        let mut server = RedisServer {
            child,
            port,
            extra: extra.iter().map(|&arg| arg.to_owned()).collect(),
            log_reader: Some(log_reader),
        };
        if ready.recv_timeout(START_LIMIT).is_ok() && answers_ping(port) {
            return Some(server);
        }
        server.stop();
        None
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A connection of the test's own.
    pub(crate) fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|client| client.get_connection_with_timeout(TIMEOUT))
            .expect("a connection to the test's redis-server")
    }

    /// Returns once Redis has written its answers to every command it ran before: it writes
    /// them all before it reads the next commands. Killed after this, it cannot cut a server
    /// off from the answer to an append whose echo the test has read (the server would retry
    /// that append, a case of its own: PROTOCOL.md).
    pub(crate) fn answers_written(&self) {
        let _: String = redis::cmd("PING")
            .query(&mut self.connection())
            .expect("PING");
    }

    /// Kills it (SIGKILL: what it has not written to disk is lost) and reaps it.
    pub(crate) fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(reader) = self.log_reader.take() {
            let _ = reader.join();
        }
    }

    /// Stops it (if it still runs) and starts it again on the same port with the same
    /// arguments, so clients that know its URL find it again; returns once it is ready.
    pub(crate) fn restart(&mut self) {
        self.restart_with(&[]);
    }

    /// [`RedisServer::restart`], with `more` arguments for this start only.
    pub(crate) fn restart_with(&mut self, more: &[&str]) {
        self.stop();
        let mut extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        extra.extend(more);
        let again = RedisServer::spawn(self.port, &extra)
            .unwrap_or_else(|| panic!("redis-server did not start again on port {}", self.port));
        let kept = std::mem::take(&mut self.extra);
        // The old child is reaped: replacing it drops nothing that still runs.
        *self = again;
        self.extra = kept;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port of 127.0.0.1 that nothing listened on a moment ago.
pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether the server on `port` answers a PING (`+PONG`, or `-NOAUTH` from a server with a
/// password).
pub(crate) fn answers_ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut answer = [0u8; 16];
    stream.write_all(b"PING\r\n").is_ok()
        && matches!(stream.read(&mut answer), Ok(n) if n > 0 && matches!(answer[0], b'+' | b'-'))
}

/// [`support::config`] sharing rooms through `redis` under the key prefix `prefix`.
pub(crate) fn cluster_config(redis: &RedisServer, prefix: &str) -> Config {
    Config {
        redis: Some(redis.url()),
        redis_prefix: prefix.to_owned(),
        ..support::config()
    }
}

/// A chatroom server in this process (its own process id in Redis) that shares its rooms
/// through `redis` under `prefix`; servers given the same prefix are one deployment.
pub(crate) fn clustered(redis: &RedisServer, prefix: &str) -> ServerHandle {
    support::start(cluster_config(redis, prefix))
}
