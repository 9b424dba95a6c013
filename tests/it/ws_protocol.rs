//! One connection's side of PROTOCOL.md: handshake paths, `welcome`, `message` fields,
//! broadcast to the sender, every bad-input rule (error frames that keep the connection open),
//! frame-level rules (binary, 64 KiB, invalid UTF-8, protocol violations), typing, ping/pong.

use serde_json::json;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::Message;

use crate::support::{
    client_frame, history, joined, now_ms, start_default, together, users, wait_until, TestClient,
    FIN, OP_BINARY, OP_CONTINUATION, OP_TEXT, RSV1,
};

#[test]
fn ws_paths_map_to_rooms() {
    let server = start_default();
    let mut a = TestClient::connect_path(&server, "/ws");
    assert_eq!(a.join("alice")["room"], "general");
    let mut b = TestClient::connect_path(&server, "/ws/");
    let welcome = b.join("bob");
    assert_eq!(welcome["room"], "general");
    assert_eq!(users(&welcome), ["alice", "bob"]);
    let mut c = TestClient::connect_path(&server, "/ws/general");
    assert_eq!(users(&c.join("carol")), ["alice", "bob", "carol"]);

    let mut d = TestClient::connect_path(&server, "/ws/MixedCase_1-x");
    let welcome = d.join("dave");
    assert_eq!(welcome["room"], "mixedcase_1-x");
    assert_eq!(users(&welcome), ["dave"]);
    assert_eq!(d.sync()["room"], "mixedcase_1-x");
    let mut e = TestClient::connect_path(&server, "/ws/mixedcase_1-X");
    assert_eq!(users(&e.join("erin")), ["dave", "erin"]);

    let long = "z".repeat(64);
    let mut f = TestClient::connect(&server, &long);
    assert_eq!(f.join("fay")["room"], long.as_str());
}

#[test]
fn invalid_ws_rooms_are_refused_with_404() {
    let server = start_default();
    let too_long = format!("/ws/{}", "a".repeat(65));
    for path in [
        "/ws/a.b",
        "/ws/static",
        "/ws/api",
        "/ws/ws",
        "/ws/healthz",
        "/ws/HEALTHZ",
        too_long.as_str(),
        "/ws/a/b",
        "/ws//",
        "/ws/..%2f..%2fetc%2fpasswd",
        "/ws/../ws/general",
        "/ws/%00",
        "/ws/caf%C3%A9",
        "/ws/a%20b",
        "/",
        "/general",
        "/wsgeneral",
        "/static/app.js",
    ] {
        match TestClient::try_connect(server.ws_addr(), path) {
            Ok(_) => panic!("{path} was accepted"),
            Err(status) => assert_eq!(status, 404, "{path}"),
        }
    }
    wait_until("refused handshakes hold no threads", || {
        server.client_threads() == 0 && server.client_count() == 0
    });
    // The listener is still fine after all those refusals.
    joined(&server, "general", "alice");
}

#[test]
fn welcome_describes_the_room() {
    let server = start_default();
    let (_alice, welcome) = joined(&server, "room1", "alice");
    assert_eq!(welcome["room"], "room1");
    assert_eq!(welcome["name"], "alice");
    let epoch = welcome["epoch"].as_str().expect("epoch is a string");
    assert!(!epoch.is_empty());
    assert_eq!(users(&welcome), ["alice"]);
    assert!(history(&welcome).is_empty(), "{welcome}");

    let (_bob, welcome) = joined(&server, "room1", "  bob  ");
    assert_eq!(welcome["name"], "bob", "names are stored trimmed");
    assert_eq!(welcome["epoch"], epoch, "one room, one epoch");
    assert_eq!(users(&welcome), ["alice", "bob"]);
}

