//! The server's limits: the per-client rate limit, Origin checks, the connection cap, and the
//! slow consumer that is dropped while everyone else keeps receiving every message.

use chatroom::{Config, RateLimit};
use tungstenite::ClientRequestBuilder;

use crate::support::{
    config, get, id, joined, joined_with_a_tiny_buffer, read_response, start, tcp, together,
    unique, wait_until, HttpResponse, TestClient,
};

#[test]
fn say_beyond_the_burst_is_rate_limited_and_dropped() {
    // A burst of 3, then one message per 100 s: the fourth is refused however slowly this
    // machine runs the test (a 10 s stall refills a tenth of a token).
    let server = start(Config {
        rate_limit: Some(RateLimit {
            burst: 3,
            per_second: 0.01,
        }),
        ..config()
    });
    let [mut alice, mut bob] = together(&server, "room1", ["alice", "bob"]);

    for i in 0..4 {
        alice.say(&format!("burst {i}"));
    }
    // Three echoes in order and one rate_limited error, which may come before any of them, so
    // it names the text it refused.
    let mut echoes = Vec::new();
    let mut errors = 0;
    for _ in 0..4 {
        let v = alice.next_json();
        match v["type"].as_str() {
            Some("message") => echoes.push(v["text"].as_str().unwrap().to_owned()),
            Some("error") => {
                assert_eq!(v["code"], "rate_limited", "{v}");
                assert_eq!(v["text"], "burst 3", "{v}");
                errors += 1;
            }
            _ => panic!("unexpected frame {v}"),
        }
    }
    assert_eq!(echoes, ["burst 0", "burst 1", "burst 2"]);
    assert_eq!(errors, 1);
    for i in 0..3 {
        bob.expect_said("alice", &format!("burst {i}"));
    }
    // The fourth was dropped: after bob's marker nothing else arrives, for either of them.
    let marker = unique("marker");
    bob.say(&marker);
    bob.expect_said("bob", &marker);
    alice.expect_said("bob", &marker);
    // The limit is per client: bob still has his burst, and alice's connection is open.
    bob.say_echo("bob is not limited");
    alice.expect_said("bob", "bob is not limited");
}

/// Attempts a handshake with an optional Origin and an optional Host override (the TCP
/// connection always goes to the server); `Err` is the refusal status.
fn handshake(
    server: &chatroom::ServerHandle,
    host: Option<&str>,
    origin: Option<&str>,
) -> Result<(), u16> {
    let addr = server.ws_addr();
    let authority = match host {
        Some(h) => format!("{h}:{}", addr.port()),
        None => addr.to_string(),
    };
    let uri = format!("ws://{authority}/ws/general").parse().unwrap();
    let mut request = ClientRequestBuilder::new(uri);
    if let Some(origin) = origin {
        request = request.with_header("Origin", origin);
    }
    TestClient::try_request(tcp(addr), request).map(|mut client| {
        client.join("probe");
    })
}

#[test]
fn origin_must_match_the_host() {
    let server = start(config());
    let ws = server.ws_addr().to_string();
    for origin in [
        None,
        Some("http://127.0.0.1:5000"),
        Some("https://127.0.0.1"),
        Some(&*format!("http://{ws}")),
    ] {
        assert_eq!(
            handshake(&server, None, origin),
            Ok(()),
            "origin {origin:?}"
        );
    }
    for origin in [
        "http://evil.example",
        "http://127.0.0.1.evil.example",
        "http://evil.example:5000",
        "http://localhost:5000",
        "null",
        "not a url",
    ] {
        assert_eq!(
            handshake(&server, None, Some(origin)),
            Err(403),
            "origin {origin}"
        );
    }
    // Same rule when the page was opened as localhost.
    assert_eq!(
        handshake(&server, Some("localhost"), Some("http://localhost:5000")),
        Ok(())
    );
    assert_eq!(
        handshake(&server, Some("localhost"), Some("http://127.0.0.1:5000")),
        Err(403)
    );
    wait_until("refused handshakes leave no threads", || {
        server.client_threads() == 0
    });
}

