//! Connections over time: abrupt disconnects, the heartbeat (pings, idle clients closed),
//! threads returning to zero after many connect/disconnect cycles, and graceful shutdown.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use chatroom::{Config, ServerHandle};
use serde_json::json;
use socket2::SockRef;
use tungstenite::Message;

use crate::support::{
    client_frame, config, joined, joined_with_a_tiny_buffer, raw_ws_handshake, read_response,
    read_server_frame, read_until_closed, start, start_default, tcp, together, unique, wait_until,
    TestClient, FIN, OP_TEXT, SHUTDOWN_LIMIT,
};

const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;

/// Closes the client's socket with RST instead of FIN (linger 0), as a crashed peer does.
fn reset(client: TestClient) {
    SockRef::from(client.stream())
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(client);
}

/// bob's connection ends without a Close frame (`vanish` ends it); alice is told he left.
fn vanished_peer_gives_left(vanish: impl FnOnce(TestClient)) {
    let server = start_default();
    let [mut alice, bob] = together(&server, "room1", ["alice", "bob"]);
    vanish(bob);
    assert_eq!(alice.expect_type("left")["name"], "bob");
    alice.sync();
}

#[test]
fn dropped_connection_gives_left() {
    // No Close frame: the socket just goes away (FIN).
    vanished_peer_gives_left(drop);
}

#[test]
fn reset_connection_gives_left() {
    vanished_peer_gives_left(reset);
}

/// The heartbeat tests' clock: a ping every 100 ms, and a client closed after 3 s of silence.
/// A client that answers every ping is closed only if it goes unscheduled for 2.9 s, 29 ping
/// intervals: ample on a loaded machine. The tests count pings and wait for closes; they never
/// measure time.
const PING_INTERVAL: Duration = Duration::from_millis(100);
const IDLE_TIMEOUT: Duration = Duration::from_secs(3);

fn heartbeat_config() -> Config {
    Config {
        ping_interval: PING_INTERVAL,
        idle_timeout: IDLE_TIMEOUT,
        ..config()
    }
}

/// Pings that span more than the idle timeout: the writer waits at least a ping interval
/// before each ping, so this many pings prove a client outlived the timeout by answering.
fn pings_beyond_the_idle_timeout() -> u32 {
    (IDLE_TIMEOUT.as_millis() / PING_INTERVAL.as_millis()) as u32 + 1
}

#[test]
fn server_pings_and_an_answering_client_stays() {
    let server = start(heartbeat_config());
    let (mut alice, _) = joined(&server, "room1", "alice");
    // tungstenite answers each Ping with a Pong on the next read.
    for _ in 0..pings_beyond_the_idle_timeout() {
        match alice.next_frame() {
            Message::Ping(_) => {}
            other => panic!("expected only pings, got {other:?}"),
        }
    }
    alice.sync();
}

#[test]
fn a_listener_in_a_busy_room_is_pinged_and_stays() {
    // alice only listens while bob talks without pause: her writer is never idle, yet she must
    // still be pinged, or her silence would look like a dead peer after the idle timeout (and
    // her connection would end, failing this test rather than hanging it).
    let server = start(heartbeat_config());
    let [mut alice, mut bob] = together(&server, "room1", ["alice", "bob"]);
    let wanted = pings_beyond_the_idle_timeout();
    let mut pings = 0;
    for n in 0.. {
        if pings == wanted {
            break;
        }
        let text = format!("chatter {n}");
        bob.say_echo(&text);
        loop {
            match alice.next_frame() {
                Message::Ping(_) => pings += 1,
                Message::Text(frame) if frame.contains(&text) => break,
                other => panic!("expected bob's message or a ping, got {other:?}"),
            }
        }
    }
    alice.sync();
}

