//! Rooms as PROTOCOL.md describes them: isolation, `joined`/`left`, unique names, sessions
//! (several connections, one person), history and `since`/`epoch` replay, and one id order
//! for every receiver under concurrent senders.

use std::collections::HashSet;

use chatroom::hub::MAX_IDLE_ROOMS;
use chatroom::ServerHandle;
use serde_json::{json, Value};

use crate::support::{
    config, health, history, history_texts, id, joined, start, start_default, unique, users,
    wait_until, ChildServer, TestClient, SHUTDOWN_LIMIT,
};

#[test]
fn rooms_are_isolated() {
    let server = start_default();
    let (mut alice, _) = joined(&server, "room1", "alice");
    let (mut bob, welcome) = joined(&server, "room2", "bob");
    assert_eq!(
        users(&welcome),
        ["bob"],
        "room2 must not list room1's people"
    );

    // A join, a message and a typing notice in room1 ...
    let (mut carol, welcome) = joined(&server, "room1", "carol");
    assert_eq!(users(&welcome), ["alice", "carol"]);
    alice.expect_type("joined");
    carol.typing();
    alice.expect_type("typing");
    alice.say_echo("only for room1");
    carol.expect_said("alice", "only for room1");
    // ... and a leave.
    carol.close();
    alice.expect_type("left");

    // None of it reached room2: bob's next frame is his own marker.
    let marker = bob.sync();

    // The same name may be used in two rooms without being made unique, and room2's history
    // holds only room2's message.
    let (_alice2, welcome) = joined(&server, "room2", "alice");
    assert_eq!(welcome["name"], "alice");
    assert_eq!(history(&welcome), [marker], "room1's history leaked");
}

#[test]
fn joined_and_left_go_to_the_others() {
    let server = start_default();
    let (mut alice, _) = joined(&server, "room1", "alice");
    let (mut bob, _) = joined(&server, "room1", "bob");

    let j = alice.expect_type("joined");
    assert_eq!(j["name"], "bob");
    assert!(j["ts"].is_u64(), "{j}");
    // The person who joined is not told about itself.
    bob.sync();
    alice.expect_type("message");

    bob.close();
    let l = alice.expect_type("left");
    assert_eq!(l["name"], "bob");
    assert!(l["ts"].is_u64(), "{l}");
    alice.sync();

    // A connection that never said hello was never anyone: no joined, no left.
    let silent = TestClient::connect(&server, "room1");
    drop(silent);
    wait_until("the silent connection is gone", || {
        server.client_count() == 1
    });
    alice.sync();
}

#[test]
fn taken_names_are_made_unique() {
    let server = start_default();
    let (mut first, w1) = joined(&server, "room1", "alice");
    let (_second, w2) = joined(&server, "room1", "alice");
    let (mut third, w3) = joined(&server, "room1", " alice ");
    assert_eq!(w1["name"], "alice");
    assert_eq!(w2["name"], "alice (2)");
    assert_eq!(w3["name"], "alice (3)");
    assert_eq!(users(&w3), ["alice", "alice (2)", "alice (3)"]);
    assert_eq!(first.expect_type("joined")["name"], "alice (2)");
    assert_eq!(first.expect_type("joined")["name"], "alice (3)");
    assert_eq!(third.sync()["name"], "alice (3)");

    // Once alice has left, her name is free again.
    let (mut observer, _) = joined(&server, "room1", "observer");
    first.close();
    observer.skip_until(|v| v["type"] == "left" && v["name"] == "alice");
    let (_again, w) = joined(&server, "room1", "alice");
    assert_eq!(w["name"], "alice");
}

#[test]
fn names_that_look_alike_are_made_unique() {
    let server = start_default();
    let (mut alice, _) = joined(&server, "room1", "alice");
    // A Cyrillic а, a zero-width space, and capitals: each looks like alice on the page.
    let mut twins = Vec::new();
    for (n, look_alike) in ["\u{430}lice", "alice\u{200B}", "ALICE"]
        .into_iter()
        .enumerate()
    {
        let (twin, w) = joined(&server, "room1", look_alike);
        twins.push(twin);
        let name = format!("{look_alike} ({})", n + 2);
        assert_eq!(w["name"], name.as_str(), "{look_alike:?}");
        assert_eq!(alice.expect_type("joined")["name"], name.as_str());
    }
    // Accents are not look-alikes: éva is not eva.
    let (_eva, _) = joined(&server, "room1", "eva");
    let (_, w) = joined(&server, "room1", "e\u{301}va");
    assert_eq!(w["name"], "\u{e9}va", "normalized to NFC, and its own name");
}

