//! Reaching Redis: the URL, a connection with deadlines, and errors a person can act on.
//!
//! [`super::Bus::connect`] and [`super::Follower::connect`] call [`parse_url`] and [`open`];
//! every failure of the bus becomes a [`BusError`] here, in one line that never shows the
//! password of the URL.

use std::fmt;
use std::time::Duration;

use redis::{Connection, ConnectionInfo, IntoConnectionInfo, RedisError};

/// Deadlines for one connection. A Redis that accepts TCP and never answers costs at most
/// `connect` at start-up (the handshake, AUTH and SELECT included) and `read` per command.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub connect: Duration,
    pub read: Duration,
    pub write: Duration,
}

impl Default for Timeouts {
    /// Two seconds each: Redis answers in well under a millisecond on a LAN, so a second of
    /// silence already means trouble, and a say should hear back within a few seconds.
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(2),
            read: Duration::from_secs(2),
            write: Duration::from_secs(2),
        }
    }
}

/// What went wrong, for a caller that must choose between retrying, reconnecting and giving up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusErrorKind {
    /// The URL cannot be used (syntax, scheme, TLS not built in): a configuration error.
    BadUrl,
    /// Redis refused the login (wrong password or user, or a password missing).
    Auth,
    /// No connection: nothing was sent, so nothing was applied.
    Unreachable,
    /// The connection broke or timed out during a command: it may or may not have been
    /// applied. Retry an append with the same token to find out.
    Lost,
    /// Redis answered with an error (a script error, a wrong type): the command was refused.
    Refused,
}

/// A bus failure, displayed as one line, e.g. `cannot reach Redis at 127.0.0.1:6399:
/// connection refused`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BusError {
    pub kind: BusErrorKind,
    pub message: String,
}

impl BusError {
    pub(crate) fn new(kind: BusErrorKind, message: String) -> BusError {
        BusError { kind, message }
    }

    /// Whether a command that failed so may still have been applied.
    pub fn may_have_applied(&self) -> bool {
        self.kind == BusErrorKind::Lost
    }
}

impl fmt::Display for BusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for BusError {}

/// A parsed Redis URL, and how to name its server in messages (`host:port`, no password).
#[derive(Clone, Debug)]
pub struct Target {
    pub(crate) info: ConnectionInfo,
    pub(crate) shown: String,
}

impl Target {
    /// `host:port` of the server, for messages.
    pub fn shown(&self) -> &str {
        &self.shown
    }
}

/// The URL with whatever stands between `scheme://` and `@` (user and password) hidden.
fn hide_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(start), Some(at)) if at > start + 3 => {
            format!("{}***{}", &url[..start + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// Parses `redis://HOST:PORT[/DB]`, `redis://user:pass@HOST:PORT[/DB]` (the redis crate's
/// parser). `rediss://` (TLS) is recognised and refused clearly: this build has no TLS.
pub fn parse_url(url: &str) -> Result<Target, BusError> {
    let bad = |why: &str| {
        BusError::new(
            BusErrorKind::BadUrl,
            format!(
                "bad Redis URL {:?}: {why} (expected redis://[user:password@]HOST[:PORT][/DB])",
                hide_password(url)
            ),
        )
    };
    let scheme = url.split("://").next().unwrap_or("");
    if url.contains("://") && scheme.eq_ignore_ascii_case("rediss") {
        return Err(bad("rediss:// (TLS) is not built into this chatroom yet"));
    }
    if !url.contains("://") || !scheme.eq_ignore_ascii_case("redis") {
        return Err(bad("it must start with redis://"));
    }
    let info = url
        .into_connection_info()
        .map_err(|e| bad(e.detail().unwrap_or(&e.to_string())))?;
    let shown = info.addr().to_string();
    if shown.is_empty() || shown.starts_with(':') {
        return Err(bad("no host"));
    }
    Ok(Target { info, shown })
}

/// Turns a redis crate error into a [`BusError`] about the server `shown`. `sent`: whether a
/// command may have reached Redis (then a broken connection is [`BusErrorKind::Lost`]).
pub(crate) fn classify(shown: &str, error: &RedisError, sent: bool) -> BusError {
    use redis::ErrorKind;
    let code = error.code().unwrap_or("");
    if error.kind() == ErrorKind::AuthenticationFailed
        || matches!(code, "WRONGPASS" | "NOAUTH" | "NOPERM")
    {
        let why = match code {
            "NOAUTH" => "it needs a password (give it as redis://:PASSWORD@HOST:PORT)".to_owned(),
            _ => format!(
                "{} {}",
                code,
                error.detail().unwrap_or("wrong user name or password")
            )
            .trim()
            .to_owned(),
        };
        return BusError::new(
            BusErrorKind::Auth,
            format!("Redis at {shown} refused the login: {why}"),
        );
    }
    if error.is_io_error() || error.is_timeout() || error.is_connection_dropped() {
        let why = if error.is_connection_refusal() {
            "connection refused".to_owned()
        } else if error.is_timeout() {
            "no answer in time".to_owned()
        } else if error.is_connection_dropped() {
            "the connection was closed".to_owned()
        } else {
            error.to_string()
        };
        let kind = if sent {
            BusErrorKind::Lost
        } else {
            BusErrorKind::Unreachable
        };
        return BusError::new(kind, format!("cannot reach Redis at {shown}: {why}"));
    }
    BusError::new(
        BusErrorKind::Refused,
        format!("Redis at {shown} answered with an error: {error}"),
    )
}

/// Connects to `target` within `timeouts.connect` (login and database selection included),
/// sets the read and write deadlines, and checks the server answers a PING.
pub fn open(target: &Target, timeouts: Timeouts) -> Result<Connection, BusError> {
    let shown = &target.shown;
    let client = redis::Client::open(target.info.clone()).map_err(|e| {
        BusError::new(
            BusErrorKind::BadUrl,
            format!("bad Redis address {shown}: {e}"),
        )
    })?;
    let mut conn = client
        .get_connection_with_timeout(timeouts.connect)
        .map_err(|e| classify(shown, &e, false))?;
    conn.set_read_timeout(Some(timeouts.read))
        .and_then(|()| conn.set_write_timeout(Some(timeouts.write)))
        .map_err(|e| classify(shown, &e, false))?;
    let pong: String = redis::cmd("PING")
        .query(&mut conn)
        .map_err(|e| classify(shown, &e, false))?;
    if pong != "PONG" {
        return Err(BusError::new(
            BusErrorKind::Refused,
            format!("Redis at {shown} answered PING with {pong:?}"),
        ));
    }
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("redis://127.0.0.1:6399").unwrap().shown(),
            "127.0.0.1:6399"
        );
        assert_eq!(
            parse_url("redis://u:p@example:1/3").unwrap().shown(),
            "example:1"
        );
        for bad in [
            "",
            "127.0.0.1:6379",
            "http://x",
            "redis://u:secret@:1/x",
            "redis://h/abc",
        ] {
            let e = parse_url(bad).unwrap_err();
            assert_eq!(e.kind, BusErrorKind::BadUrl, "{bad}");
            assert!(!e.message.contains("secret"), "{e}");
        }
        let e = parse_url("rediss://u:secret@h:1").unwrap_err();
        assert!(
            e.message.contains("TLS") && !e.message.contains("secret"),
            "{e}"
        );
    }

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(hide_password("redis://u:pw@h:1"), "redis://***@h:1");
        assert_eq!(hide_password("redis://h:1"), "redis://h:1");
    }
}
