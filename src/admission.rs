//! Who may connect: the connection cap, counted before any thread exists, and the
//! handshake's checks (a `Host` this server answers for, a valid room in the path, an
//! acceptable `Origin`). [`host_allowed`] serves the HTTP side too.
//!
//! The acceptor ([`crate::ws`]) asks [`Admission::try_admit`] for each accepted socket; the
//! reader ([`crate::client`]) asks [`Admission::check_request`] about its handshake. Neither
//! knows the other: both depend on this.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use log::warn;

use crate::config::Config;
use crate::handshake::{Opening, Refusal};
use crate::limits::THREADS_PER_CLIENT;
use crate::room::{normalize_room_name, GENERAL_ROOM};
use crate::shared::Shared;

/// Decides who may connect: the connection cap, and the handshake's room and Origin checks.
pub struct Admission {
    shared: Arc<Shared>,
    /// Connections allowed at once (the configured cap, lowered to what the host can hold).
    max_clients: usize,
    allowed_origins: Vec<String>,
}

impl Admission {
    pub fn new(shared: Arc<Shared>, max_clients: usize) -> Self {
        Admission {
            allowed_origins: shared
                .config
                .allowed_origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
            shared,
            max_clients,
        }
    }

    /// Counts a new connection against the cap, or says no. Counts every thread of the process
    /// (HTTP's too), so WebSocket clients can never take the last threads the host allows.
    pub fn try_admit(&self) -> bool {
        let counter = &self.shared.clients;
        let admitted = counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_clients).then_some(n + 1)
            })
            .is_ok();
        if admitted && !self.shared.client_threads.room_for(THREADS_PER_CLIENT) {
            counter.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        admitted
    }

    /// The handshake check: a valid room in the path, and an acceptable Origin. Returns the
    /// room, or the refusal to send as the handshake's HTTP response.
    pub fn check_request(&self, opening: &Opening) -> Result<String, Refusal> {
        let host = opening.host.as_deref().unwrap_or("");
        if !host_allowed(&self.shared.config, host) {
            warn!("refused handshake: host {host:?} is not one this server answers for");
            return Err(Refusal::new(403, "host not allowed: see --allowed-host\n"));
        }
        let path = opening.path.split(['?', '#']).next().unwrap_or("");
        let room = match path {
            "/ws" | "/ws/" => Some(GENERAL_ROOM.to_owned()),
            _ => path.strip_prefix("/ws/").and_then(normalize_room_name),
        };
        let Some(room) = room else {
            warn!("refused handshake: invalid room path {path:?}");
            return Err(Refusal::new(404, "no such room\n"));
        };
        if let Some(origin) = &opening.origin {
            let host = opening.host.as_deref().unwrap_or("");
            if !self.origin_allowed(origin, host) {
                warn!("refused handshake: foreign origin {origin:?}");
                return Err(Refusal::new(403, "origin not allowed\n"));
            }
        }
        Ok(room)
    }

    fn origin_allowed(&self, origin: &str, host: &str) -> bool {
        let origin = origin.trim_end_matches('/').to_ascii_lowercase();
        if self.allowed_origins.contains(&origin) {
            return true;
        }
        let origin_host = origin
            .split_once("://")
            .map(|(_, rest)| hostname(rest))
            .unwrap_or_default();
        !origin_host.is_empty() && origin_host == hostname(&host.to_ascii_lowercase())
    }
}

/// The hostname of `host[:port]`, `[v6]:port` included.
pub fn hostname(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    authority.split(':').next().unwrap_or("")
}

/// Whether a request's `Host` names this server: an IP address, `localhost`, the host of
/// `--ws-url`, or one listed with `--allowed-host`. Anything else may be DNS rebinding: a
/// page on a name its attacker controls, pointed at this machine's address, reading and
/// posting as if it were served by chatroom. A request without `Host` is refused (browsers
/// always send one).
pub fn host_allowed(config: &Config, host: &str) -> bool {
    let name = hostname(host).to_ascii_lowercase();
    let name = name.trim_end_matches('.');
    if name.is_empty() {
        return false;
    }
    name.parse::<std::net::IpAddr>().is_ok()
        || name == "localhost"
        || config.allowed_hosts.iter().any(|allowed| allowed == name)
        || config.ws_url.as_deref().is_some_and(|url| {
            let authority = url.split("://").nth(1).unwrap_or("");
            let authority = authority.split('/').next().unwrap_or("");
            hostname(authority).eq_ignore_ascii_case(name)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_literals_localhost_and_listed_names_are_answered() {
        let config = Config {
            allowed_hosts: vec!["chat.example.org".into()],
            ws_url: Some("wss://ws.example.net/ws".into()),
            ..Config::default()
        };
        for good in [
            "127.0.0.1:5001",
            "10.1.2.3",
            "[::1]:5000",
            "localhost:5000",
            "LOCALHOST",
            "chat.example.org",
            "Chat.Example.Org:443",
            "ws.example.net",
        ] {
            assert!(host_allowed(&config, good), "{good}");
        }
        for bad in [
            "",
            "evil.example:5001",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "example.org",
        ] {
            assert!(!host_allowed(&config, bad), "{bad}");
        }
    }
}
