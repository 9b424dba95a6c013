//! Reaching Redis: the URL, a connection with deadlines (over TLS for `rediss://`), and errors
//! a person can act on.
//!
//! [`super::Bus::connect`] and [`super::Follower::connect`] call [`parse_url`] and [`open`];
//! every failure of the bus becomes a [`BusError`] here, in one line that never shows the
//! password of the URL.
//!
//! # TLS
//! `rediss://` connections use rustls through the redis crate, and check the server's
//! certificate against the CA roots the system trusts (rustls-native-certs: the system's store,
//! or the PEM file in `SSL_CERT_FILE` / the directories in `SSL_CERT_DIR` when set), for the
//! host name of the URL. There is no way to turn the check off (the redis crate's `#insecure`
//! is refused), and no client certificate. A certificate that fails the check stops the
//! connection before any command is sent: one line names the address and why.

use std::fmt;
use std::sync::{Arc, Once};
use std::time::Duration;

use redis::{Connection, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisError};

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
    /// The URL cannot be used (syntax, scheme, a host name TLS cannot check): a configuration
    /// error.
    BadUrl,
    /// Redis refused the login (wrong password or user, or a password missing).
    Auth,
    /// No connection: nothing was sent, so nothing was applied. This includes a TLS handshake
    /// that failed (a certificate not trusted, or not for the host): a configuration error in
    /// practice, but one that stays "nothing sent" for a caller deciding whether a say that
    /// was lost in flight must be asked about again. At start-up every kind stops the server.
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

    /// Whether connections to it use TLS (`rediss://`).
    pub fn tls(&self) -> bool {
        matches!(self.info.addr(), ConnectionAddr::TcpTls { .. })
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

/// Parses `redis://HOST:PORT[/DB]`, `redis://user:pass@HOST:PORT[/DB]`, and the same with
/// `rediss://` for TLS (the redis crate's parser). For TLS the host must be a name (or an IP
/// address) a certificate can vouch for, and the redis crate's `#insecure` (no certificate
/// check) is refused.
pub fn parse_url(url: &str) -> Result<Target, BusError> {
    let bad = |why: &str| {
        BusError::new(
            BusErrorKind::BadUrl,
            format!(
                "bad Redis URL {:?}: {why} (expected redis://[user:password@]HOST[:PORT][/DB], \
                 or rediss:// for TLS)",
                hide_password(url)
            ),
        )
    };
    let scheme = url.split("://").next().unwrap_or("");
    if !url.contains("://")
        || !(scheme.eq_ignore_ascii_case("redis") || scheme.eq_ignore_ascii_case("rediss"))
    {
        return Err(bad("it must start with redis:// or rediss://"));
    }
    let info = url
        .into_connection_info()
        .map_err(|e| bad(e.detail().unwrap_or(&e.to_string())))?;
    let shown = info.addr().to_string();
    if shown.is_empty() || shown.starts_with(':') {
        return Err(bad("no host"));
    }
    if let ConnectionAddr::TcpTls { host, insecure, .. } = info.addr() {
        if *insecure {
            return Err(bad("#insecure: the server's certificate is always checked"));
        }
        if rustls::pki_types::ServerName::try_from(host.as_str()).is_err() {
            return Err(bad(&format!(
                "{host:?} is not a host name a TLS certificate can name"
            )));
        }
    }
    Ok(Target { info, shown })
}

/// Installs ring as rustls' crypto for the whole process, once, before the first TLS
/// connection. rustls is built here with no default provider (Cargo.toml), and with two
/// compiled in (should another crate ever add aws-lc-rs) it would refuse to choose. A provider
/// already installed by whoever embeds the library stays.
fn install_tls_crypto() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The rustls error under `error`, if the connection failed in TLS: the redis crate keeps
/// it either as is (building the session) or inside the `io::Error` that rustls' stream gave
/// (the handshake runs at the first read or write).
fn tls_error(error: &RedisError) -> Option<&rustls::Error> {
    let inner = cause(error)?;
    inner.downcast_ref::<rustls::Error>().or_else(|| {
        inner
            .downcast_ref::<std::io::Error>()?
            .get_ref()?
            .downcast_ref::<rustls::Error>()
    })
}

/// The error the redis crate wrapped in `error`, if any. It keeps it in an Arc, which hides
/// the type behind one more layer than `source` shows.
fn cause(error: &RedisError) -> Option<&(dyn std::error::Error + 'static)> {
    use std::error::Error;
    let source = error.source()?;
    match source.downcast_ref::<Arc<dyn Error + Send + Sync>>() {
        Some(shared) => Some(&**shared),
        None => Some(source),
    }
}

/// Why TLS with the server `shown` failed, in words to follow "Redis at HOST:PORT".
fn tls_why(shown: &str, error: &rustls::Error) -> String {
    use rustls::{CertificateError, Error};
    let host = shown.rsplit_once(':').map_or(shown, |(host, _port)| host);
    match error {
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            " failed the TLS check: its certificate is not trusted (not signed by a CA in the \
             system's roots, or in SSL_CERT_FILE / SSL_CERT_DIR when set)"
                .to_owned()
        }
        Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!(
            " failed the TLS check: its certificate is not trusted for the name {host} (use the \
             host name the certificate names)"
        ),
        Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => " failed the TLS check: its certificate has expired".to_owned(),
        Error::InvalidCertificate(other) => {
            format!(" failed the TLS check: its certificate is not trusted ({other:?})")
        }
        Error::InvalidMessage(_) | Error::InappropriateMessage { .. } => format!(
            ": TLS failed, the answer was not TLS ({error}); is that its TLS port? A plain \
             port takes redis://"
        ),
        _ => format!(": TLS failed ({error})"),
    }
}