#[test]
fn one_session_is_one_person() {
    let server = start_default();
    let (mut bob, _) = joined(&server, "room1", "bob");
    let hello = json!({"type": "hello", "name": "alice", "session": "browser-1"});

    let mut tab1 = TestClient::connect(&server, "room1");
    let w1 = tab1.hello(hello.clone());
    assert_eq!(bob.expect_type("joined")["name"], "alice");

    let mut tab2 = TestClient::connect(&server, "room1");
    let w2 = tab2.hello(hello.clone());
    assert_eq!(w2["name"], "alice", "one person, one name");
    assert_eq!(users(&w2), ["alice", "bob"], "one entry in users");
    assert_eq!(w1["name"], w2["name"]);
    // No second `joined`: bob's next frame is his marker.
    let marker = bob.sync();
    let marker = marker["text"].as_str().unwrap();
    tab1.expect_said("bob", marker);
    tab2.expect_said("bob", marker);

    // Both tabs see what either says, under the same name.
    tab2.say("from tab 2");
    for client in [&mut tab1, &mut tab2, &mut bob] {
        client.expect_said("alice", "from tab 2");
    }

    // A newcomer sees alice once.
    let (mut carol, w) = joined(&server, "room1", "carol");
    assert_eq!(users(&w), ["alice", "bob", "carol"]);
    bob.expect_type("joined");
    tab1.expect_type("joined");
    tab2.expect_type("joined");

    // Closing one tab is not leaving.
    tab1.close();
    wait_until("the first tab is gone", || server.client_count() == 3);
    tab2.say("still here");
    for client in [&mut tab2, &mut bob, &mut carol] {
        client.expect_said("alice", "still here");
    }
    let marker = bob.sync();
    carol.expect_said("bob", marker["text"].as_str().unwrap());

    // Closing the last one is.
    tab2.close();
    assert_eq!(bob.expect_type("left")["name"], "alice");
    assert_eq!(carol.expect_type("left")["name"], "alice");
    let (_dave, w) = joined(&server, "room1", "dave");
    assert_eq!(users(&w), ["bob", "carol", "dave"]);
}

#[test]
fn sessions_do_not_merge_different_people_or_rooms() {
    let server = start_default();
    let (_a, _) = joined(&server, "room1", "alice");
    let mut other = TestClient::connect(&server, "room1");
    let w = other.hello(json!({"type": "hello", "name": "alice", "session": "s-2"}));
    assert_eq!(
        w["name"], "alice (2)",
        "no session on the first: two people"
    );

    let mut s1 = TestClient::connect(&server, "room1");
    s1.hello(json!({"type": "hello", "name": "zed", "session": "s-9"}));
    let mut s2 = TestClient::connect(&server, "room2");
    let w = s2.hello(json!({"type": "hello", "name": "zed", "session": "s-9"}));
    assert_eq!(users(&w), ["zed"], "a session is per room");
}

#[test]
fn history_holds_the_last_n_oldest_first() {
    let server = start(chatroom::Config {
        history: 5,
        ..config()
    });
    let (mut alice, _) = joined(&server, "room1", "alice");
    let mut said = Vec::new();
    for i in 0..8 {
        said.push(alice.say_echo(&format!("m{i}")));
    }
    let (_bob, welcome) = joined(&server, "room1", "bob");
    let replay = history(&welcome);
    assert_eq!(replay, said[3..].to_vec(), "last 5, oldest first, as sent");
    assert_eq!(history_texts(&welcome), ["m3", "m4", "m5", "m6", "m7"]);
}