#[test]
fn message_reaches_everyone_including_the_sender() {
    let server = start_default();
    let [mut alice, mut bob, mut carol] = together(&server, "room1", ["alice", "bob", "carol"]);

    let before = now_ms();
    alice.say("  hello there \n");
    let mut seen = Vec::new();
    for client in [&mut alice, &mut bob, &mut carol] {
        let m = client.expect_said("alice", "hello there");
        let keys: Vec<&String> = m.as_object().unwrap().keys().collect();
        let mut keys: Vec<&str> = keys.into_iter().map(String::as_str).collect();
        keys.sort();
        assert_eq!(keys, ["id", "name", "room", "text", "ts", "type"], "{m}");
        assert_eq!(m["room"], "room1");
        let ts = m["ts"].as_u64().expect("ts is a number");
        assert!(
            ts + 1000 >= before && ts <= now_ms() + 1000,
            "ts {ts} is not server time in ms"
        );
        seen.push((m["id"].clone(), ts));
    }
    assert!(seen.windows(2).all(|w| w[0] == w[1]), "{seen:?}");

    bob.say("second");
    let first_id = seen[0].0.as_u64().unwrap();
    for client in [&mut alice, &mut bob, &mut carol] {
        let m = client.expect_said("bob", "second");
        assert!(m["id"].as_u64().unwrap() > first_id, "ids increase: {m}");
    }
}

#[test]
fn texts_round_trip_exactly() {
    let server = start_default();
    let [mut alice, mut bob] = together(&server, "room1", ["alice", "bob"]);
    for text in [
        "\"quoted\" \\ back\\slash",
        "</script><script>alert(1)</script>",
        "<b>&amp;</b>",
        "line one\nline two",
        "emoji 🎉 and ZWJ 👩‍👩‍👧 and RTL \u{202e}txet",
        "{\"type\":\"say\"}",
        "\u{1}control inside is kept",
    ] {
        alice.say(text);
        alice.expect_said("alice", text);
        bob.expect_said("alice", text);
    }
}

#[test]
fn bad_frames_before_hello_are_bad_request_and_the_connection_stays_open() {
    let server = start_default();
    let (mut bob, _) = joined(&server, "room1", "bob");
    let mut alice = TestClient::connect(&server, "room1");
    for frame in [
        "not json",
        "",
        "[1,2]",
        "42",
        "{}",
        "{\"type\":\"dance\"}",
        "{\"type\":5}",
        "{\"name\":\"x\"}",
        "{\"type\":\"hello\"}",
        "{\"type\":\"hello\",\"name\":5}",
        "{\"type\":\"hello\",\"name\":\"alice\"",
    ] {
        alice.send_text(frame);
        alice.expect_error("bad_request");
    }
    let welcome = alice.join("alice");
    assert_eq!(users(&welcome), ["alice", "bob"]);
    let joined = bob.expect_type("joined");
    assert_eq!(joined["name"], "alice");
    bob.sync();
}

#[test]
fn bad_frames_after_hello_are_bad_request_and_nothing_is_broadcast() {
    let server = start_default();
    let [mut alice, mut bob] = together(&server, "room1", ["alice", "bob"]);
    for frame in [
        "not json",
        "{\"type\":\"dance\"}",
        "{\"type\":\"say\"}",
        "{\"type\":\"say\",\"text\":5}",
        "{\"type\":\"say\",\"text\":null}",
        "{\"text\":\"no type\"}",
    ] {
        alice.send_text(frame);
        alice.expect_error("bad_request");
    }
    alice.sync();
    // The refusals reached the hub before alice's marker, so bob's next frame is that marker.
    let m = bob.expect_type("message");
    assert_eq!(m["name"], "alice");
    assert!(m["text"].as_str().unwrap().starts_with("marker-"), "{m}");
}

#[test]
fn say_and_typing_before_hello_are_not_joined() {
    let server = start_default();
    let (mut bob, _) = joined(&server, "room1", "bob");
    let mut alice = TestClient::connect(&server, "room1");
    alice.say("sneaky");
    alice.expect_error("not_joined");
    alice.typing();
    alice.expect_error("not_joined");
    bob.sync();
    alice.join("alice");
    bob.expect_type("joined");
    bob.sync();
}

#[test]
fn second_hello_is_bad_request_and_changes_nothing() {
    let server = start_default();
    let [mut alice, mut bob] = together(&server, "room1", ["alice", "bob"]);
    alice.send_json(&json!({"type": "hello", "name": "mallory"}));
    alice.expect_error("bad_request");
    assert_eq!(alice.sync()["name"], "alice");
    let m = bob.expect_type("message");
    assert_eq!(m["name"], "alice", "bob saw something else first: {m}");
    let (_carol, welcome) = joined(&server, "room1", "carol");
    assert_eq!(users(&welcome), ["alice", "bob", "carol"]);
}