/// Turns a redis crate error into a [`BusError`] about the server `shown`. `sent`: whether a
/// command may have reached Redis (then a broken connection is [`BusErrorKind::Lost`]).
pub(crate) fn classify(shown: &str, error: &RedisError, sent: bool) -> BusError {
    use redis::ErrorKind;
    if let Some(tls) = tls_error(error) {
        // A failed handshake sent no command; a TLS error later broke a working connection.
        let kind = if sent {
            BusErrorKind::Lost
        } else {
            BusErrorKind::Unreachable
        };
        return BusError::new(kind, format!("Redis at {shown}{}", tls_why(shown, tls)));
    }
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
/// sets the read and write deadlines, and checks the server answers a PING. Over TLS, the
/// handshake (and so the certificate check) happens by the PING at the latest.
pub fn open(target: &Target, timeouts: Timeouts) -> Result<Connection, BusError> {
    let shown = &target.shown;
    if target.tls() {
        install_tls_crypto();
    }
    let client = redis::Client::open(target.info.clone()).map_err(|e| {
        BusError::new(
            BusErrorKind::BadUrl,
            format!("bad Redis address {shown}: {e}"),
        )
    })?;
    // Nothing was applied yet. Where the scheme and the port may not match, say so.
    let failed = |e: RedisError| {
        let mut error = classify(shown, &e, false);
        if tls_error(&e).is_some() {
            return error;
        }
        let io = cause(&e).is_some_and(|c| c.is::<std::io::Error>());
        if target.tls() && e.kind() == redis::ErrorKind::Io && !io {
            // The one other failure of the redis crate's TLS set-up: reading the CA roots.
            error.message = format!("Redis at {shown}: cannot load the CA roots for TLS: {e}");
        } else if target.tls() && e.is_timeout() {
            error
                .message
                .push_str(" (is that its TLS port? a plain port takes redis://)");
        } else if !target.tls() && e.is_connection_dropped() && !e.is_connection_refusal() {
            error
                .message
                .push_str(" (is that a TLS port? those take rediss://)");
        }
        error
    };
    let mut conn = client
        .get_connection_with_timeout(timeouts.connect)
        .map_err(failed)?;
    conn.set_read_timeout(Some(timeouts.read))
        .and_then(|()| conn.set_write_timeout(Some(timeouts.write)))
        .map_err(failed)?;
    let pong: String = redis::cmd("PING").query(&mut conn).map_err(failed)?;
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
        let tls = parse_url("rediss://u:secret@redis.example:6380/2").unwrap();
        assert!(tls.tls() && !parse_url("redis://h:1").unwrap().tls());
        assert_eq!(tls.shown(), "redis.example:6380");
        assert!(parse_url("REDISS://127.0.0.1:6380").unwrap().tls());
        for bad in [
            "",
            "127.0.0.1:6379",
            "http://x",
            "redis://u:secret@:1/x",
            "redis://h/abc",
            "rediss://u:secret@h:1#insecure",
            "rediss://u:secret@h:1#other",
            "rediss://u:secret@",
            "redis+tls://u:secret@h:1",
        ] {
            let e = parse_url(bad).unwrap_err();
            assert_eq!(e.kind, BusErrorKind::BadUrl, "{bad}");
            assert!(!e.message.contains("secret"), "{e}");
            assert!(!e.message.contains('\n'), "{e}");
        }
        let e = parse_url("rediss://h:1#insecure").unwrap_err();
        assert!(e.message.contains("always checked"), "{e}");
    }

    #[test]
    fn tls_failures_name_the_certificate() {
        use rustls::{CertificateError, Error};
        let unknown = Error::InvalidCertificate(CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, unknown);
        let e = classify("localhost:6380", &RedisError::from(io), false);
        assert_eq!(e.kind, BusErrorKind::Unreachable);
        assert!(
            e.message
                .starts_with("Redis at localhost:6380 failed the TLS check")
                && e.message.contains("certificate is not trusted"),
            "{e}"
        );
        let name = Error::InvalidCertificate(CertificateError::NotValidForName);
        let e = classify("127.0.0.1:6380", &RedisError::from(name), true);
        assert_eq!(e.kind, BusErrorKind::Lost);
        assert!(
            e.message.contains("not trusted for the name 127.0.0.1"),
            "{e}"
        );
        let other = Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType);
        let e = classify("h:1", &RedisError::from(other), false);
        assert!(e.message.starts_with("Redis at h:1: TLS failed"), "{e}");
        // Not TLS: as before.
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let e = classify("h:1", &RedisError::from(refused), false);
        assert_eq!(e.message, "cannot reach Redis at h:1: connection refused");
    }

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(hide_password("redis://u:pw@h:1"), "redis://***@h:1");
        assert_eq!(hide_password("redis://h:1"), "redis://h:1");
    }
}