#[test]
fn since_with_the_epoch_replays_exactly_what_was_missed() {
    let server = start_default();
    // bob keeps the room alive, so its epoch cannot change in between.
    let (mut bob, _) = joined(&server, "room1", "bob");
    let (mut alice, welcome) = joined(&server, "room1", "alice");
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    bob.expect_type("joined");

    let mut last_seen = 0;
    for i in 0..3 {
        last_seen = id(&alice.say_echo(&format!("a{i}")));
    }
    alice.close();
    bob.skip_until(|v| v["type"] == "left" && v["name"] == "alice");
    let mut missed = Vec::new();
    for i in 0..4 {
        missed.push(bob.say_echo(&format!("b{i}")));
    }

    let rejoin = |since: u64, epoch: &str| -> Value {
        let mut c = TestClient::connect(&server, "room1");
        c.hello(json!({"type": "hello", "name": "alice", "since": since, "epoch": epoch}))
    };

    let w = rejoin(last_seen, &epoch);
    assert_eq!(w["epoch"], epoch.as_str());
    assert_eq!(
        history(&w),
        missed,
        "exactly the missed messages, no gap, no dup"
    );

    let w = rejoin(id(&missed[1]), &epoch);
    assert_eq!(history(&w), missed[2..].to_vec());

    let w = rejoin(id(&missed[3]), &epoch);
    assert!(history(&w).is_empty(), "nothing missed: {w}");

    // A foreign epoch means `since` is meaningless: full history.
    let w = rejoin(id(&missed[3]), "not-this-rooms-epoch");
    assert_eq!(
        history_texts(&w),
        ["a0", "a1", "a2", "b0", "b1", "b2", "b3"]
    );
    let ids: Vec<u64> = history(&w).iter().map(id).collect();
    assert!(ids.windows(2).all(|p| p[0] < p[1]), "{ids:?}");
}

#[test]
fn since_beyond_history_gives_the_last_n() {
    let server = start(chatroom::Config {
        history: 3,
        ..config()
    });
    let (mut alice, w) = joined(&server, "room1", "alice");
    let epoch = w["epoch"].clone();
    let first = id(&alice.say_echo("x0"));
    for i in 1..6 {
        alice.say_echo(&format!("x{i}"));
    }
    let mut c = TestClient::connect(&server, "room1");
    let w = c.hello(json!({"type": "hello", "name": "bob", "since": first, "epoch": epoch}));
    assert_eq!(history_texts(&w), ["x3", "x4", "x5"]);
}

#[test]
fn epoch_changes_when_the_server_restarts() {
    let first = start_default();
    let (mut alice, w1) = joined(&first, "room1", "alice");
    alice.say_echo("before restart");
    drop(alice);
    first.shutdown();

    let second = start_default();
    let (_alice, w2) = joined(&second, "room1", "alice");
    assert_ne!(
        w1["epoch"], w2["epoch"],
        "ids restarted, so the epoch must differ"
    );
}

/// Waits until the hub counts no room with anyone in it (`/healthz` `rooms`), so every leave
/// sent so far has been handled.
fn wait_until_every_room_is_empty(server: &ServerHandle) {
    wait_until("every room is empty", || {
        health(server.http_addr())["rooms"] == 0
    });
}

/// alice joins room1, says "one" and leaves; returns her welcome and the message's id once
/// the room is empty.
fn said_one_and_left(server: &ServerHandle) -> (Value, u64) {
    let (mut alice, welcome) = joined(server, "room1", "alice");
    let one = id(&alice.say_echo("one"));
    alice.close();
    wait_until_every_room_is_empty(server);
    (welcome, one)
}

#[test]
fn an_emptied_room_keeps_its_epoch_history_and_ids() {
    // Empty rooms are remembered (up to MAX_IDLE_ROOMS of them), so whoever comes next
    // resumes the same id sequence.
    let server = start_default();
    let (w1, first) = said_one_and_left(&server);
    let (mut bob, w2) = joined(&server, "room1", "bob");
    assert_eq!(
        w2["epoch"], w1["epoch"],
        "the remembered room keeps its epoch"
    );
    assert_eq!(history_texts(&w2), ["one"]);
    assert_eq!(users(&w2), ["bob"]);
    assert_eq!(id(&bob.say_echo("two")), first + 1, "ids go on");
}

