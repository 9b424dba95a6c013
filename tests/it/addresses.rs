//! Per-address limits: the connection cap and handshake rate per address (a second address,
//! 127.0.0.2, still admitted), the say rate across one address's connections, `--trust-proxy`.
//!
//! Linux routes all of 127.0.0.0/8 to loopback, so a client socket bound to 127.0.0.2 is a
//! second machine as far as the server can tell.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};

use chatroom::{Config, RateLimit, ServerHandle};
use socket2::{Domain, Socket, Type};
use tungstenite::client::IntoClientRequest;
use tungstenite::http::{HeaderName, HeaderValue};

use crate::support::*;

/// A rate so slow that no token comes back while a test runs, however slow the machine: the
/// tests see the burst and nothing else.
const NO_REFILL: f64 = 0.0001;

/// A TCP connection to the server's WebSocket port from `source` (an address on loopback).
fn connect_from(source: &str, server: SocketAddr) -> TcpStream {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let source: SocketAddr = format!("{source}:0").parse().unwrap();
    socket.bind(&source.into()).unwrap();
    socket.connect(&server.into()).unwrap();
    let stream: TcpStream = socket.into();
    set_timeouts(&stream);
    stream
}

/// Opens a WebSocket to `/ws/room1` from `source`, with extra request headers; `Err` holds
/// the status of a refusal.
fn open(server: &ServerHandle, source: &str, headers: &[(&str, &str)]) -> Result<TestClient, u16> {
    let addr = server.ws_addr();
    let mut request = format!("ws://{addr}/ws/room1")
        .into_client_request()
        .unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    TestClient::try_request(connect_from(source, addr), request)
}

