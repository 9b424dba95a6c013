//! The sending side with one thread per client: the hub writes without blocking, a backlog
//! writer exists only while a client's socket is full, frames never interleave or reorder, an
//! idle client costs one thread, and shutdown closes ten thousand clients with 1001.

use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use chatroom::Config;
use serde_json::{json, Value};
use tungstenite::Message;

use crate::support::*;

/// Generous limits, so a client that reads slowly on purpose is never dropped.
fn roomy() -> Config {
    Config {
        outbound_capacity: 1_000_000,
        outbound_bytes: 1 << 30,
        write_timeout: Duration::from_secs(60),
        ..config()
    }
}

#[test]
fn a_stalled_client_gets_a_backlog_writer_that_ends_with_its_backlog() {
    // The send timeout is long, so the stalled writer's only way out is the client reading.
    let server = start(Config {
        outbound_capacity: 64,
        write_timeout: Duration::from_secs(600),
        ..config()
    });
    let [mut fast, mut other] = together(&server, "room1", ["fast", "other"]);
    let mut slow = joined_with_a_tiny_buffer(&server, "room1", "slowpoke");
    fast.expect_type("joined");
    other.expect_type("joined");
    wait_until("three idle clients hold three threads", || {
        server.client_threads() == 3
    });

    // slowpoke reads nothing; fast talks until slowpoke is dropped for its backlog.
    let filler = "x".repeat(3900);
    let mut dropped = false;
    let mut most_threads = 0;
    for sent in 0.. {
        assert!(sent < 5000, "slowpoke was never dropped");
        let text = format!("{sent} {filler}");
        fast.say(&text);
        for client in [&mut fast, &mut other] {
            let frame = client.skip_until(|v| v["text"] == text.as_str() || v["type"] == "left");
            if frame["type"] == "left" {
                assert_eq!(frame["name"], "slowpoke");
                dropped = true;
                client.expect_said("fast", &text);
            }
        }
        // Once slowpoke's socket is full its writer blocks there, so it stays until the drop.
        most_threads = most_threads.max(server.client_threads());
        if dropped {
            break;
        }
    }
    assert!(
        most_threads >= 4,
        "three readers and slowpoke's backlog writer: {most_threads}"
    );
    wait_until("slowpoke's connection is uncounted", || {
        server.client_count() == 2
    });

    // slowpoke reads again: every frame it gets is whole and in order, ids without a gap up to
    // where its queue was cut, then close 1008; then its writer is gone.
    let mut last_id = None;
    loop {
        match slow.read() {
            Ok(Message::Text(text)) => {
                let v: Value = serde_json::from_str(&text).expect("a whole frame");
                if v["type"] == "message" {
                    let this = id(&v);
                    if let Some(last) = last_id {
                        assert_eq!(this, last + 1, "a gap or a reordering before the cut");
                    }
                    last_id = Some(this);
                }
            }
            Ok(Message::Close(frame)) => {
                assert_eq!(frame.map(|f| u16::from(f.code)), Some(1008));
                break;
            }
            Ok(_) => {}
            Err(e) => panic!("slowpoke's connection ended without close 1008: {e}"),
        }
    }
    assert!(last_id.is_some(), "slowpoke got messages before the cut");
    drop(slow);
    wait_until("the backlog writer has ended", || {
        server.client_threads() == 2
    });
    fast.say_echo("still here");
    other.expect_said("fast", "still here");
}

/// The text sender `k` sends as its `i`th message: sizes from 1 to 4,000 characters, some
/// multi-byte, so frames use every length encoding and end mid-buffer.
fn text_of(k: usize, i: usize) -> String {
    // At most 3,990, so that with its `k:i:` prefix it stays within the 4,000 allowed.
    let len = (i * 997 + k * 131) % 3991;
    let body: String = (0..len)
        .map(|j| if (i + j).is_multiple_of(7) { 'é' } else { 'a' })
        .collect();
    format!("{k}:{i}:{body}")
}