#[test]
fn a_forgotten_room_starts_a_new_epoch() {
    // Beyond MAX_IDLE_ROOMS empty rooms, the longest-idle one is forgotten: whoever comes next
    // finds a new room, whose ids start again, so its epoch must differ and `since` from the
    // old one must not be trusted.
    let server = start_default();
    let (w1, last) = said_one_and_left(&server);
    // room1 is now the longest-idle room; this many more empty rooms push it out.
    for i in 0..MAX_IDLE_ROOMS {
        drop(joined(&server, &format!("idle{i}"), "passer-by"));
    }
    wait_until_every_room_is_empty(&server);

    let mut bob = TestClient::connect(&server, "room1");
    let w2 =
        bob.hello(json!({"type": "hello", "name": "bob", "since": last, "epoch": w1["epoch"]}));
    assert_ne!(
        w2["epoch"], w1["epoch"],
        "a forgotten room gets a new epoch"
    );
    assert!(
        history(&w2).is_empty(),
        "a forgotten room has no history: {w2}"
    );
    bob.sync();
}

#[test]
fn fifty_clients_see_one_order() {
    const CLIENTS: usize = 50;
    const EACH: usize = 20;
    // Room for every frame of the test in each queue (the joined notices and every message),
    // so a client thread that a loaded machine leaves unscheduled is never dropped as a slow
    // consumer: this test is about order.
    let server = start(chatroom::Config {
        outbound_capacity: CLIENTS * (EACH + 1),
        ..config()
    });
    let mut clients: Vec<TestClient> = (0..CLIENTS)
        .map(|i| joined(&server, "busy", &format!("c{i}")).0)
        .collect();
    let orders: Vec<Vec<(u64, String)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = clients
            .iter_mut()
            .enumerate()
            .map(|(i, client)| {
                std::thread::Builder::new()
                    .name(format!("client-{i}"))
                    .spawn_scoped(scope, move || {
                        let mut seen = Vec::with_capacity(CLIENTS * EACH);
                        fn record(v: &Value, seen: &mut Vec<(u64, String)>) {
                            if v["type"] == "message" {
                                seen.push((id(v), v["text"].as_str().unwrap().to_owned()));
                            }
                        }
                        for n in 0..EACH {
                            let text = format!("c{i}-{n}");
                            client.say(&text);
                            loop {
                                let v = client.next_json();
                                record(&v, &mut seen);
                                if v["text"] == text.as_str() {
                                    assert_eq!(v["name"], format!("c{i}").as_str());
                                    break;
                                }
                            }
                        }
                        while seen.len() < CLIENTS * EACH {
                            let v = client.next_json();
                            record(&v, &mut seen);
                        }
                        seen
                    })
                    .expect("spawn a client thread")
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });

    let reference = &orders[0];
    let ids: Vec<u64> = reference.iter().map(|(id, _)| *id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids strictly increase");
    let texts: HashSet<&str> = reference.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(texts.len(), CLIENTS * EACH, "every message exactly once");
    for (i, order) in orders.iter().enumerate() {
        assert_eq!(order, reference, "client {i} saw another order");
    }
    // Everyone is still connected.
    assert_eq!(server.client_count(), CLIENTS);
}

/// A room's name is its key: the log at its default level (info), which operators keep and
/// ship, must not hold it, also through a join, a message and a leave.
#[test]
fn room_names_stay_out_of_the_log_at_info_level() {
    let room = format!("secret-{}", unique("room"));
    let server = ChildServer::start(&["--data", "none", "--log-level", "info"]);
    let mut alice = TestClient::try_connect(server.ws, &format!("/ws/{room}")).unwrap();
    alice.join("alice");
    alice.say("hello");
    alice.expect_said("alice", "hello");
    alice.close();
    let mut server = server;
    server.process.signal("TERM");
    let (_, _, stderr) = server.process.wait_exit(SHUTDOWN_LIMIT);
    assert!(
        stderr.contains("disconnect"),
        "no disconnect line:\n{stderr}"
    );
    assert!(
        !stderr.contains(&room),
        "the room's name is in the log:\n{stderr}"
    );
}
