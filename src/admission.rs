//! Who may connect: the connection cap, counted before any thread exists; the limits of one
//! address (connections, handshake rate, say rate: [`crate::addresses`]); and the handshake's
//! checks (a `Host` this server answers for, a valid room in the path, an acceptable
//! `Origin`). [`host_allowed`] serves the HTTP side too.
//!
//! The acceptor ([`crate::ws`]) asks [`Admission::try_admit`] for each accepted socket; the
//! reader ([`crate::client`]) asks [`Admission::check_request`] about its handshake. Neither
//! knows the other: both depend on this. Every refusal is counted by reason and logged in
//! summary ([`crate::metrics::Metrics::refused`]).
//!
//! A connection from a `--trust-proxy` address is a proxy speaking for its clients: its own
//! address says nothing, so its per-address limits wait for the handshake, whose
//! `X-Forwarded-For` (or `X-Real-IP`) names the client.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::addresses::{AddressBook, AddressLimits, AddressSlot, OverLimit};
use crate::config::{Config, RateLimit};
use crate::handshake::{Opening, Refusal};
use crate::limits::THREADS_PER_CLIENT;
use crate::metrics::Refused;
use crate::room::{normalize_room_name, GENERAL_ROOM};
use crate::shared::Shared;

/// One address's connections together may say this many times the burst and the rate of one
/// connection (`--rate-limit`): a few people behind one NAT chat freely, while one machine
/// with many connections cannot multiply its rate by its connection count.
const ADDRESS_SAY_BURST_FACTOR: u32 = 3;
const ADDRESS_SAY_RATE_FACTOR: f64 = 4.0;

/// Decides who may connect: the connection cap, and the handshake's room and Origin checks.
pub struct Admission {
    shared: Arc<Shared>,
    /// Connections allowed at once (the configured cap, lowered to what the host can hold).
    max_clients: usize,
    allowed_origins: Vec<String>,
    addresses: Arc<AddressBook>,
}

impl Admission {
    pub fn new(shared: Arc<Shared>, max_clients: usize) -> Self {
        let config = &shared.config;
        let addresses = AddressBook::new(AddressLimits {
            connections: config.max_per_address,
            handshakes: config.handshake_rate,
            says: config.rate_limit.map(|limit| RateLimit {
                burst: limit.burst.saturating_mul(ADDRESS_SAY_BURST_FACTOR),
                per_second: limit.per_second * ADDRESS_SAY_RATE_FACTOR,
            }),
        });
        Admission {
            allowed_origins: config
                .allowed_origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
            addresses,
            shared,
            max_clients,
        }
    }

    fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.shared
            .config
            .trusted_proxies
            .iter()
            .any(|proxy| proxy.to_canonical() == ip)
    }

    /// Counts a newly accepted connection against its address's limits (unless it comes from
    /// a trusted proxy: see [`Admission::check_request`]) and the server's cap, or says why
    /// not. Counts every thread of the process (HTTP's too), so WebSocket clients can never
    /// take the last threads the host allows.
    pub fn try_admit(&self, peer: SocketAddr) -> Result<Option<AddressSlot>, Refusal> {
        let address = if self.is_trusted_proxy(peer.ip()) {
            None
        } else {
            Some(self.admit_address(peer.ip(), peer)?)
        };
        let counter = &self.shared.clients;
        let admitted = counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_clients).then_some(n + 1)
            })
            .is_ok();
        if admitted && !self.shared.client_threads.room_for(THREADS_PER_CLIENT) {
            counter.fetch_sub(1, Ordering::AcqRel);
        } else if admitted {
            return Ok(address);
        }
        Err(self.refuse(Refused::Full, || format!("{peer}: server full")))
    }

    fn admit_address(&self, client: IpAddr, peer: SocketAddr) -> Result<AddressSlot, Refusal> {
        self.addresses
            .admit(client, Instant::now())
            .map_err(|over| match over {
                OverLimit::Handshakes => self.refuse(Refused::HandshakeRate, || {
                    format!("{client} (via {peer}): handshakes too fast")
                }),
                OverLimit::Connections => self.refuse(Refused::PerAddress, || {
                    format!("{client} (via {peer}): too many connections from one address")
                }),
            })
    }

    /// Counts a refusal (logged in summary) and gives the answer to send.
    fn refuse(&self, reason: Refused, detail: impl FnOnce() -> String) -> Refusal {
        self.shared.metrics.refused(reason, detail);
        match reason {
            Refused::Full => Refusal::new(503, "server full, try again later\n").retry_after(5),
            Refused::PerAddress => Refusal::new(
                503,
                "too many connections from your address, close some and try again\n",
            )
            .retry_after(5),
            Refused::HandshakeRate => {
                Refusal::new(429, "too many connections opened, slow down\n").retry_after(2)
            }
            Refused::Host => Refusal::new(403, "host not allowed: see --allowed-host\n"),
            Refused::Origin => Refusal::new(403, "origin not allowed\n"),
            Refused::Room => Refusal::new(404, "no such room\n"),
            Refused::BadRequest | Refused::HandshakeTimeout | Refused::NoHello => {
                Refusal::new(400, "bad request\n")
            }
        }
    }

    /// Counts a refusal that the caller answers itself (a malformed handshake, a deadline).
    pub fn count_refusal(&self, reason: Refused, detail: impl FnOnce() -> String) {
        self.shared.metrics.refused(reason, detail);
    }

    /// The handshake check: a client address within its limits (behind a trusted proxy,
    /// where `address` is still `None`), a `Host` this server answers for, a valid room in
    /// the path, and an acceptable Origin. Returns the room, or the refusal to send as the
    /// handshake's HTTP response.
    pub fn check_request(
        &self,
        opening: &Opening,
        peer: SocketAddr,
        address: &mut Option<AddressSlot>,
    ) -> Result<String, Refusal> {
        if address.is_none() && self.is_trusted_proxy(peer.ip()) {
            let client = self.forwarded_client(opening).unwrap_or(peer.ip());
            *address = Some(self.admit_address(client, peer)?);
        }
        let host = opening.host.as_deref().unwrap_or("");
        if !host_allowed(&self.shared.config, host) {
            return Err(self.refuse(Refused::Host, || {
                format!("{peer}: host {host:?} is not one this server answers for")
            }));
        }
        let path = opening.path.split(['?', '#']).next().unwrap_or("");
        let room = match path {
            "/ws" | "/ws/" => Some(GENERAL_ROOM.to_owned()),
            _ => path.strip_prefix("/ws/").and_then(normalize_room_name),
        };
        let Some(room) = room else {
            return Err(self.refuse(Refused::Room, || {
                format!("{peer}: invalid room path {path:?}")
            }));
        };
        if let Some(origin) = &opening.origin {
            if !self.origin_allowed(origin, host) {
                return Err(self.refuse(Refused::Origin, || {
                    format!("{peer}: foreign origin {origin:?}")
                }));
            }
        }
        Ok(room)
    }

    /// The client a trusted proxy speaks for: the last address in `X-Forwarded-For` that is
    /// not itself a trusted proxy (each proxy appends the address it heard from, so entries
    /// further left were written by the client and prove nothing), else `X-Real-IP`.
    fn forwarded_client(&self, opening: &Opening) -> Option<IpAddr> {
        let from_list = opening.forwarded_for.as_deref().and_then(|list| {
            list.rsplit(',')
                .map_while(|entry| parse_forwarded_ip(entry.trim()))
                .find(|ip| !self.is_trusted_proxy(*ip))
        });
        from_list.or_else(|| {
            opening
                .real_ip
                .as_deref()
                .and_then(|ip| parse_forwarded_ip(ip.trim()))
        })
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

/// An address as proxies write it: `203.0.113.7`, `2001:db8::1`, `[2001:db8::1]:4711` or
/// `203.0.113.7:4711`.
fn parse_forwarded_ip(entry: &str) -> Option<IpAddr> {
    entry
        .parse()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|addr| addr.ip()))
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
    fn forwarded_addresses_parse() {
        for (entry, ip) in [
            ("203.0.113.7", "203.0.113.7"),
            ("203.0.113.7:4711", "203.0.113.7"),
            ("2001:db8::1", "2001:db8::1"),
            ("[2001:db8::1]:4711", "2001:db8::1"),
        ] {
            assert_eq!(parse_forwarded_ip(entry), ip.parse().ok(), "{entry}");
        }
        assert_eq!(parse_forwarded_ip("unknown"), None);
        assert_eq!(parse_forwarded_ip("_hidden"), None);
    }

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