#[test]
fn bad_names_are_refused_and_the_connection_stays_open() {
    let server = start_default();
    let mut alice = TestClient::connect(&server, "room1");
    for name in [
        String::new(),
        "   ".to_owned(),
        "\t\n".to_owned(),
        "a".repeat(33),
        "é".repeat(33),
        format!("  {}  ", "b".repeat(33)),
        "a\u{7}b".to_owned(),
        "a\nb".to_owned(),
        "tab\tname".to_owned(),
        "del\u{7f}".to_owned(),
        "next\u{85}line".to_owned(),
        "nul\u{0}".to_owned(),
        "esc\u{1b}[31m".to_owned(),
        // Blank on the page: only invisible characters.
        "\u{200B}".to_owned(),
        "\u{FEFF}".to_owned(),
        "\u{3164}".to_owned(),
        "\u{2800}\u{2800}".to_owned(),
        // Reorders the text after it ("evil joined · 02:43 AM" showed reversed on the page).
        "\u{202E}evil".to_owned(),
        // Marks piled on one letter, drawn over the neighbouring lines.
        format!("z{}", "\u{336}".repeat(31)),
    ] {
        alice.send_json(&json!({"type": "hello", "name": name}));
        alice.expect_error("bad_name");
    }
    alice.say("still not joined");
    alice.expect_error("not_joined");
    let welcome = alice.join(&"é".repeat(32));
    assert_eq!(welcome["name"], "é".repeat(32).as_str());

    let (_b, welcome) = joined(&server, "room1", &"a".repeat(32));
    assert_eq!(welcome["name"], "a".repeat(32).as_str());
    let (_c, welcome) = joined(&server, "room1", &format!("   {}   ", "c".repeat(32)));
    assert_eq!(welcome["name"], "c".repeat(32).as_str());
    let (_d, welcome) = joined(&server, "room1", "Zoë 李 🦀");
    assert_eq!(welcome["name"], "Zoë 李 🦀");
}

#[test]
fn text_limits_count_characters_after_trimming() {
    let server = start_default();
    let [mut alice, mut bob] = together(&server, "room1", ["alice", "bob"]);

    for (text, code) in [
        (String::new(), "empty"),
        ("   \n\t  ".to_owned(), "empty"),
        ("a".repeat(4001), "too_long"),
        ("é".repeat(4001), "too_long"),
        (format!(" {} ", "🦀".repeat(4001)), "too_long"),
    ] {
        alice.say(&text);
        let refusal = alice.expect_error(code);
        assert_eq!(
            refusal["text"],
            text.trim(),
            "a refusal names the text it refused"
        );
    }
    // Nothing was broadcast for the refused texts.
    alice.sync();
    assert!(bob.expect_type("message")["text"]
        .as_str()
        .unwrap()
        .starts_with("marker-"));

    for (text, stored) in [
        ("é".repeat(4000), "é".repeat(4000)),
        ("🦀".repeat(4000), "🦀".repeat(4000)),
        (format!("  {}  ", "a".repeat(4000)), "a".repeat(4000)),
        ("x".to_owned(), "x".to_owned()),
    ] {
        alice.say(&text);
        alice.expect_said("alice", &stored);
        bob.expect_said("alice", &stored);
    }
}

#[test]
fn binary_frames_are_bad_request_and_the_connection_stays_open() {
    let server = start_default();
    let mut alice = TestClient::connect(&server, "room1");
    alice.send(Message::binary(
        b"{\"type\":\"hello\",\"name\":\"alice\"}".to_vec(),
    ));
    alice.expect_error("bad_request");
    alice.join("alice");
    alice.send(Message::binary(
        b"{\"type\":\"say\",\"text\":\"hi\"}".to_vec(),
    ));
    alice.expect_error("bad_request");
    alice.sync();
}

#[test]
fn frame_over_64_kib_closes_with_1009() {
    let server = start_default();
    let (mut alice, _) = joined(&server, "room1", "alice");
    alice.send_text(&"a".repeat(64 * 1024 + 1));
    alice.expect_close_code(1009);
}