/// The whole answer to a handshake from `source`, for a refusal's headers and body.
fn raw_answer(server: &ServerHandle, source: &str) -> String {
    let addr = server.ws_addr();
    let mut stream = connect_from(source, addr);
    write!(
        stream,
        "GET /ws/room1 HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    String::from_utf8(read_until_closed(&mut stream)).unwrap()
}

#[test]
fn one_address_cannot_take_every_slot() {
    let server = start(Config {
        max_per_address: Some(3),
        ..config()
    });
    let mut first: Vec<TestClient> = (0..3)
        .map(|_| open(&server, "127.0.0.1", &[]).expect("within the per-address cap"))
        .collect();
    for _ in 0..3 {
        assert_eq!(open(&server, "127.0.0.1", &[]).err(), Some(503));
    }
    let answer = raw_answer(&server, "127.0.0.1");
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    assert!(answer.contains("Retry-After: "), "{answer}");
    assert!(
        answer.contains("too many connections from your address"),
        "{answer}"
    );

    // Another address is admitted, and chats with the first.
    let mut other = open(&server, "127.0.0.2", &[]).expect("another address is admitted");
    let welcome = other.join("other");
    assert_eq!(welcome["type"], "welcome");
    first[0].join("first");
    other.expect_type("joined");
    other.say("hello from 127.0.0.2");
    first[0].expect_said("other", "hello from 127.0.0.2");

    // A connection that ends gives its address's slot back.
    first.pop().unwrap().close();
    wait_until("the closed connection is uncounted", || {
        server.client_count() == 3
    });
    let again = open(&server, "127.0.0.1", &[]);
    assert!(again.is_ok(), "a freed slot is refused: {:?}", again.err());
}

#[test]
fn handshakes_from_one_address_are_rate_limited() {
    let server = start(Config {
        handshake_rate: Some(RateLimit {
            burst: 5,
            per_second: NO_REFILL,
        }),
        ..config()
    });
    // The burst, each connection closed at once: what counts is the rate, not how many are
    // open (a page guessing room names would open and close).
    for i in 0..5 {
        let client = open(&server, "127.0.0.1", &[]);
        assert!(client.is_ok(), "handshake {i} refused: {:?}", client.err());
        client.unwrap().close();
    }
    assert_eq!(open(&server, "127.0.0.1", &[]).err(), Some(429));
    let answer = raw_answer(&server, "127.0.0.1");
    assert!(answer.starts_with("HTTP/1.1 429 "), "{answer}");
    assert!(answer.contains("Retry-After: "), "{answer}");
    // A bad path costs a token too: guessing room names gains nothing from being refused.
    assert_eq!(
        TestClient::try_request(
            connect_from("127.0.0.1", server.ws_addr()),
            format!("ws://{}/ws/Bad%20Room", server.ws_addr())
        )
        .err(),
        Some(429)
    );

    // Another address has its own burst.
    let mut other = open(&server, "127.0.0.2", &[]).expect("another address is admitted");
    other.join("other");
}

#[test]
fn an_address_s_connections_share_one_say_rate() {
    // Each connection may say 2 at once; the address 3 x 2 = 6 across its connections.
    let server = start(Config {
        rate_limit: Some(RateLimit {
            burst: 2,
            per_second: NO_REFILL,
        }),
        ..config()
    });
    let mut clients: Vec<TestClient> = (0..4)
        .map(|i| {
            let (client, _) = joined(&server, &format!("say-{i}"), "talker");
            client
        })
        .collect();
    let mut said = 0;
    let mut refused = 0;
    for client in &mut clients {
        for n in 0..2 {
            client.say(&format!("message {n}"));
            let answer = client.next_json();
            match answer["type"].as_str() {
                Some("message") => said += 1,
                Some("error") if answer["code"] == "rate_limited" => refused += 1,
                _ => panic!("unexpected answer {answer}"),
            }
        }
    }
    // Every client stayed within its own limit of 2: the refusals are the address's.
    assert_eq!((said, refused), (6, 2));

    // Another address is not held back by the first one's talk.
    let mut other = open(&server, "127.0.0.2", &[]).unwrap();
    other.join("other");
    other.say("still heard");
    other.expect_said("other", "still heard");
}

#[test]
fn a_trusted_proxy_s_clients_are_counted_by_their_forwarded_address() {
    let server = start(Config {
        max_per_address: Some(2),
        trusted_proxies: vec!["127.0.0.1".parse().unwrap()],
        ..config()
    });
    let through_proxy = |client: &str| {
        let header = format!("198.51.100.99, {client}");
        open(
            &server,
            "127.0.0.1",
            &[("X-Forwarded-For", header.as_str())],
        )
    };
    // Two clients behind the proxy are two addresses, not one: the proxy itself is not
    // capped, and the left entry (written by the client, so proving nothing) is ignored.
    let _a = [
        through_proxy("203.0.113.7").unwrap(),
        through_proxy("203.0.113.7").unwrap(),
    ];
    assert_eq!(through_proxy("203.0.113.7").err(), Some(503));
    let _b = through_proxy("203.0.113.8").expect("another client behind the proxy");
    let _c = open(&server, "127.0.0.1", &[("X-Real-IP", "203.0.113.9")])
        .expect("X-Real-IP names the client when there is no X-Forwarded-For");

    // From an address that is not a trusted proxy, the headers are ignored: a client
    // cannot escape its cap by claiming to be someone else.
    let spoofer = |claim: &str| open(&server, "127.0.0.2", &[("X-Forwarded-For", claim)]);
    let _d = [spoofer("192.0.2.1").unwrap(), spoofer("192.0.2.2").unwrap()];
    assert_eq!(spoofer("192.0.2.3").err(), Some(503));
}

#[test]
fn a_flood_of_refusals_is_logged_in_summary() {
    let server = ChildServer::start(&["--data", "none", "--handshake-rate", "3:0.0001"]);
    let refused = 300;
    for i in 0..3 + refused {
        let answer = TestClient::try_connect(server.ws, "/ws/room1");
        match answer {
            Ok(client) if i < 3 => client.close(),
            Err(429) if i >= 3 => {}
            other => panic!("handshake {i}: {:?}", other.map(|_| 101)),
        }
    }
    let stderr = {
        let mut server = server;
        server.process.signal("TERM");
        server.process.wait_exit(SHUTDOWN_LIMIT).2
    };
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("refused")).collect();
    // One line per 10 s at most: however slow this machine, 300 refusals take far less than
    // the 100 s it would need to write 10 lines.
    assert!(
        !lines.is_empty() && lines.len() < 10,
        "{} log lines for {refused} refusals:\n{stderr}",
        lines.len()
    );
    assert!(lines[0].contains("handshake_rate"), "{}", lines[0]);
}
