//! `--redis rediss://…` (issue 12): the chatroom binary talking TLS to a real redis-server that
//! has no plain port, with a throwaway CA made by the `openssl` CLI. The CA is trusted through
//! `SSL_CERT_FILE`, which is process-wide, so the server under test runs as a child process
//! (the binary), never in this one.
//!
//! Covered: `/healthz` reports the bus up and a message goes from one client to another
//! through Redis over TLS; a certificate from a CA the process does not trust, one that does
//! not name the URL's host, and a TLS URL aimed at a plain port each stop the start (exit 1)
//! with one line naming the address and the reason. Skipped loudly without redis-server or
//! openssl, a failure instead with `CHATROOM_REQUIRE_REDIS=1` (as in `redis_support`).

use std::process::{Command, Stdio};

use crate::redis_support::free_port;
use crate::support::{health, joined_at, ChildGuard, ChildServer, TempDir, BIN, TIMEOUT};

/// A throwaway CA, a server certificate it signed for `localhost` only (so `127.0.0.1` is a
/// name the certificate does not give), and an unrelated CA, as PEM files in a temp dir.
struct Pki {
    dir: TempDir,
}

impl Pki {
    /// Makes the keys and certificates (valid two days) with the `openssl` CLI.
    fn make() -> Pki {
        let pki = Pki {
            dir: TempDir::new("redis-tls"),
        };
        for (ca, name) in [("ca", "test-ca"), ("other-ca", "unrelated-ca")] {
            pki.openssl(&format!(
                "req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN={name} \
                 -keyout {ca}.key -out {ca}.pem"
            ));
        }
        pki.openssl(
            "req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout server.key -out server.csr",
        );
        std::fs::write(pki.dir.join("san.cnf"), "subjectAltName=DNS:localhost\n").unwrap();
        pki.openssl(
            "x509 -req -days 2 -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
             -extfile san.cnf -out server.pem",
        );
        pki
    }

    /// Runs `openssl` with the words of `args` in the directory; quiet unless it fails.
    fn openssl(&self, args: &str) {
        let out = Command::new("openssl")
            .current_dir(self.dir.path())
            .args(args.split_whitespace())
            .stdin(Stdio::null())
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A file of the directory, as an argument.
    fn file(&self, name: &str) -> String {
        self.dir
            .join(name)
            .to_str()
            .expect("UTF-8 temp paths")
            .to_owned()
    }
}

/// A redis-server that takes only TLS connections (`--port 0`: no plain port), on a plain
/// port as well when asked; killed by its PID on drop ([`ChildGuard`]).
struct TlsRedis {
    /// Kept for its `Drop`.
    _process: ChildGuard,
    tls_port: u16,
    plain_port: Option<u16>,
}

impl TlsRedis {
    /// Starts one with `pki`'s server certificate; returns once its log says it is ready.
    fn start(pki: &Pki, with_plain_port: bool) -> TlsRedis {
        // A free port can be taken between our check and redis-server's bind: try a few.
        for _ in 0..5 {
            let tls_port = free_port();
            let plain_port = with_plain_port.then(free_port);
            let mut command = Command::new("redis-server");
            command
                .args(["--port", &plain_port.unwrap_or(0).to_string()])
                .args(["--tls-port", &tls_port.to_string(), "--bind", "127.0.0.1"])
                .args(["--tls-cert-file", &pki.file("server.pem")])
                .args(["--tls-key-file", &pki.file("server.key")])
                .args(["--tls-ca-cert-file", &pki.file("ca.pem")])
                .args(["--tls-auth-clients", "no"])
                .args(["--save", "", "--appendonly", "no", "--loglevel", "notice"]);
            let process = ChildGuard::spawn(command);
            // Lines until the ready one; the log ends early if the child exits (a port taken).
            while let Some(line) = process.next_stdout_line() {
                if line.contains("Ready to accept connections") {
                    return TlsRedis {
                        _process: process,
                        tls_port,
                        plain_port,
                    };
                }
            }
        }
        panic!("redis-server did not start with TLS on any of 5 ports");
    }
}

/// Whether redis-server and openssl are both installed. When one is not, says so loudly
/// (the test then passes without running), or fails with `CHATROOM_REQUIRE_REDIS=1`, as
/// `redis_support` does for redis-server alone.
fn tools_installed() -> bool {
    for (tool, version) in [("redis-server", "--version"), ("openssl", "version")] {
        let found = Command::new(tool)
            .arg(version)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if found {
            continue;
        }
        if std::env::var("CHATROOM_REQUIRE_REDIS").as_deref() == Ok("1") {
            panic!("{tool} is not installed, and CHATROOM_REQUIRE_REDIS=1");
        }
        eprintln!(
            "\n!!! SKIPPED: {tool} is not installed, so rediss:// is NOT tested \
             (apt-get install redis-server openssl; CI sets CHATROOM_REQUIRE_REDIS=1) !!!\n"
        );
        return false;
    }
    true
}

/// The binary on ephemeral ports, no history on disk, limits off, sharing rooms through
/// `url`, trusting exactly the CAs in `ca_file`.
fn chatroom(url: &str, ca_file: &str) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(["--addr", "127.0.0.1:0", "--ws-addr", "127.0.0.1:0"])
        .args(["--data", "none", "--rate-limit", "off"])
        .args(["--max-per-ip", "off", "--handshake-rate", "off"])
        .args(["--redis", url])
        .env("SSL_CERT_FILE", ca_file)
        // rustls-native-certs reads this too; the test's trust is the file alone.
        .env_remove("SSL_CERT_DIR");
    command
}