/// `GET path` with this `Host` header.
fn get_as(server: &chatroom::ServerHandle, path: &str, host: &str) -> HttpResponse {
    use std::io::Write;
    let mut stream = tcp(server.http_addr());
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    read_response(&mut stream, false)
}

#[test]
fn dns_rebinding_is_refused_on_both_ports() {
    // The attack: a page on evil.example, whose name now resolves to this machine, is
    // same-origin with itself: Host and Origin agree, so only the Host itself can tell.
    let server = start(config());
    let evil = Some("evil.example");
    assert_eq!(
        handshake(&server, evil, Some("http://evil.example:5000")),
        Err(403)
    );
    assert_eq!(handshake(&server, evil, None), Err(403));
    let page = get_as(&server, "/", "evil.example:5000");
    assert_eq!(page.status, 421, "{page:?}");
    assert!(
        page.text().contains("--allowed-host evil.example"),
        "{}",
        page.text()
    );
    assert_eq!(get_as(&server, "/healthz", "evil.example").status, 421);
    // IP literals and localhost are this machine by definition.
    assert_eq!(handshake(&server, Some("localhost"), None), Ok(()));
    assert_eq!(get_as(&server, "/", "localhost:5000").status, 200);
    assert_eq!(get_as(&server, "/", "[::1]:5000").status, 200);
    assert_eq!(get(server.http_addr(), "/").status, 200);

    // A name the operator lists is answered, and so is the host of --ws-url.
    let server = start(Config {
        allowed_hosts: vec!["chat.example.org".to_owned()],
        ws_url: Some("wss://ws.example.net/ws".to_owned()),
        ..config()
    });
    let listed = Some("chat.example.org");
    assert_eq!(
        handshake(&server, listed, Some("https://chat.example.org")),
        Ok(())
    );
    assert_eq!(get_as(&server, "/room2", "chat.example.org").status, 200);
    assert_eq!(get_as(&server, "/", "ws.example.net").status, 200);
    assert_eq!(get_as(&server, "/", "evil.example").status, 421);
}

#[test]
fn allowed_origins_are_accepted() {
    let server = start(Config {
        allowed_origins: vec!["https://chat.example.org".to_owned()],
        ..config()
    });
    assert_eq!(
        handshake(&server, None, Some("https://chat.example.org")),
        Ok(())
    );
    assert_eq!(
        handshake(&server, None, Some("https://other.example.org")),
        Err(403)
    );
    assert_eq!(
        handshake(&server, None, Some("http://chat.example.org")),
        Err(403),
        "an origin is scheme, host and port"
    );
    assert_eq!(
        handshake(&server, None, Some("http://127.0.0.1:5000")),
        Ok(())
    );
}

#[test]
fn handshakes_over_the_cap_get_503() {
    let server = start(Config {
        max_clients: 3,
        ..config()
    });
    assert_eq!(server.max_clients(), 3);
    let [mut a, mut b] = together(&server, "room1", ["a", "b"]);
    let (mut c, _) = joined(&server, "room2", "c");
    assert_eq!(server.client_count(), 3);
    for _ in 0..3 {
        assert_eq!(
            TestClient::try_connect(server.ws_addr(), "/ws/room1").err(),
            Some(503)
        );
    }
    assert_eq!(server.client_count(), 3);

    // The three still chat.
    a.say("still fine");
    a.expect_said("a", "still fine");
    b.expect_said("a", "still fine");
    c.sync();

    // A freed place can be taken again.
    c.close();
    wait_until("the closed client is uncounted", || {
        server.client_count() == 2
    });
    let (mut d, _) = joined(&server, "room1", "d");
    a.expect_type("joined");
    b.expect_type("joined");
    let marker = d.sync();
    let text = marker["text"].as_str().unwrap();
    a.expect_said("d", text);
    b.expect_said("d", text);
}

