//! The HTTP side cannot die or be held by one client: fd exhaustion, a slow reader, `/metrics`.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use chatroom::config::AddressRange;
use chatroom::http::QUEUE_PER_CONNECTION;
use chatroom::Config;
use socket2::{Domain, Socket, Type};

use crate::support::{
    config, get, joined, joined_at, read_response, start, tcp, wait_until, ChildServer, BIN,
};

/// Sends `GET path` on a fresh connection and waits at most `limit` for the status code;
/// `None` when the server does not answer in time (or cannot be reached).
fn status_within(addr: SocketAddr, path: &str, limit: Duration) -> Option<u16> {
    let stream = TcpStream::connect_timeout(&addr, limit).ok()?;
    stream.set_read_timeout(Some(limit)).ok()?;
    stream.set_write_timeout(Some(limit)).ok()?;
    let mut stream = stream;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    String::from_utf8_lossy(&head)
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
}

/// File descriptors the process `pid` has open now.
fn open_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| dir.count())
        .unwrap_or(0)
}

/// tiny_http's accept thread dies without a word when it takes the last file descriptor: its
/// `accept` succeeds and cloning the new socket (its second fd) panics. Whether a flood of idle
/// connections ends there, or one fd earlier (where `accept` itself fails with EMFILE, an error
/// the server has always survived), depends on the parity of the free fds, which the test
/// cannot see exactly (the server opens a transient one now and then). So it floods, and if
/// tiny_http did not panic, releases the flood, holds one more descriptor in the server with
/// a WebSocket client, and floods again. After the panic the page must answer within seconds.
#[test]
fn http_comes_back_after_the_fd_limit_kills_tiny_http() {
    // 1,100 descriptors, soft and hard, so the binary's raise cannot lift them: enough for a
    // WebSocket cap of 76 (the limit less the 1,024 kept for HTTP and files) and for the
    // flood to reach the limit in about 540 connections.
    const LIMIT: usize = 1100;
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(format!(
            "ulimit -Sn {LIMIT} && ulimit -Hn {LIMIT} && exec \"$0\" \"$@\""
        ))
        .arg(BIN)
        .args(["--addr", "127.0.0.1:0", "--ws-addr", "127.0.0.1:0"])
        .args(["--rate-limit", "off", "--data", "none"]);
    let server = ChildServer::from_command(command);
    let pid = server.process.pid();
    assert_eq!(status_within(server.http, "/healthz", ANSWER), Some(200));

    let mut holders = Vec::new();
    for round in 0.. {
        assert!(round < 4, "tiny_http never panicked at the fd limit");
        let free = LIMIT - open_fds(pid);
        let seen = server.process.stderr().len();
        let news = || server.process.stderr()[seen..].to_owned();
        // Each accepted connection takes two descriptors; a few more than fit.
        let flood: Vec<TcpStream> = (0..free / 2 + 20).map(|_| tcp(server.http)).collect();
        // Which way the flood ended is only visible in what the child wrote: a panic, or
        // the accept error the server logs.
        wait_until("the flood reaches the fd limit", || {
            let stderr = news();
            stderr.contains("panicked") || stderr.contains("Too many open files")
        });
        if news().contains("panicked") {
            drop(flood);
            break;
        }
        drop(flood);
        // The accept error was survived: the page answers once the flood is gone.
        let deadline = Instant::now() + RECOVERY;
        while status_within(server.http, "/healthz", Duration::from_secs(1)) != Some(200) {
            assert!(Instant::now() < deadline, "no recovery from EMFILE");
        }
        holders.push(joined_at(server.ws, "room1", &format!("holder{round}")).0);
    }
    drop(holders);

    let deadline = Instant::now() + RECOVERY;
    while status_within(server.http, "/healthz", Duration::from_secs(1)) != Some(200) {
        assert!(
            Instant::now() < deadline,
            "/healthz did not answer again within {RECOVERY:?} after tiny_http died; \
             stderr:\n{}",
            server.process.stderr()
        );
    }
    let metrics = get(server.http, "/metrics").text();
    assert!(
        metric(&metrics, "chatroom_http_rebuilds_total") >= 1,
        "{metrics}"
    );
}

/// How long a healthy server may take to answer one request: milliseconds in practice.
const ANSWER: Duration = Duration::from_secs(10);
/// How soon HTTP must serve again after its accept thread died: the watch looks about once a
/// second, so this is a margin of ten for a loaded machine.
const RECOVERY: Duration = Duration::from_secs(20);