#[test]
fn a_message_goes_through_redis_over_tls() {
    if !tools_installed() {
        return;
    }
    let pki = Pki::make();
    let redis = TlsRedis::start(&pki, false);
    let url = format!("rediss://localhost:{}", redis.tls_port);
    // The listening line comes after both Redis connections (TLS handshakes included).
    let server = ChildServer::from_command(chatroom(&url, &pki.file("ca.pem")));
    let bus = &health(server.http)["bus"];
    assert_eq!(bus["state"], "up", "{bus}");
    assert_eq!(
        bus["redis"],
        format!("localhost:{}", redis.tls_port),
        "{bus}"
    );

    // Redis has no plain port: this message can only go through TLS.
    let (mut alice, _) = joined_at(server.ws, "lobby", "alice");
    let (mut bob, _) = joined_at(server.ws, "lobby", "bob");
    alice.expect_type("joined");
    alice.say("hello over TLS");
    let echo = alice.expect_said("alice", "hello over TLS");
    let heard = bob.expect_said("alice", "hello over TLS");
    assert_eq!(echo["id"], heard["id"]);
    server.stop_with("TERM");
}

#[test]
fn a_certificate_that_fails_the_check_stops_the_start() {
    if !tools_installed() {
        return;
    }
    let pki = Pki::make();
    let redis = TlsRedis::start(&pki, true);
    let port = redis.tls_port;
    let plain = redis.plain_port.expect("asked for a plain port");

    // Signed by a CA this process does not trust.
    let line = refused_start(
        &format!("rediss://localhost:{port}"),
        &pki.file("other-ca.pem"),
    );
    assert!(line.contains(&format!("localhost:{port}")), "{line}");
    assert!(
        line.contains("TLS") && line.contains("certificate is not trusted"),
        "{line}"
    );

    // Trusted, but not for this host name.
    let line = refused_start(&format!("rediss://127.0.0.1:{port}"), &pki.file("ca.pem"));
    assert!(line.contains(&format!("127.0.0.1:{port}")), "{line}");
    assert!(
        line.contains("TLS") && line.contains("for the name 127.0.0.1"),
        "{line}"
    );

    // A TLS URL aimed at the plain port: no answer in TLS, and a hint.
    let line = refused_start(&format!("rediss://localhost:{plain}"), &pki.file("ca.pem"));
    assert!(line.contains(&format!("localhost:{plain}")), "{line}");
    assert!(line.contains("TLS port"), "{line}");
}

/// Runs the binary against `url` trusting `ca_file`: it must exit 1 within [`TIMEOUT`]
/// without a listening line and with one line on stderr. Returns that line.
fn refused_start(url: &str, ca_file: &str) -> String {
    let mut process = ChildGuard::spawn(chatroom(url, ca_file));
    let (status, stdout, stderr) = process.wait_exit(TIMEOUT);
    assert_eq!(status.code(), Some(1), "{url}: {status}; stderr:\n{stderr}");
    assert!(stdout.is_empty(), "{url}: stdout {stdout:?}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line on stderr, got:\n{stderr}");
    assert!(lines[0].starts_with("chatroom: cannot start:"), "{stderr}");
    lines[0].to_owned()
}