#[test]
fn fragmented_message_over_64_kib_closes_with_1009() {
    let server = start_default();
    let (mut alice, _) = joined(&server, "room1", "alice");
    let half = vec![b'a'; 40 * 1024];
    let mut frames = client_frame(OP_TEXT, &half);
    frames.extend(client_frame(FIN | OP_CONTINUATION, &half));
    alice.write_raw(&frames);
    alice.expect_close_code(1009);
}

#[test]
fn large_frame_under_64_kib_is_too_long_not_a_close() {
    let server = start_default();
    let (mut alice, _) = joined(&server, "room1", "alice");
    alice.say(&"a".repeat(60_000));
    alice.expect_error("too_long");
    alice.sync();
}

#[test]
fn fragmented_message_under_the_limit_is_reassembled() {
    let server = start_default();
    let (mut alice, _) = joined(&server, "room1", "alice");
    let mut frames = client_frame(OP_TEXT, b"{\"type\":\"say\",");
    frames.extend(client_frame(OP_CONTINUATION, b"\"text\":\"in "));
    frames.extend(client_frame(FIN | OP_CONTINUATION, b"pieces\"}"));
    alice.write_raw(&frames);
    alice.expect_said("alice", "in pieces");
}

#[test]
fn invalid_utf8_closes_with_1007() {
    let server = start_default();
    let (mut alice, _) = joined(&server, "room1", "alice");
    let mut payload = b"{\"type\":\"say\",\"text\":\"".to_vec();
    payload.extend_from_slice(&[0xff, 0xfe, 0xc3]);
    payload.extend_from_slice(b"\"}");
    alice.write_raw(&client_frame(FIN | OP_TEXT, &payload));
    alice.expect_close_code(1007);
}

#[test]
fn protocol_violations_close_with_1002() {
    let server = start_default();
    // One room each, so no one sees another's `left` before the close frame.
    // A reserved bit without a negotiated extension.
    let (mut alice, _) = joined(&server, "room1", "alice");
    alice.write_raw(&client_frame(
        FIN | RSV1 | OP_TEXT,
        b"{\"type\":\"typing\"}",
    ));
    alice.expect_close_code(1002);

    // A continuation frame with no message to continue.
    let (mut bob, _) = joined(&server, "room2", "bob");
    bob.write_raw(&client_frame(FIN | OP_CONTINUATION, b"x"));
    bob.expect_close_code(1002);

    // An unmasked frame from a client (RFC 6455 section 5.1).
    let (mut carol, _) = joined(&server, "room3", "carol");
    let mut unmasked = vec![FIN | OP_BINARY, 2];
    unmasked.extend_from_slice(b"hi");
    carol.write_raw(&unmasked);
    carol.expect_close_code(1002);
}

#[test]
fn typing_goes_to_the_others_once_per_burst() {
    let server = start_default();
    let [mut alice, mut bob, mut carol] = together(&server, "room1", ["alice", "bob", "carol"]);

    // Three typing frames back to back: the server relays one per 2 s per client, so the
    // second and third are dropped unless the server reads them 2 s apart. They take
    // microseconds; even a loaded machine leaves a margin of well over ten times.
    alice.typing();
    alice.typing();
    alice.typing();
    alice.say("done typing");
    // The sender never sees its own typing: its next frame is its message.
    alice.expect_said("alice", "done typing");
    for client in [&mut bob, &mut carol] {
        let typing = client.expect_type("typing");
        assert_eq!(typing, json!({"type": "typing", "name": "alice"}));
        // Only one typing within 2 s: the next frame is already the message.
        client.expect_said("alice", "done typing");
    }
}

#[test]
fn ping_gets_a_pong_with_the_same_payload() {
    let server = start_default();
    let (mut alice, _) = joined(&server, "room1", "alice");
    alice.send(Message::Ping(b"are you there".to_vec().into()));
    loop {
        match alice.next_frame() {
            Message::Pong(payload) => {
                assert_eq!(&payload[..], b"are you there");
                break;
            }
            Message::Ping(_) => continue,
            other => panic!("expected a Pong, got {other:?}"),
        }
    }
    alice.sync();
}

#[test]
fn client_close_is_echoed() {
    let server = start_default();
    let (mut alice, _) = joined(&server, "room1", "alice");
    alice.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    })));
    alice.expect_close_code(1000);
}