#[test]
fn frames_never_interleave_or_reorder_with_many_senders_and_a_slow_reader() {
    const SENDERS: usize = 4;
    // About 6 MB of frames for the reader: more than its 4 KiB window and the most a socket's
    // send buffer holds here (4 MiB), so its connection must have a backlog and a writer.
    const EACH: usize = 400;
    let server = start(roomy());
    let mut reader = joined_with_a_tiny_buffer(&server, "busy", "reader");
    let senders: Vec<TestClient> = (0..SENDERS)
        .map(|k| {
            let (sender, _) = joined(&server, "busy", &format!("s{k}"));
            reader.expect_type("joined");
            sender
        })
        .collect();
    // Pings of the reader's own go through the same queue as the broadcasts.
    let pings: Vec<Vec<u8>> = (0..5u8).map(|n| vec![n; 3]).collect();
    for payload in &pings {
        reader.send(Message::Ping(payload.clone().into()));
    }

    let threads: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(k, mut sender)| {
            thread::spawn(move || {
                for i in 0..EACH {
                    sender.say(&text_of(k, i));
                }
                sender // kept open until the reader is done
            })
        })
        .collect();

    // Every message is sent (the server reads senders at once) before the reader reads any.
    let _senders: Vec<TestClient> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    wait_until("a backlog writer runs besides the five readers", || {
        server.client_threads() > SENDERS + 1
    });

    let mut next_of: HashMap<usize, usize> = HashMap::new();
    let mut pongs = Vec::new();
    let mut last_id = 0;
    let mut frames: u32 = 0;
    while next_of.values().sum::<usize>() < SENDERS * EACH || pongs.len() < pings.len() {
        frames += 1;
        if frames.is_multiple_of(64) {
            // Reading slowly on purpose, so the server's writes back up and a writer runs.
            thread::sleep(Duration::from_millis(2));
        }
        let text = match reader.next_frame() {
            Message::Text(text) => text,
            Message::Pong(payload) => {
                pongs.push(payload.to_vec());
                continue;
            }
            other => panic!("unexpected frame {other:?}"),
        };
        let v: Value = serde_json::from_str(&text).expect("every frame is whole JSON");
        if v["type"] != "message" {
            continue;
        }
        assert!(
            id(&v) > last_id,
            "ids must grow: {} after {last_id}",
            id(&v)
        );
        last_id = id(&v);
        let said = v["text"].as_str().unwrap();
        let mut parts = said.splitn(3, ':');
        let k: usize = parts.next().unwrap().parse().unwrap();
        let i: usize = parts.next().unwrap().parse().unwrap();
        let next = next_of.entry(k).or_default();
        assert_eq!(i, *next, "sender {k}'s messages out of order");
        assert_eq!(said, text_of(k, i), "message {k}:{i} altered");
        *next += 1;
    }
    assert_eq!(pongs, pings, "every pong, in order, with its payload");
    reader.sync();
}

#[test]
fn an_idle_client_costs_one_thread() {
    let server = start_default();
    let clients: Vec<TestClient> = (0..300)
        .map(|n| joined(&server, &format!("r{}", n % 3), &format!("u{n}")).0)
        .collect();
    wait_until("300 idle clients hold 300 threads", || {
        server.client_threads() == 300
    });
    // Talking in a room whose sockets all take the frames starts no writer.
    let (mut talker, _) = joined(&server, "r0", "talker");
    for n in 0..20 {
        talker.say_echo(&format!("hello {n}"));
    }
    assert_eq!(server.client_threads(), 301);
    drop(clients);
    wait_until("no client thread is left but the talker's", || {
        server.client_threads() == 1
    });
}

/// Enough descriptors for `clients` sockets in this process, or a clear failure saying how to
/// get them (`make test` raises the soft limit to the hard one).
fn assert_open_files_for(clients: usize) {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let soft: usize = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse().ok())
        .unwrap_or(usize::MAX);
    assert!(
        soft >= clients + 1000,
        "this test holds {clients} sockets but the open-files limit is {soft}: run it with \
         `ulimit -n 20000` (make test does)"
    );
}

/// Connects and says hello on a bare socket (no tungstenite buffers: ten thousand of those
/// would take a gigabyte), without waiting for the welcome.
fn bare_client(ws: SocketAddr, room: &str, name: &str) -> TcpStream {
    let mut stream = raw_ws_handshake(ws, &format!("/ws/{room}"));
    let hello = json!({"type": "hello", "name": name}).to_string();
    stream
        .write_all(&client_frame(FIN | OP_TEXT, hello.as_bytes()))
        .unwrap();
    stream
}

/// The close code of the first close frame on `stream`, after whatever frames precede it.
fn close_code_of(stream: &mut TcpStream) -> Option<u16> {
    while let Some((opcode, payload)) = read_server_frame(stream) {
        if opcode == 0x8 {
            return payload.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]]));
        }
    }
    None
}

#[test]
fn shutdown_closes_ten_thousand_clients_with_1001() {
    const CLIENTS: usize = 10_000;
    assert_open_files_for(CLIENTS);
    // A child process, so the server's descriptors are not this process's too.
    let server = ChildServer::start(&["--data", "none"]);
    let mut clients: Vec<TcpStream> = (0..CLIENTS)
        .map(|n| bare_client(server.ws, &format!("room{}", n / 100), &format!("u{n}")))
        .collect();
    // Everyone is welcomed before the signal: the last client of each room has its welcome.
    for last in (99..CLIENTS).step_by(100) {
        let (opcode, payload) = read_server_frame(&mut clients[last]).expect("a welcome");
        assert_eq!(opcode, 0x1);
        let v: Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(v["type"], "welcome", "{v}");
    }

    let mut process = server.process;
    let signalled = Instant::now();
    process.signal("TERM");
    let (status, _, stderr) = process.wait_exit(SHUTDOWN_LIMIT);
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    // The promise is 2 s; this machine may be slow, so the bound has a 10x margin.
    eprintln!("shutdown with {CLIENTS} clients took {took:?}");
    assert!(took < SHUTDOWN_LIMIT, "shutdown took {took:?}");
    for (n, client) in clients.iter_mut().enumerate() {
        assert_eq!(close_code_of(client), Some(1001), "client {n}");
    }
}
