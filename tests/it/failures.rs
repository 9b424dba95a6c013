//! A service thread that dies is noticed: the failure is reported to the server's owner (the
//! binary exits non-zero on it), `/healthz` answers 503 naming the thread, and a room whose
//! history the dead store never sent is served anyway instead of waiting for ever.
//!
//! The deaths are real panics, placed by `Config::crash_for_tests` (no flag sets it).

use chatroom::{Config, CrashForTests, ServerHandle, ServiceFailure};
use serde_json::Value;

use crate::support::*;

/// `GET /healthz` of a server with a dead service thread: 503 with the thread named.
fn failed_health(server: &ServerHandle) -> Value {
    let response = get(server.http_addr(), "/healthz");
    assert_eq!(response.status, 503, "/healthz: {response:?}");
    let body: Value = serde_json::from_slice(&response.body).expect("/healthz is JSON");
    assert_eq!(body["status"], "failed", "{body}");
    body
}

/// Waits for the server to report its first failure, as the binary does.
fn reported_failure(server: &ServerHandle) -> ServiceFailure {
    server
        .failures()
        .recv_timeout(TIMEOUT)
        .expect("a dead service thread is reported")
}

#[test]
fn a_healthy_server_reports_no_failure() {
    let server = start_default();
    let (_alice, _) = joined(&server, "calm", "alice");
    let body = health(server.http_addr());
    assert_eq!(body["status"], "ok", "{body}");
    assert_eq!(body["failed"], Value::Null, "{body}");
    assert_eq!(server.failure(), None);
    assert!(server.failures().try_recv().is_err());
}

#[test]
fn a_dead_hub_is_reported_and_turns_healthz_to_503() {
    let server = start(Config {
        crash_for_tests: Some(CrashForTests::HubOnJoin("doomed".into())),
        ..config()
    });
    let mut victim = TestClient::connect(&server, "doomed");
    victim.send_json(&serde_json::json!({"type": "hello", "name": "alice"}));

    let failure = reported_failure(&server);
    assert_eq!(failure.thread, "hub");
    assert!(failure.panicked, "{failure:?}");
    assert_eq!(server.failure(), Some(failure));
    let body = failed_health(&server);
    assert_eq!(body["failed"], "hub", "{body}");
    // Shutdown still completes with a dead hub (the handle's drop joins every thread).
    server.shutdown();
}

#[test]
fn a_store_that_dies_during_a_load_leaves_no_room_waiting() {
    let dir = TempDir::new("store-dies");
    let server = start(Config {
        crash_for_tests: Some(CrashForTests::StoreOnLoad("doomed".into())),
        ..disk_config(dir.path())
    });
    // A room loaded before the crash keeps working from memory afterwards.
    let (mut early, _) = joined(&server, "before", "early");

    // The store takes this room's Load and panics: the join must still be welcomed.
    let mut alice = TestClient::connect(&server, "doomed");
    let welcome = alice.join("alice");
    assert_eq!(history(&welcome).len(), 0, "{welcome}");
    let failure = reported_failure(&server);
    assert_eq!(failure.thread, "store");
    assert!(failure.panicked, "{failure:?}");

    // Chat goes on in the doomed room, in the early room, and in a room first used now.
    alice.say_echo("still here");
    early.say_echo("me too");
    let (mut late, _) = joined(&server, "after", "late");
    late.say_echo("and a new room");

    let body = failed_health(&server);
    assert_eq!(body["failed"], "store", "{body}");
}

#[test]
fn a_history_that_cannot_be_read_is_counted_not_hidden() {
    let dir = TempDir::new("unreadable");
    let server = start(disk_config(dir.path()));
    let (mut alice, _) = joined(&server, "damaged", "alice");
    alice.say_echo("kept");
    wait_until_written(server.http_addr(), 1);
    drop(alice);
    server.shutdown();

    // Another program damages the room's stored messages while the server is down.
    let db = rusqlite::Connection::open(db_path(dir.path())).unwrap();
    let damaged = db
        .execute("UPDATE messages SET frames = 'not a frame array'", [])
        .unwrap();
    assert_eq!(damaged, 1, "one chunk holds the one message");
    drop(db);

    let server = start(disk_config(dir.path()));
    let (mut bob, welcome) = joined(&server, "damaged", "bob");
    assert_eq!(history(&welcome).len(), 0, "{welcome}");
    let store = store_health(server.http_addr());
    assert_eq!(count(&store, "read_errors"), 1, "{store}");
    assert_eq!(store["state"], "failing", "{store}");
    // The room is served all the same.
    bob.say_echo("the room still works");
}

#[test]
fn a_start_that_fails_on_a_port_in_use_leaves_the_history_clean() {
    let dir = TempDir::new("port-in-use");
    let server = start(disk_config(dir.path()));
    let (mut alice, welcome) = joined(&server, "kept", "alice");
    let epoch = welcome["epoch"].clone();
    alice.say_echo("before");
    drop(alice);
    server.shutdown();

    // Another server holds the page's port: this start fails, and must not touch the history.
    let blocker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let refused = chatroom::Server::start(Config {
        http_addr: blocker.local_addr().unwrap(),
        ..disk_config(dir.path())
    });
    assert!(refused.is_err(), "the port is taken");

    // So the next start finds a clean run: the room keeps its epoch, and a page resumes.
    let server = start(disk_config(dir.path()));
    let (_bob, welcome) = joined(&server, "kept", "bob");
    assert_eq!(welcome["epoch"], epoch, "{welcome}");
    assert_eq!(history_texts(&welcome), ["before"]);
}
