//! The Redis bus (`chatroom::bus`, issue 12) against a real redis-server that each test starts
//! on a free port of 127.0.0.1 (no persistence) and stops by its PID when it ends
//! ([`RedisServer`], in `redis_support`).
//!
//! Without `redis-server` on the PATH these tests say so loudly and pass, unless
//! `CHATROOM_REQUIRE_REDIS=1` (set by .ci/run), which makes a missing redis-server a failure.
//! Waits are bounded and synchronised on answers (a PING, an XREAD that returns), never on
//! sleeps.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use chatroom::bus::{
    scripts, Appended, Bus, BusErrorKind, Entry, Followed, Follower, Keys, RoomState, Timeouts,
};
use chatroom::protocol;

use crate::redis_support::{free_port, RedisServer};

/// How long a follower may take to wake after an append or a poke (it blocks far longer).
const WAKE_LIMIT: Duration = Duration::from_secs(3);
const RETAIN: usize = 10_000;

fn bus(redis: &RedisServer) -> Bus {
    Bus::connect(&redis.url(), Keys::default(), Timeouts::default()).expect("connect")
}

fn say(bus: &mut Bus, room: &str, text: &str, token: &str) -> Appended {
    let frame = scripts::split_message(room, "alice", text, 1_700_000_000_000, Some(token));
    bus.append(room, &frame, token, RETAIN).expect("append")
}

/// What `protocol::encode_message` makes for a message of [`say`].
fn expected_frame(room: &str, id: u64, text: &str, token: &str) -> String {
    protocol::encode_message(id, room, "alice", text, 1_700_000_000_000, Some(token)).to_string()
}

#[test]
fn concurrent_appends_get_every_id_once_in_stream_order() {
    let Some(redis) = RedisServer::start(&[]) else {
        return;
    };
    const THREADS: usize = 4;
    const EACH: usize = 50;
    let mut handles = Vec::new();
    for t in 0..THREADS {
        let mut bus = bus(&redis);
        handles.push(thread::spawn(move || {
            (0..EACH)
                .map(|i| {
                    let text = format!("t{t} m{i}");
                    let appended = say(&mut bus, "race", &text, &format!("{t}-{i}"));
                    assert!(appended.fresh);
                    (appended.id, text, format!("{t}-{i}"))
                })
                .collect::<Vec<_>>()
        }));
    }
    let mut said: Vec<(u64, String, String)> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    said.sort();
    let ids: Vec<u64> = said.iter().map(|s| s.0).collect();
    assert_eq!(ids, (1..=(THREADS * EACH) as u64).collect::<Vec<_>>());

    let mut reader = bus(&redis);
    let entries = reader.read_after("race", 0, 1000).unwrap();
    assert_eq!(entries.len(), THREADS * EACH);
    for (entry, (id, text, token)) in entries.iter().zip(&said) {
        assert_eq!(entry.id, *id, "stream order is id order");
        assert_eq!(entry.frame, expected_frame("race", *id, text, token));
    }
    assert_eq!(
        reader.room_state("race").unwrap(),
        RoomState {
            epoch: None,
            last_id: (THREADS * EACH) as u64
        }
    );
}

#[test]
fn the_same_token_appends_once() {
    let Some(redis) = RedisServer::start(&[]) else {
        return;
    };
    let mut a = bus(&redis);
    let mut b = bus(&redis);
    assert_eq!(
        say(&mut a, "r", "hi", "tok-1"),
        Appended { id: 1, fresh: true }
    );
    // A retry, from another connection (as after a reconnect), finds the first append.
    assert_eq!(
        say(&mut b, "r", "hi", "tok-1"),
        Appended {
            id: 1,
            fresh: false
        }
    );
    assert_eq!(
        say(&mut a, "r", "again", "tok-2"),
        Appended { id: 2, fresh: true }
    );
    // A token is per room: the same one in another room is another say.
    assert_eq!(
        say(&mut a, "s", "hi", "tok-1"),
        Appended { id: 1, fresh: true }
    );
    let entries = a.read_after("r", 0, 10).unwrap();
    assert_eq!(entries.iter().map(|e| e.id).collect::<Vec<_>>(), [1, 2]);
    let ttl: i64 = redis::cmd("TTL")
        .arg(Keys::default().token("r", "tok-1"))
        .query(&mut redis.connection())
        .unwrap();
    assert!(
        ttl > 3000 && ttl <= 3600,
        "the token's record expires: {ttl}"
    );
}

