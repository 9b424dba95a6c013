//! Older messages and sends that happen once (issue 13): the `history` request, in memory and
//! from the store, its limits and bad input; and `cid`, which turns a say sent again (after a
//! reconnect) into the original message instead of a second one.

use chatroom::{Config, RateLimit};
use serde_json::{json, Value};

use crate::support::*;

/// Asks for the page before `before` and returns the answer (which must be the next frame).
fn page(client: &mut TestClient, request: Value) -> Value {
    client.send_json(&request);
    client.expect_type("history")
}

/// The ids of a page's messages.
fn ids(page: &Value) -> Vec<u64> {
    page["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("a history answer without messages: {page}"))
        .iter()
        .map(id)
        .collect()
}

fn range(from: u64, through: u64) -> Vec<u64> {
    (from..=through).collect()
}

/// Says `count` numbered messages and returns their ids.
fn say_many(client: &mut TestClient, count: usize) -> Vec<u64> {
    (0..count)
        .map(|i| id(&client.say_echo(&format!("message {i}"))))
        .collect()
}

#[test]
fn pages_of_older_history_come_from_memory_without_a_store() {
    let server = start(config());
    let (mut alice, _) = joined(&server, "older", "alice");
    let said = say_many(&mut alice, 30);
    assert_eq!(said, range(1, 30));

    let p = page(
        &mut alice,
        json!({"type": "history", "before": 11, "limit": 5}),
    );
    assert_eq!(ids(&p), range(6, 10));
    assert_eq!(p["more"], true);
    // The messages are the ones that were broadcast, byte for byte in content.
    assert_eq!(p["messages"][0]["text"], "message 5");
    assert_eq!(p["messages"][0]["name"], "alice");
    // One past the newest id gives the newest page; the default limit is 50.
    let p = page(
        &mut alice,
        json!({"type": "history", "before": 31, "limit": 3}),
    );
    assert_eq!((ids(&p), &p["more"]), (range(28, 30), &json!(true)));
    let p = page(&mut alice, json!({"type": "history", "before": 31}));
    assert_eq!((ids(&p), &p["more"]), (range(1, 30), &json!(false)));
    // The start of the room.
    let p = page(
        &mut alice,
        json!({"type": "history", "before": 6, "limit": 50}),
    );
    assert_eq!((ids(&p), &p["more"]), (range(1, 5), &json!(false)));
    let p = page(&mut alice, json!({"type": "history", "before": 1}));
    assert_eq!((ids(&p), &p["more"]), (vec![], &json!(false)));

    // With --data none, what memory no longer holds is gone: `more` is false past it.
    let small = start(Config {
        history: 10,
        ..config()
    });
    let (mut bob, _) = joined(&small, "older", "bob");
    say_many(&mut bob, 30);
    let p = page(
        &mut bob,
        json!({"type": "history", "before": 25, "limit": 10}),
    );
    assert_eq!((ids(&p), &p["more"]), (range(21, 24), &json!(false)));
}

#[test]
fn pages_of_older_history_come_from_the_store_beyond_memory() {
    let dir = TempDir::new("older");
    let server = start(Config {
        history: 10,
        ..disk_config(dir.path())
    });
    let (mut alice, _) = joined(&server, "older", "alice");
    say_many(&mut alice, 40);
    // Memory holds 31..40; the rest is on disk or about to be (the store reads both).
    let p = page(
        &mut alice,
        json!({"type": "history", "before": 31, "limit": 20}),
    );
    assert_eq!((ids(&p), &p["more"]), (range(11, 30), &json!(true)));
    assert_eq!(p["messages"][0]["text"], "message 10");
    let p = page(
        &mut alice,
        json!({"type": "history", "before": 11, "limit": 50}),
    );
    assert_eq!((ids(&p), &p["more"]), (range(1, 10), &json!(false)));
    // Across a restart, from disk alone.
    drop(alice);
    server.shutdown();
    let server = start(Config {
        history: 10,
        ..disk_config(dir.path())
    });
    let (mut bob, welcome) = joined(&server, "older", "bob");
    assert_eq!(
        history(&welcome).iter().map(id).collect::<Vec<_>>(),
        range(31, 40)
    );
    let p = page(
        &mut bob,
        json!({"type": "history", "before": 31, "limit": 25}),
    );
    assert_eq!((ids(&p), &p["more"]), (range(6, 30), &json!(true)));
}

#[test]
fn bad_history_requests_are_refused() {
    let server = start(config());
    let mut early = TestClient::connect(&server, "older");
    early.send_json(&json!({"type": "history", "before": 5}));
    early.expect_error("not_joined");

    let (mut alice, _) = joined(&server, "older", "alice");
    for bad in [
        json!({"type": "history"}),
        json!({"type": "history", "before": 0}),
        json!({"type": "history", "before": -3}),
        json!({"type": "history", "before": 1.5}),
        json!({"type": "history", "before": "9"}),
        json!({"type": "history", "before": 9, "limit": 0}),
        json!({"type": "history", "before": 9, "limit": 101}),
        json!({"type": "history", "before": 9, "limit": "5"}),
    ] {
        alice.send_json(&bad);
        alice.expect_error("bad_request");
    }
    // The connection is fine after all that.
    alice.sync();
}

#[test]
fn history_requests_are_rate_limited_like_says() {
    let server = start(Config {
        rate_limit: Some(RateLimit {
            burst: 3,
            per_second: 0.0001,
        }),
        ..config()
    });
    let (mut alice, _) = joined(&server, "older", "alice");
    alice.say_echo("one");
    for _ in 0..2 {
        page(&mut alice, json!({"type": "history", "before": 2}));
    }
    alice.send_json(&json!({"type": "history", "before": 2}));
    alice.expect_error("rate_limited");
}

#[test]
fn a_say_sent_again_with_its_cid_is_answered_with_the_original() {
    let server = start(config());
    let hello = |name: &str| json!({"type": "hello", "name": name, "session": format!("s-{name}")});
    let mut alice = TestClient::connect(&server, "once");
    alice.hello(hello("alice"));
    let mut bob = TestClient::connect(&server, "once");
    bob.hello(hello("bob"));
    alice.expect_type("joined");

    alice.send_json(&json!({"type": "say", "text": "typed before the cut", "cid": "c-1"}));
    let original = alice.expect_type("message");
    assert_eq!(original["cid"], "c-1");
    assert_eq!(bob.expect_type("message"), original);

    // The connection drops; the page reconnects with its session and sends it again.
    drop(alice);
    let mut again = TestClient::connect(&server, "once");
    let welcome = again.hello(hello("alice"));
    assert_eq!(history(&welcome).last(), Some(&original));
    again.send_json(&json!({"type": "say", "text": "typed before the cut", "cid": "c-1"}));
    assert_eq!(
        again.expect_type("message"),
        original,
        "the original, same id and ts"
    );
    // bob got it once: his next message is the one said after.
    let after = again.say_echo("next");
    let seen = bob.skip_until(|f| f["type"] == "message");
    assert_eq!(seen, after, "bob saw the resend as a second message");

    // The same cid from someone else is their own message.
    bob.send_json(&json!({"type": "say", "text": "mine", "cid": "c-1"}));
    let mine = bob.expect_type("message");
    assert_eq!(
        (mine["name"].as_str(), mine["cid"].as_str()),
        (Some("bob"), Some("c-1"))
    );
    assert!(id(&mine) > id(&after));
}

#[test]
fn a_bad_cid_is_refused() {
    let server = start(config());
    let (mut alice, _) = joined(&server, "once", "alice");
    for cid in [json!(""), json!("x".repeat(65)), json!(7), json!(["a"])] {
        alice.send_json(&json!({"type": "say", "text": "hi", "cid": cid}));
        alice.expect_error("bad_request");
    }
    alice.send_json(&json!({"type": "say", "text": "hi", "cid": "é".repeat(64)}));
    assert_eq!(alice.expect_type("message")["cid"], "é".repeat(64));
    let plain = alice.say_echo("no cid");
    assert!(plain.get("cid").is_none(), "{plain}");
}