#[test]
fn silent_client_is_closed_and_leaves() {
    let server = start(heartbeat_config());
    let (mut alice, _) = joined(&server, "room1", "alice");

    // A hand-driven client: it says hello, then never answers anything (no pong, no frame).
    let mut ghost = raw_ws_handshake(server.ws_addr(), "/ws/room1");
    let hello = json!({"type": "hello", "name": "ghost"}).to_string();
    ghost
        .write_all(&client_frame(FIN | OP_TEXT, hello.as_bytes()))
        .unwrap();
    let (welcomed, pings) = std::thread::scope(|scope| {
        // The ghost's socket is read on its own thread so that alice keeps reading (and so
        // answering pings) meanwhile.
        let ghost_reader = scope.spawn(move || {
            let mut pings = 0;
            let mut welcomed = false;
            while let Some((opcode, payload)) = read_server_frame(&mut ghost) {
                match opcode {
                    OP_PING => pings += 1,
                    OP_TEXT => {
                        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
                        welcomed |= v["type"] == "welcome";
                    }
                    OP_CLOSE => {}
                    other => panic!("unexpected opcode {other}"),
                }
            }
            (welcomed, pings)
        });
        // alice answers every ping meanwhile: she stays, and sees the ghost come and go.
        assert_eq!(alice.expect_type("joined")["name"], "ghost");
        assert_eq!(alice.expect_type("left")["name"], "ghost");
        ghost_reader.join().expect("ghost reader")
    });
    assert!(welcomed, "the ghost was never welcomed");
    assert!(pings >= 1, "the server closed the ghost without pinging it");
    alice.sync();
}

#[test]
fn silent_connection_without_hello_is_closed() {
    let server = start(heartbeat_config());
    let mut silent = raw_ws_handshake(server.ws_addr(), "/ws/room1");
    while let Some((opcode, _)) = read_server_frame(&mut silent) {
        assert!(opcode == OP_PING || opcode == OP_CLOSE, "opcode {opcode}");
    }
    wait_until("the silent connection's threads end", || {
        server.client_threads() == 0 && server.client_count() == 0
    });
}

#[test]
fn a_handshake_dripped_byte_by_byte_is_cut_at_its_deadline() {
    // One byte every 100 ms would keep a per-read timeout from ever expiring; the deadline is
    // for the whole head.
    let server = start(Config {
        handshake_timeout: Duration::from_secs(1),
        ..config()
    });
    let mut dripper = tcp(server.ws_addr());
    let request = format!(
        "GET /ws/room1 HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        server.ws_addr()
    );
    let mut sent = 0;
    for byte in request.as_bytes() {
        if dripper.write_all(&[*byte]).is_err() {
            break; // The server has cut the connection.
        }
        sent += 1;
        std::thread::sleep(Duration::from_millis(100)); // the drip, not a synchronisation
    }
    // Ten bytes a second: the whole head would take about 20 s. It must have been cut
    // long before, with no 101.
    assert!(sent < request.len(), "the whole dripped head was taken");
    let answer = read_until_closed(&mut dripper);
    assert!(
        !String::from_utf8_lossy(&answer).contains(" 101 "),
        "{answer:?}"
    );
    wait_until("the dripper's slot is free", || server.client_count() == 0);
}

#[test]
fn a_connection_that_answers_pings_but_never_says_hello_is_closed_1008() {
    // Hello must come within 1 s; pings every 100 ms would keep a silent-but-alive connection
    // open for ever by the idle rule alone.
    let server = start(Config {
        hello_timeout: Duration::from_secs(1),
        ..heartbeat_config()
    });
    let mut lurker = TestClient::connect(&server, "room1");
    let (mut alice, _) = joined(&server, "room1", "alice");
    let mut pings = 0;
    loop {
        // tungstenite answers each Ping with a Pong on the next read.
        match lurker.next_frame() {
            Message::Ping(_) => {
                pings += 1;
                // Ten times the pings the deadline allows: the lurker was never closed.
                assert!(
                    pings < 100,
                    "a connection without hello stayed {pings} pings"
                );
            }
            Message::Close(frame) => {
                assert_eq!(frame.map(|f| u16::from(f.code)), Some(1008));
                break;
            }
            other => panic!("expected pings, then a close; got {other:?}"),
        }
    }
    assert!(pings > 0, "the lurker answered pings before its deadline");
    // alice said hello and stays past the same deadline (twice its length in pings).
    for _ in 0..20 {
        assert!(matches!(alice.next_frame(), Message::Ping(_)));
    }
    alice.sync();
}