#[test]
fn ids_go_on_from_the_stream_when_seq_is_lost() {
    let Some(redis) = RedisServer::start(&[]) else {
        return;
    };
    let mut bus = bus(&redis);
    for i in 1..=3 {
        say(&mut bus, "r", &format!("m{i}"), &format!("t{i}"));
    }
    let _: () = redis::cmd("DEL")
        .arg(Keys::default().seq("r"))
        .query(&mut redis.connection())
        .unwrap();
    assert_eq!(
        say(&mut bus, "r", "m4", "t4"),
        Appended { id: 4, fresh: true }
    );
    assert_eq!(
        say(&mut bus, "r", "m5", "t5"),
        Appended { id: 5, fresh: true }
    );
    let entries = bus.read_after("r", 0, 10).unwrap();
    assert_eq!(
        entries.iter().map(|e| e.id).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(entries[3].frame, expected_frame("r", 4, "m4", "t4"));
    assert_eq!(bus.room_state("r").unwrap().last_id, 5);
}

#[test]
fn the_epoch_is_set_once_for_every_process() {
    let Some(redis) = RedisServer::start(&[]) else {
        return;
    };
    let mut one = bus(&redis);
    let mut two = bus(&redis);
    assert_eq!(
        two.room_state("r").unwrap(),
        RoomState {
            epoch: None,
            last_id: 0
        }
    );
    assert_eq!(one.set_epoch_once("r", "e-one").unwrap(), "e-one");
    assert_eq!(two.set_epoch_once("r", "e-two").unwrap(), "e-one");
    assert_eq!(two.set_epoch_once("other", "e-two").unwrap(), "e-two");
    say(&mut one, "r", "x", "t");
    assert_eq!(
        two.room_state("r").unwrap(),
        RoomState {
            epoch: Some("e-one".into()),
            last_id: 1
        }
    );
}

#[test]
fn reads_after_and_before_an_id() {
    let Some(redis) = RedisServer::start(&[]) else {
        return;
    };
    let mut bus = bus(&redis);
    for i in 1..=10 {
        say(&mut bus, "r", &format!("m{i}"), &format!("t{i}"));
    }
    let ids = |entries: Vec<Entry>| entries.iter().map(|e| e.id).collect::<Vec<_>>();
    assert_eq!(ids(bus.read_after("r", 3, 4).unwrap()), [4, 5, 6, 7]);
    assert_eq!(ids(bus.read_after("r", 9, 100).unwrap()), [10]);
    assert!(bus.read_after("r", 10, 100).unwrap().is_empty());
    assert!(bus.read_after("r", u64::MAX, 100).unwrap().is_empty());
    assert!(bus.read_after("nobody-here", 0, 100).unwrap().is_empty());
    assert_eq!(ids(bus.read_before("r", 5, 2).unwrap()), [3, 4]);
    assert_eq!(ids(bus.read_before("r", 3, 100).unwrap()), [1, 2]);
    assert!(bus.read_before("r", 1, 100).unwrap().is_empty());
    let first = &bus.read_after("r", 0, 1).unwrap()[0];
    assert_eq!(first.frame, expected_frame("r", 1, "m1", "t1"));
    assert_eq!(first.room, "r");

    // MAXLEN ~ trims whole nodes of the stream: about `retain` entries stay, newest last.
    for i in 0..1000 {
        let frame = scripts::split_message("trim", "a", "x", 0, None);
        bus.append("trim", &frame, &format!("t{i}"), 50).unwrap();
    }
    let len: usize = redis::cmd("XLEN")
        .arg(Keys::default().log("trim"))
        .query(&mut redis.connection())
        .unwrap();
    assert!((50..=250).contains(&len), "{len} entries kept");
    let kept = bus.read_after("trim", 0, 1000).unwrap();
    assert_eq!(kept.last().unwrap().id, 1000);
    assert_eq!(kept.first().unwrap().id, 1000 - len as u64 + 1);
}

/// One wake of the follower thread: what it read, and how long it had blocked.
type Wake = (Followed, Duration);

/// A follower thread as the bus thread will run it: it takes rooms to follow from a channel,
/// blocks in XREAD for up to a minute, and reports each wake with how long it took. It ends
/// at the first wake after `woken` is dropped.
fn spawn_follower(
    mut follower: Follower,
) -> (
    mpsc::Sender<(String, u64)>,
    mpsc::Receiver<Wake>,
    thread::JoinHandle<()>,
) {
    let (follow_tx, follow_rx) = mpsc::channel::<(String, u64)>();
    let (out_tx, out_rx) = mpsc::channel();
    let handle = thread::spawn(move || loop {
        while let Ok((room, after)) = follow_rx.try_recv() {
            follower.follow(&room, after);
        }
        let started = Instant::now();
        let followed = follower.wait(Duration::from_secs(60), 100).expect("xread");
        if out_tx.send((followed, started.elapsed())).is_err() {
            return;
        }
    });
    (follow_tx, out_rx, handle)
}

#[test]
fn the_follower_wakes_on_appends_and_pokes() {
    let Some(redis) = RedisServer::start(&[]) else {
        return;
    };
    let mut bus = bus(&redis);
    say(&mut bus, "r1", "before", "t0");
    let mut follower =
        Follower::connect(&redis.url(), Keys::default(), "proc-a", Timeouts::default()).unwrap();
    follower.follow("r1", 1);
    assert_eq!(follower.position("r1"), Some(1));
    let (follow_tx, woken, handle) = spawn_follower(follower);
    let next = || woken.recv_timeout(WAKE_LIMIT).expect("the follower woke");

    // A room nobody follows does not wake it: the followed room's message is the next thing
    // it reports (the sentinel).
    say(&mut bus, "other", "not followed", "t1");
    say(&mut bus, "r1", "hello", "t2");
    let (followed, took) = next();
    assert!(took < WAKE_LIMIT);
    assert!(!followed.poked);
    assert_eq!(followed.entries.len(), 1);
    assert_eq!(followed.entries[0].room, "r1");
    assert_eq!(followed.entries[0].id, 2);
    assert_eq!(
        followed.entries[0].frame,
        expected_frame("r1", 2, "hello", "t2")
    );

    // A new room to follow: the poke wakes the blocked read at once...
    follow_tx.send(("r2".into(), 0)).unwrap();
    bus.poke("proc-a").unwrap();
    let (followed, _) = next();
    assert!(followed.poked && followed.entries.is_empty());
    // ...and the next read covers the new room.
    say(&mut bus, "r2", "in r2", "t3");
    let (followed, _) = next();
    assert_eq!(
        followed
            .entries
            .iter()
            .map(|e| (&*e.room, e.id))
            .collect::<Vec<_>>(),
        [("r2", 1)]
    );

    // Several messages at once come in id order, each once.
    for i in 0..5 {
        say(&mut bus, "r1", &format!("burst {i}"), &format!("b{i}"));
    }
    let mut got = Vec::new();
    while got.len() < 5 {
        got.extend(next().0.entries.into_iter().map(|e| e.id));
    }
    assert_eq!(got, [3, 4, 5, 6, 7]);

    // Another process's pokes do not wake this one: the sentinel again.
    bus.poke("proc-b").unwrap();
    say(&mut bus, "r2", "sentinel", "t4");
    let (followed, _) = next();
    assert!(!followed.poked);
    assert_eq!(followed.entries[0].id, 2);

    drop(woken);
    // Wake it once more so it sees the closed channel and ends.
    bus.poke("proc-a").unwrap();
    handle.join().unwrap();
}

#[test]
fn room_names_are_data_in_keys() {
    let Some(redis) = RedisServer::start(&[]) else {
        return;
    };
    let mut bus = bus(&redis);
    let rooms = ["a", "{a}", "a}", "*", "a*", "?", "[a]", "a}:tok:x", "é"];
    for (i, room) in rooms.iter().enumerate() {
        say(&mut bus, room, &format!("in {room}"), &format!("t{i}"));
        say(&mut bus, room, "second", &format!("u{i}"));
    }
    for (i, room) in rooms.iter().enumerate() {
        let entries = bus.read_after(room, 0, 100).unwrap();
        assert_eq!(entries.len(), 2, "{room}");
        assert_eq!(
            entries[0].frame,
            expected_frame(room, 1, &format!("in {room}"), &format!("t{i}"))
        );
        assert_eq!(bus.room_state(room).unwrap().last_id, 2);
    }
    // Every room has its own three keys (log, seq, and a token record per say), nothing more.
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query(&mut redis.connection())
        .unwrap();
    assert_eq!(keys.len(), rooms.len() * 4, "{keys:?}");
    for key in &keys {
        assert_eq!(key.matches('{').count(), 1, "{key}");
        assert_eq!(key.matches('}').count(), 1, "{key}");
    }
}

#[test]
fn a_prefix_keeps_deployments_apart() {
    let Some(redis) = RedisServer::start(&[]) else {
        return;
    };
    let mut one = bus(&redis);
    let mut two = Bus::connect(
        &redis.url(),
        Keys::new("staging").unwrap(),
        Timeouts::default(),
    )
    .unwrap();
    say(&mut one, "r", "one", "t");
    assert_eq!(
        say(&mut two, "r", "two", "t"),
        Appended { id: 1, fresh: true }
    );
    assert_eq!(two.read_after("r", 0, 10).unwrap().len(), 1);
}

#[test]
fn connecting_fails_with_a_clear_line() {
    // A bad URL needs no server.
    for url in [
        "localhost:6379",
        "http://127.0.0.1:1",
        "redis://127.0.0.1:notaport",
    ] {
        let error = Bus::connect(url, Keys::default(), Timeouts::default())
            .err()
            .expect(url);
        assert_eq!(error.kind, BusErrorKind::BadUrl, "{url}: {error}");
        assert!(error.to_string().starts_with("bad Redis URL"), "{error}");
    }

    // Nothing listening.
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let error = Bus::connect(&url, Keys::default(), Timeouts::default())
        .err()
        .unwrap();
    assert_eq!(error.kind, BusErrorKind::Unreachable);
    assert_eq!(
        error.to_string(),
        format!("cannot reach Redis at 127.0.0.1:{port}: connection refused")
    );

    // Something that accepts and never answers: the deadline ends the wait.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("redis://{}", silent.local_addr().unwrap());
    let quick = Timeouts {
        connect: Duration::from_millis(300),
        read: Duration::from_millis(300),
        write: Duration::from_millis(300),
    };
    let started = Instant::now();
    let error = Bus::connect(&url, Keys::default(), quick).err().unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(error.kind, BusErrorKind::Unreachable, "{error}");
    assert!(error.to_string().ends_with("no answer in time"), "{error}");
    drop(silent);

    // A password refused, or missing, or right.
    let Some(redis) = RedisServer::start(&["--requirepass", "s3cret-pw"]) else {
        return;
    };
    let at = format!("127.0.0.1:{}", redis.port());
    let error = Bus::connect(
        &format!("redis://:hunter2@{at}"),
        Keys::default(),
        Timeouts::default(),
    )
    .err()
    .unwrap();
    assert_eq!(error.kind, BusErrorKind::Auth, "{error}");
    assert!(error
        .to_string()
        .starts_with(&format!("Redis at {at} refused the login")));
    assert!(!error.to_string().contains("hunter2"), "{error}");
    let error = Bus::connect(
        &format!("redis://{at}"),
        Keys::default(),
        Timeouts::default(),
    )
    .err()
    .unwrap();
    assert_eq!(error.kind, BusErrorKind::Auth, "{error}");
    assert!(error.to_string().contains("needs a password"), "{error}");
    let mut bus = Bus::connect(
        &format!("redis://:s3cret-pw@{at}/2"),
        Keys::default(),
        Timeouts::default(),
    )
    .expect("the right password");
    say(&mut bus, "r", "hi", "t");
    let error = Follower::connect(
        &format!("redis://default:nope@{at}"),
        Keys::default(),
        "p",
        Timeouts::default(),
    )
    .err()
    .unwrap();
    assert_eq!(error.kind, BusErrorKind::Auth, "{error}");
}

/// Appends per second on one connection, one at a time (each waits for its answer): the
/// round trip the bus thread pays per say. Printed for the record, checked only loosely.
#[test]
fn appends_per_second_on_one_connection() {
    let Some(redis) = RedisServer::start(&[]) else {
        return;
    };
    let mut bus = bus(&redis);
    let frame = scripts::split_message("bench", "alice", &"x".repeat(100), 0, None);
    const N: usize = 2000;
    let started = Instant::now();
    for i in 0..N {
        bus.append("bench", &frame, &format!("t{i}"), RETAIN)
            .unwrap();
    }
    let took = started.elapsed();
    eprintln!(
        "redis bus: {N} appends on one connection in {took:?}: {:.0}/s, {:.0} µs each",
        N as f64 / took.as_secs_f64(),
        took.as_micros() as f64 / N as f64
    );
    assert_eq!(bus.room_state("bench").unwrap().last_id, N as u64);
}

/// The ambiguous case: an append times out while Redis is busy, but Redis still runs it. The
/// retry with the same token (on a new connection: the bus dropped the broken one) gets the
/// same id, and the room holds the say once.
#[test]
fn an_append_that_timed_out_is_retried_with_its_token() {
    let Some(redis) = RedisServer::start(&["--enable-debug-command", "yes"]) else {
        return;
    };
    let quick = Timeouts {
        read: Duration::from_millis(300),
        ..Timeouts::default()
    };
    let mut bus = Bus::connect(&redis.url(), Keys::default(), quick).unwrap();
    // Keep Redis busy for 1.5 s, then send the append behind it. The busy connection is
    // known to Redis first (it answered a PING), and DEBUG SLEEP is written on it before the
    // append is sent; should Redis still run the append first (it then succeeds), try again
    // in another room.
    let mut attempts = 0;
    let (room, frame, error) = loop {
        attempts += 1;
        assert!(
            attempts <= 5,
            "Redis never ran DEBUG SLEEP before the append"
        );
        let mut busy = TcpStream::connect(("127.0.0.1", redis.port())).unwrap();
        busy.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        busy.write_all(b"PING\r\n").unwrap();
        let mut pong = [0u8; 7];
        busy.read_exact(&mut pong).unwrap();
        busy.write_all(b"DEBUG SLEEP 1.5\r\n").unwrap();
        let room = format!("r{attempts}");
        let frame = scripts::split_message(&room, "alice", "once", 5, Some("c1"));
        if let Err(error) = bus.append(&room, &frame, "say-1", RETAIN) {
            break (room, frame, error);
        }
    };
    assert_eq!(error.kind, BusErrorKind::Lost, "{error}");
    assert!(error.may_have_applied());
    // The retry, on a connection with the usual deadlines, waits for the sleep to end.
    let mut retry = Bus::connect(&redis.url(), Keys::default(), Timeouts::default()).unwrap();
    let appended = retry.append(&room, &frame, "say-1", RETAIN).unwrap();
    assert_eq!(appended.id, 1);
    // The bus loads its scripts when it connects, so the append that timed out was a whole
    // EVALSHA: Redis ran it when the sleep ended, before it read the retry's connection.
    assert!(!appended.fresh, "the append that timed out was applied");
    // The first bus reconnects by itself; its next say is id 2, and the room has each once.
    let next = scripts::split_message(&room, "alice", "next", 6, None);
    assert_eq!(
        bus.append(&room, &next, "say-2", RETAIN),
        Ok(Appended { id: 2, fresh: true })
    );
    let entries = retry.read_after(&room, 0, 10).unwrap();
    assert_eq!(entries.iter().map(|e| e.id).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(
        entries[0].frame,
        protocol::encode_message(1, &room, "alice", "once", 5, Some("c1")).as_str()
    );
}

/// Redis restarted under a bus and a follower: commands fail while it is down, and both
/// reconnect by themselves once it is back (this Redis keeps nothing, so ids start again).
#[test]
fn the_bus_and_the_follower_reconnect_after_a_restart() {
    let Some(mut redis) = RedisServer::start(&[]) else {
        return;
    };
    let mut bus = bus(&redis);
    let mut follower =
        Follower::connect(&redis.url(), Keys::default(), "p", Timeouts::default()).unwrap();
    follower.follow("r", 0);
    say(&mut bus, "r", "before", "t1");
    assert_eq!(
        follower
            .wait(Duration::from_secs(5), 10)
            .unwrap()
            .entries
            .len(),
        1
    );

    redis.stop();
    let frame = scripts::split_message("r", "alice", "down", 0, None);
    let error = bus.append("r", &frame, "t2", RETAIN).unwrap_err();
    assert!(
        matches!(error.kind, BusErrorKind::Lost | BusErrorKind::Unreachable),
        "{error}"
    );
    let error = bus.append("r", &frame, "t2", RETAIN).unwrap_err();
    assert_eq!(error.kind, BusErrorKind::Unreachable, "{error}");
    assert!(follower.wait(Duration::from_secs(5), 10).is_err());

    redis.restart();
    follower.follow("r", 0);
    assert_eq!(
        bus.append("r", &frame, "t2", RETAIN),
        Ok(Appended { id: 1, fresh: true })
    );
    let followed = follower.wait(Duration::from_secs(5), 10).unwrap();
    assert_eq!(followed.entries.len(), 1);
    assert_eq!(followed.entries[0].frame, frame.with_id(1));
}

/// From an append on one connection to the follower's wake on another: what a message said in
/// one process costs before the other processes' hubs have it. Printed for the record.
#[test]
fn append_to_follower_latency() {
    let Some(redis) = RedisServer::start(&[]) else {
        return;
    };
    let mut bus = bus(&redis);
    let mut follower =
        Follower::connect(&redis.url(), Keys::default(), "lat", Timeouts::default()).unwrap();
    follower.follow("lat", 0);
    let (said_tx, said) = mpsc::channel::<Instant>();
    const N: u64 = 500;
    let reader = thread::spawn(move || {
        let mut took = Vec::new();
        let mut next = 1;
        while next <= N {
            let followed = follower.wait(Duration::from_secs(10), 100).unwrap();
            let now = Instant::now();
            for entry in followed.entries {
                assert_eq!(entry.id, next, "in order, each once");
                next += 1;
                took.push(now - said.recv().unwrap());
            }
        }
        took
    });
    let frame = scripts::split_message("lat", "alice", &"x".repeat(100), 0, None);
    for i in 0..N {
        // One at a time: each append waits for its answer, as the bus thread will.
        said_tx.send(Instant::now()).unwrap();
        bus.append("lat", &frame, &format!("t{i}"), RETAIN).unwrap();
    }
    let mut took = reader.join().unwrap();
    took.sort();
    let at = |q: f64| took[((took.len() - 1) as f64 * q) as usize];
    eprintln!(
        "redis bus: append to follower wake over {N} messages: p50 {:?}, p99 {:?}, max {:?}",
        at(0.5),
        at(0.99),
        at(1.0)
    );
}