#[test]
fn slow_consumer_is_dropped_and_the_room_keeps_its_speed() {
    let server = start(Config {
        outbound_capacity: 8,
        ..config()
    });
    let [mut fast, mut other] = together(&server, "room1", ["fast", "other"]);
    let mut slow = joined_with_a_tiny_buffer(&server, "room1", "slowpoke");
    fast.expect_type("joined");
    other.expect_type("joined");

    // slowpoke now reads nothing. fast talks; fast and other read every message in step.
    let filler = "x".repeat(3900);
    let mut left_seen = [false, false];
    let mut last_id = 0;
    let mut sent = 0;
    while left_seen != [true, true] {
        assert!(
            sent < 5000,
            "slowpoke was never dropped (sent {sent} messages)"
        );
        let text = format!("{sent} {filler}");
        fast.say(&text);
        sent += 1;
        let mut ids = Vec::new();
        for (i, client) in [&mut fast, &mut other].into_iter().enumerate() {
            loop {
                let v = client.next_json();
                if v["type"] == "left" {
                    assert_eq!(v["name"], "slowpoke", "{v}");
                    assert!(!left_seen[i], "two `left` for slowpoke");
                    left_seen[i] = true;
                    continue;
                }
                assert_eq!(v["type"], "message", "{v}");
                assert_eq!(v["text"], text.as_str(), "a message was lost or reordered");
                ids.push(id(&v));
                break;
            }
        }
        assert_eq!(ids[0], ids[1]);
        assert!(ids[0] > last_id);
        last_id = ids[0];
    }
    // The room carries on.
    for i in 0..20 {
        let text = format!("after {i}");
        fast.say_echo(&text);
        other.expect_said("fast", &text);
    }
    wait_until("slowpoke's connection is uncounted", || {
        server.client_count() == 2
    });

    // slowpoke reads again: behind what was already queued comes a Close frame with 1008.
    loop {
        match slow.read() {
            Ok(tungstenite::Message::Close(frame)) => {
                let code = frame.map(|f| u16::from(f.code));
                assert_eq!(code, Some(1008), "slow consumer close code");
                break;
            }
            Ok(_) => continue,
            Err(e) => panic!("slowpoke's connection ended without close 1008: {e}"),
        }
    }
}

#[test]
fn slow_consumer_of_large_messages_is_dropped_by_bytes_queued() {
    // The frame limit is out of reach; the byte limit (64 KiB, 16 of these messages) is not.
    let server = start(Config {
        outbound_capacity: 100_000,
        outbound_bytes: 64 * 1024,
        ..config()
    });
    let (mut fast, _) = joined(&server, "room1", "fast");
    // Kept open and never read.
    let _slow = joined_with_a_tiny_buffer(&server, "room1", "slowpoke");
    fast.expect_type("joined");

    let filler = "y".repeat(3900);
    let mut sent = 0;
    loop {
        assert!(sent < 5000, "slowpoke was never dropped (sent {sent})");
        let text = format!("{sent} {filler}");
        fast.say(&text);
        sent += 1;
        let v = fast.next_json();
        if v["type"] == "left" {
            assert_eq!(v["name"], "slowpoke", "{v}");
            fast.expect_said("fast", &text);
            break;
        }
        assert_eq!(v["text"], text.as_str(), "{v}");
    }
    wait_until("slowpoke's connection is uncounted", || {
        server.client_count() == 1
    });
    fast.sync();
}

/// The usual soft open-files limit (1,024, systemd's default too) once left the cap at 0:
/// every client got 503. The binary raises the soft limit towards the hard one at start-up.
#[test]
fn a_soft_fd_limit_of_1024_still_admits_clients() {
    let hard: usize = String::from_utf8(
        std::process::Command::new("sh")
            .args(["-c", "ulimit -Hn"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .parse()
    .unwrap_or(usize::MAX);
    assert!(
        hard > 4096,
        "this test needs a hard open-files limit above 4096 (it is {hard})"
    );
    let mut command = std::process::Command::new("sh");
    command.args([
        "-c",
        "ulimit -Sn 1024 && exec \"$0\" --addr 127.0.0.1:0 --ws-addr 127.0.0.1:0 --data none",
        crate::support::BIN,
    ]);
    let server = crate::support::ChildServer::from_command(command);
    let mut client = TestClient::try_connect(server.ws, "/ws/room1")
        .unwrap_or_else(|status| panic!("refused with {status} under a soft limit of 1024"));
    let welcome = client.join("alice");
    assert_eq!(welcome["type"], "welcome");
}