#[test]
fn threads_return_to_zero_after_200_connections() {
    let server = start_default();
    assert_eq!(server.client_threads(), 0);
    let (mut watcher, _) = joined(&server, "watch", "watcher");
    wait_until("one idle client holds one thread, its reader", || {
        server.client_threads() == 1
    });
    for i in 0..200 {
        match i % 4 {
            0 => joined(&server, "cycle", &format!("u{i}")).0.close(),
            1 => drop(joined(&server, "cycle", &format!("u{i}")).0),
            2 => drop(TestClient::connect(&server, "cycle")),
            _ => reset(joined(&server, "cycle", &format!("u{i}")).0),
        }
    }
    wait_until("only the watcher's reader remains", || {
        server.client_threads() == 1 && server.client_count() == 1
    });
    // Nothing of those rooms reached the watcher, and the server still works.
    watcher.sync();
    let (mut last, w) = joined(&server, "cycle", "last");
    assert_eq!(w["users"], json!(["last"]));
    last.sync();
    watcher.close();
    last.close();
    wait_until("no client thread is left", || {
        server.client_threads() == 0 && server.client_count() == 0
    });
}

/// Shuts the server down and fails if that took over [`SHUTDOWN_LIMIT`].
fn shut_down_in_time(server: ServerHandle) {
    let started = Instant::now();
    server.shutdown();
    let took = started.elapsed();
    assert!(took < SHUTDOWN_LIMIT, "shutdown took {took:?}");
}

#[test]
fn shutdown_closes_clients_with_1001_and_frees_the_ports() {
    // Idle connections would be closed only after a minute: a shutdown that waited for them
    // instead of closing them would overrun SHUTDOWN_LIMIT (and still end, failing).
    let server = start(Config {
        idle_timeout: Duration::from_secs(60),
        http_idle_timeout: Duration::from_secs(60),
        ..config()
    });
    let (http_addr, ws_addr) = (server.http_addr(), server.ws_addr());
    let (mut alice, _) = joined(&server, "room1", "alice");
    let (mut bob, _) = joined(&server, "room2", "bob");
    let mut quiet = TestClient::connect(&server, "room1");
    // An open keep-alive HTTP connection must not hold shutdown up.
    let mut keep_alive = tcp(http_addr);
    write!(
        keep_alive,
        "GET /healthz HTTP/1.1\r\nHost: {http_addr}\r\n\r\n"
    )
    .unwrap();
    assert_eq!(read_response(&mut keep_alive, false).status, 200);

    std::thread::scope(|scope| {
        let stopping = std::thread::Builder::new()
            .name("shutdown".into())
            .spawn_scoped(scope, move || shut_down_in_time(server))
            .unwrap();
        for (who, client) in [
            ("alice", &mut alice),
            ("bob", &mut bob),
            ("a client that has not said hello", &mut quiet),
        ] {
            assert_eq!(client.close_code(), Ok(Some(1001)), "{who}");
        }
        stopping.join().expect("shutdown in time");
    });
    assert!(TcpStream::connect(ws_addr).is_err(), "ws port still open");
    assert!(
        TcpStream::connect(http_addr).is_err(),
        "http port still open"
    );
}

#[test]
fn shutdown_does_not_wait_for_a_stuck_client() {
    // A queue large enough that the stuck client is never dropped as a slow consumer: its
    // writer stays blocked in a socket write, which would give up only after a minute, so a
    // shutdown that waited for it would overrun SHUTDOWN_LIMIT.
    let server = start(Config {
        outbound_capacity: 100_000,
        outbound_bytes: usize::MAX,
        write_timeout: Duration::from_secs(60),
        ..config()
    });
    let (mut talker, _) = joined(&server, "room1", "talker");
    let stuck = joined_with_a_tiny_buffer(&server, "room1", "stuck");
    talker.expect_type("joined");
    let filler = "y".repeat(3900);
    for i in 0..2000 {
        talker.say_echo(&format!("{i} {filler}"));
    }
    let marker = unique("last");
    talker.say_echo(&marker);

    shut_down_in_time(server);
    drop(stuck);
}

#[test]
fn a_signal_ends_the_binary_cleanly_after_its_log_reader_has_gone() {
    // Promise: when whatever reads the server's output exits (a log pipe closed), the server
    // still stops cleanly on SIGTERM: a log line it cannot write is dropped, not a panic
    // (simple_logger's `println!` panicked on the closed pipe, and the process aborted: 134).
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mut child = Command::new(crate::support::BIN)
        .args([
            "--addr",
            "127.0.0.1:0",
            "--ws-addr",
            "127.0.0.1:0",
            "--data",
            "none",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the binary");
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .expect("the listening line");
    assert!(first.starts_with("listening "), "{first:?}");
    // Both readers go: every later write to stdout or stderr fails with EPIPE.
    drop(child.stderr.take());
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    let deadline = Instant::now() + crate::support::SHUTDOWN_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the server did not exit");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(0), "{status}");
}