/// The value of an unlabelled sample in a Prometheus text body.
fn metric(body: &str, name: &str) -> u64 {
    body.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in:\n{body}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{name} is not a number ({e}):\n{body}"))
}

/// The send and receive queues of the TCP socket from `local` to `remote`, from
/// `/proc/net/tcp` (this test's network namespace sees the server's sockets too).
fn tcp_queues(local: SocketAddr, remote: SocketAddr) -> Option<(u64, u64)> {
    let hex = |addr: SocketAddr| match addr {
        SocketAddr::V4(v4) => format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(v4.ip().octets()),
            v4.port()
        ),
        SocketAddr::V6(_) => unreachable!("the tests use IPv4"),
    };
    let (local, remote) = (hex(local), hex(remote));
    let table = fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) != Some(&local.as_str()) || fields.get(2) != Some(&remote.as_str()) {
            return None;
        }
        let (tx, rx) = fields.get(4)?.split_once(':')?;
        Some((
            u64::from_str_radix(tx, 16).ok()?,
            u64::from_str_radix(rx, 16).ok()?,
        ))
    })
}

/// One connection with a tiny receive window pipelines requests for the largest asset and
/// never reads. The server's writes to it block; another client's request must not wait for
/// them. (As many requests as one connection may queue: a few more, and the server drops
/// them unanswered, which may happen before its first write blocks, and then there would be
/// no blocked write to test beside.)
#[test]
fn a_client_that_does_not_read_holds_only_its_own_connection() {
    // A long write timeout, so that if responses to the slow reader blocked everyone, the other
    // client's request would wait for a minute (the test's own read timeout is 10 s).
    let server = start(Config {
        http_idle_timeout: Duration::from_secs(60),
        ..config()
    });
    let addr = server.http_addr();
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(1024).unwrap();
    socket.connect(&addr.into()).unwrap();
    let mut slow: TcpStream = socket.into();
    let request = format!("GET /static/app.js HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    slow.write_all(request.repeat(QUEUE_PER_CONNECTION).as_bytes())
        .unwrap();
    let slow_addr = slow.local_addr().unwrap();

    // The event to wait for: the server holds bytes for the slow reader that it cannot send
    // (its send queue stays non-empty while the reader's window is full).
    wait_until("the server's writes to the slow reader back up", || {
        tcp_queues(addr, slow_addr).is_some_and(|(tx, _)| tx > 0)
            && tcp_queues(slow_addr, addr).is_some_and(|(_, rx)| rx > 0)
    });

    // An answer from memory takes milliseconds; 5 s is a margin of hundreds, and still far
    // below the 60 s one blocked write would hold a server that answers on one thread.
    for _ in 0..3 {
        let started = Instant::now();
        let mut other = tcp(addr);
        other
            .write_all(format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
            .unwrap();
        let response = read_response(&mut other, false);
        assert_eq!(response.status, 200);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "/healthz took {:?} beside a slow reader",
            started.elapsed()
        );
    }
    drop(slow);
    drop(server);
}

#[test]
fn metrics_are_served_to_loopback_in_the_prometheus_format() {
    let server = start(config());
    let (_client, _) = joined(&server, "room1", "alice");
    let response = get(server.http_addr(), "/metrics");
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(
        response.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let body = response.text();
    assert_eq!(metric(&body, "chatroom_connections"), 1);
    assert_eq!(metric(&body, "chatroom_rooms"), 1);
    assert!(metric(&body, "chatroom_max_connections") > 0);
    assert_eq!(metric(&body, "chatroom_http_rebuilds_total"), 0);
    assert!(body.contains("# TYPE chatroom_connections gauge"), "{body}");
    // Every sample line is `name{labels} value`.
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let (name, value) = line.rsplit_once(' ').expect("a sample has a value");
        assert!(name.starts_with("chatroom_"), "{line}");
        assert!(value.parse::<f64>().is_ok(), "{line}");
    }
    // This request and the one before are counted once answered.
    let again = get(server.http_addr(), "/metrics").text();
    assert!(
        metric(&again, "chatroom_http_requests_total") >= 1,
        "{again}"
    );
}

#[test]
fn metrics_are_refused_outside_metrics_allow() {
    let server = start(Config {
        metrics_allow: vec![AddressRange::parse("10.0.0.0/8").unwrap()],
        ..config()
    });
    let response = get(server.http_addr(), "/metrics");
    assert_eq!(response.status, 403, "{response:?}");
    assert!(!response.text().contains("chatroom_"), "{response:?}");
    // The rest of the site is unaffected.
    assert_eq!(get(server.http_addr(), "/healthz").status, 200);
}
