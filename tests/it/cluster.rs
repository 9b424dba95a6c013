//! Several chatroom servers sharing rooms through one Redis (`--redis`, issue 12), held to
//! PROTOCOL.md as if they were one server. Each test starts its own redis-server
//! (`redis_support`: skipped loudly when it is not installed, required in CI) and two or three
//! servers in this process, each its own process to Redis, under a key prefix of its own.
//!
//! Covered: one id order per room for every server (50 clients on three servers); presence,
//! unique names and sessions across servers; `since`/`epoch` resume and history pages on
//! another server; a server that shuts down, and a process killed (its heartbeat stops): its
//! users leave once; Redis stopped and restarted with its data (says refused as `unavailable`,
//! then no gap, `/metrics` counting the refusal) and without it (close 1012, a new epoch), or
//! from an older snapshot (a new epoch too); typing notices; room names near key names and
//! prefixes as data; start-up errors. Without `--redis` nothing touches Redis: every other
//! test module runs that way.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use chatroom::{Config, Server, ServerHandle};
use serde_json::{json, Value};
use tungstenite::Message;

use crate::redis_support::{cluster_config, clustered, free_port, RedisServer};
use crate::support::{
    self, history, history_texts, id, joined, joined_at, unique, users, wait_until, ChildGuard,
    ChildServer, TempDir, TestClient, BIN, TIMEOUT,
};

/// How long the users of a killed process may take to leave. The promise is 15 s after its
/// heartbeat stops; the survivors notice at their next sweep of expired processes, and a
/// loaded machine (the whole suite runs at once) delays both: 10 s of margin on top.
const LEAVE_LIMIT: Duration = Duration::from_secs(25);

/// One test's deployment: a redis-server, and `N` servers sharing rooms through it under one
/// fresh key prefix. Keep it in a variable for the whole test (`let [a, b] = &cluster.servers`):
/// a part left in a temporary would be dropped, a redis-server killed, at once.
struct Cluster<const N: usize> {
    /// First, so the servers are dropped (shut down) while their Redis still runs.
    servers: [ServerHandle; N],
    prefix: String,
    redis: RedisServer,
}

impl<const N: usize> Cluster<N> {
    /// A redis-server with `redis_args` after the test defaults (no persistence), and `N`
    /// servers on it; `None` when redis-server is not installed (the test then passes).
    fn start(redis_args: &[&str]) -> Option<Cluster<N>> {
        Self::start_with(redis_args, |config| config)
    }

    /// [`Cluster::start`] with a Redis whose `SAVE` writes a snapshot into `dir`, which a
    /// restart loads.
    fn snapshotting(dir: &TempDir) -> Option<Cluster<N>> {
        Self::start(&["--dir", dir.arg(), "--dbfilename", "r.rdb"])
    }

    /// The opening of the snapshot tests: `alice` says "kept", Redis saves a snapshot, and
    /// `alice` says "lost", each heard by `others`; then Redis has written every answer.
    /// Restarted now, it loads a log that ends before "lost". Returns the echo of "lost".
    fn snapshot_before_lost(
        &self,
        alice: &mut TestClient,
        others: &mut [&mut TestClient],
    ) -> Value {
        alice.say_echo("kept");
        for other in others.iter_mut() {
            other.expect_said("alice", "kept");
        }
        let _: () = redis::cmd("SAVE")
            .query(&mut self.redis.connection())
            .expect("SAVE");
        let lost = alice.say_echo("lost");
        for other in others.iter_mut() {
            other.expect_said("alice", "lost");
        }
        self.redis.answers_written();
        lost
    }

    /// [`Cluster::start`], with each server's config passed through `tweak` first.
    fn start_with(redis_args: &[&str], tweak: impl Fn(Config) -> Config) -> Option<Cluster<N>> {
        let redis = RedisServer::start(redis_args)?;
        let prefix = unique("cluster");
        let servers =
            std::array::from_fn(|_| support::start(tweak(cluster_config(&redis, &prefix))));
        Some(Cluster {
            servers,
            prefix,
            redis,
        })
    }
}

/// The usual opening across servers: `names[i]` joins `room` on `servers[i % servers.len()]`,
/// one after the other. Each welcome must list everyone so far (presence is shared), and every
/// earlier client must read the newcomer's `joined`, so that each client's next frame is
/// whatever the test does next. Returns each client with its welcome.
fn join_across<const N: usize>(
    servers: &[&ServerHandle],
    room: &str,
    names: [&str; N],
) -> [(TestClient, Value); N] {
    let mut clients: Vec<(TestClient, Value)> = Vec::with_capacity(N);
    for (i, name) in names.into_iter().enumerate() {
        let on = i % servers.len();
        let (client, welcome) = joined(servers[on], room, name);
        assert_eq!(welcome["name"], name, "{name} joined under another name");
        let mut everyone = names[..=i].to_vec();
        everyone.sort();
        assert_eq!(users(&welcome), everyone, "{name}'s welcome on server {on}");
        for (earlier, _) in &mut clients {
            assert_eq!(earlier.expect_type("joined")["name"], name);
        }
        clients.push((client, welcome));
    }
    match clients.try_into() {
        Ok(clients) => clients,
        Err(_) => unreachable!("one client per name"),
    }
}

/// A sentinel for a whole room: the first client says a fresh marker, and the marker must be
/// the very next frame of every one of them, so nothing else was on its way to any of them.
fn sync_all(clients: &mut [&mut TestClient]) {
    let (sayer, others) = clients.split_first_mut().expect("at least one client");
    let marker = sayer.sync();
    for other in others {
        assert_eq!(other.expect_type("message"), marker, "the marker came next");
    }
}

/// Connects to `room` and sends a hello that resumes after `since` in `epoch`.
/// Reads `client`'s frames up to its Close frame, which must carry `code`. Only one frame may
/// come before it: the refusal of `text` (`unavailable`, with the text to say again), for a
/// say on its way to a room that is found changed and starts over.
fn expect_close_after_refusal_of(client: &mut TestClient, text: &str, code: u16) {
    let mut refused = false;
    loop {
        match client.read() {
            Ok(Message::Close(frame)) => {
                assert_eq!(frame.map(|f| u16::from(f.code)), Some(code));
                return;
            }
            Ok(Message::Ping(_) | Message::Pong(_)) => {}
            Ok(Message::Text(frame)) if !refused => {
                let value: Value = serde_json::from_str(&frame).expect("JSON");
                assert_eq!(value["code"], "unavailable", "before the close: {value}");
                assert_eq!(value["text"], text, "the refused say's text: {value}");
                refused = true;
            }
            other => panic!("expected a Close frame with {code}, got {other:?}"),
        }
    }
}

/// A client of `room` on `server` that resumes after "lost" (from
/// [`Cluster::snapshot_before_lost`]) finds the room started over: a new epoch, and only what
/// the snapshot kept.
fn started_over_from_the_snapshot(server: &ServerHandle, room: &str, lost: &Value, epoch: &Value) {
    let (_alice, again) = rejoin(server, room, "alice", id(lost), epoch);
    assert_ne!(&again["epoch"], epoch, "a new epoch: old ids name nothing");
    assert_eq!(history_texts(&again), ["kept"], "what the snapshot kept");
}

fn rejoin(
    server: &ServerHandle,
    room: &str,
    name: &str,
    since: u64,
    epoch: &Value,
) -> (TestClient, Value) {
    let mut client = TestClient::connect(server, room);
    let welcome =
        client.hello(json!({"type": "hello", "name": name, "since": since, "epoch": epoch}));
    (client, welcome)
}

/// The next JSON frame (pings skipped), which must arrive before `deadline`: for waits longer
/// than the [`TIMEOUT`] every test socket has.
fn next_json_before(client: &mut TestClient, deadline: Instant) -> Value {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no frame before the deadline");
        client.stream().set_read_timeout(Some(left)).unwrap();
        let frame = client.read();
        client.stream().set_read_timeout(Some(TIMEOUT)).unwrap();
        match frame {
            Ok(Message::Text(text)) => return serde_json::from_str(&text).unwrap(),
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            other => panic!("expected a JSON frame before the deadline, got {other:?}"),
        }
    }
}

/// `bus.state` of the server's `/healthz` (`"up"` or `"down"`), whatever its status code.
fn bus_state(http_addr: SocketAddr) -> String {
    let response = support::get(http_addr, "/healthz");
    let body: Value = serde_json::from_slice(&response.body)
        .unwrap_or_else(|e| panic!("/healthz is not JSON ({e}): {}", response.text()));
    body["bus"]["state"]
        .as_str()
        .unwrap_or_else(|| panic!("/healthz has no bus.state: {body}"))
        .to_owned()
}

/// Waits until every server's `/healthz` says its bus is `state`.
fn wait_for_bus(servers: &[&ServerHandle], state: &str) {
    wait_until(&format!("every /healthz says bus.state {state:?}"), || {
        servers.iter().all(|s| bus_state(s.http_addr()) == state)
    });
}

#[test]
fn a_room_spread_over_three_servers_gets_every_message_everywhere_in_one_id_order() {
    const CLIENTS: usize = 50;
    const EACH: usize = 20;
    const ALL: usize = CLIENTS * EACH;
    // Room in each queue for every message of the test, so a client thread that a loaded
    // machine leaves unscheduled is never dropped as a slow consumer: this test is about order.
    let tweak = |config: Config| Config {
        outbound_capacity: ALL + CLIENTS,
        ..config
    };
    let Some(cluster) = Cluster::<3>::start_with(&[], tweak) else {
        return;
    };
    let servers: Vec<&ServerHandle> = cluster.servers.iter().collect();
    let names: [String; CLIENTS] = std::array::from_fn(|i| format!("u{i}"));
    let clients = join_across(&servers, "crowd", names.each_ref().map(String::as_str));

    // Everyone says all of theirs at once, then reads: nothing but the 1,000 messages comes.
    let seen: Vec<Vec<(u64, String, String)>> = thread::scope(|scope| {
        let readers: Vec<_> = clients
            .into_iter()
            .zip(&names)
            .map(|((mut client, _), name)| {
                scope.spawn(move || {
                    for n in 0..EACH {
                        client.say(&format!("{name} says {n}"));
                    }
                    (0..ALL)
                        .map(|_| {
                            let m = client.expect_type("message");
                            let text = |field: &str| m[field].as_str().unwrap().to_owned();
                            (id(&m), text("name"), text("text"))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        readers
            .into_iter()
            .map(|reader| reader.join().expect("a client thread"))
            .collect()
    });

    let reference = &seen[0];
    let ids: Vec<u64> = reference.iter().map(|m| m.0).collect();
    assert_eq!(ids, (1..=ALL as u64).collect::<Vec<_>>(), "ids 1..=1000");
    let said: BTreeSet<(String, String)> = names
        .iter()
        .flat_map(|name| (0..EACH).map(move |n| (name.clone(), format!("{name} says {n}"))))
        .collect();
    let got: BTreeSet<(String, String)> = reference
        .iter()
        .map(|(_, name, text)| (name.clone(), text.clone()))
        .collect();
    assert!(got == said, "every message said is there, once");
    for (i, order) in seen.iter().enumerate() {
        if let Some(at) = order.iter().zip(reference).position(|(x, y)| x != y) {
            panic!(
                "client {i} (server {}) differs at #{at}: {:?} instead of {:?}",
                i % 3,
                order[at],
                reference[at]
            );
        }
    }
}

#[test]
fn welcome_users_joined_and_left_agree_across_servers() {
    let Some(cluster) = Cluster::<3>::start(&[]) else {
        return;
    };
    let [a, b, c] = &cluster.servers;
    // The opening checks the first half: bob's welcome on B lists alice (on A) and bob, and
    // alice reads `joined` bob; carol's on C lists all three, and alice and bob read hers.
    let [(mut alice, _), (bob, _), (mut carol, _)] =
        join_across(&[a, b, c], "lobby", ["alice", "bob", "carol"]);
    bob.close();
    for client in [&mut alice, &mut carol] {
        assert_eq!(client.expect_type("left")["name"], "bob");
    }
    // One `left` each: the next frame after it is a marker said later.
    sync_all(&mut [&mut alice, &mut carol]);
    let (_dave, welcome) = joined(b, "lobby", "dave");
    assert_eq!(
        users(&welcome),
        ["alice", "carol", "dave"],
        "bob is gone on B"
    );
}

#[test]
fn names_are_unique_and_a_session_is_one_person_across_servers() {
    let Some(cluster) = Cluster::<3>::start(&[]) else {
        return;
    };
    let [a, b, c] = &cluster.servers;
    let [(mut alice, _)] = join_across(&[a], "names", ["alice"]);
    let (mut second, welcome) = joined(b, "names", "alice");
    assert_eq!(welcome["name"], "alice (2)", "alice is taken on A");
    assert_eq!(alice.expect_type("joined")["name"], "alice (2)");
    // A look-alike is made unique as on one server (rooms::names_that_look_alike_are_made_unique).
    let (mut third, welcome) = joined(c, "names", "ALICE");
    assert_eq!(welcome["name"], "ALICE (3)", "ALICE looks like alice");
    assert_eq!(users(&welcome), ["ALICE (3)", "alice", "alice (2)"]);
    for client in [&mut alice, &mut second] {
        assert_eq!(client.expect_type("joined")["name"], "ALICE (3)");
    }

    // dave's two tabs, one on A and one on B, are one person.
    let hello = json!({"type": "hello", "name": "dave", "session": unique("browser")});
    let mut tab_a = TestClient::connect(a, "names");
    assert_eq!(tab_a.hello(hello.clone())["name"], "dave");
    for client in [&mut alice, &mut second, &mut third] {
        assert_eq!(client.expect_type("joined")["name"], "dave");
    }
    let mut tab_b = TestClient::connect(b, "names");
    let welcome = tab_b.hello(hello);
    assert_eq!(welcome["name"], "dave", "one person, one name");
    assert_eq!(users(&welcome), ["ALICE (3)", "alice", "alice (2)", "dave"]);
    // No second `joined`, on any server (a marker from B, where the tab joined, comes next).
    sync_all(&mut [&mut second, &mut alice, &mut third]);

    // Closing one tab is not leaving; closing the last one is, once.
    tab_b.close();
    sync_all(&mut [&mut second, &mut alice, &mut third]);
    tab_a.close();
    for client in [&mut alice, &mut second, &mut third] {
        assert_eq!(client.expect_type("left")["name"], "dave");
    }
    sync_all(&mut [&mut alice, &mut second, &mut third]);
}

#[test]
fn since_and_epoch_resume_on_another_server_and_history_pages_span_servers() {
    let Some(cluster) = Cluster::<2>::start(&[]) else {
        return;
    };
    let [a, b] = &cluster.servers;
    let [(mut alice, welcome), (mut bob, _)] = join_across(&[a, b], "travel", ["alice", "bob"]);
    let epoch = welcome["epoch"].clone();
    let on_a: Vec<Value> = (1..=3)
        .map(|n| alice.say_echo(&format!("on A {n}")))
        .collect();
    let seen = id(&on_a[2]);
    alice.close();
    // bob reads all of it, and alice's `left`. (A leave on one server and a join on another
    // are not ordered: had bob joined only now, his welcome could still list alice.)
    for said in &on_a {
        assert_eq!(&bob.expect_type("message"), said);
    }
    assert_eq!(bob.expect_type("left")["name"], "alice");
    let on_b: Vec<Value> = (1..=3)
        .map(|n| bob.say_echo(&format!("on B {n}")))
        .collect();
    assert_eq!(id(&on_b[0]), seen + 1, "B goes on from A's ids");

    // alice comes back through B: exactly what she missed, in the epoch she knew.
    let (mut alice, welcome) = rejoin(b, "travel", "alice", seen, &epoch);
    assert_eq!(
        welcome["epoch"], epoch,
        "one epoch for the room on every server"
    );
    assert_eq!(
        history(&welcome),
        on_b,
        "the messages after {seen}, as broadcast"
    );

    // Older pages, answered by B, hold what was said on A.
    let mut page = |before: u64| {
        alice.send_json(&json!({"type": "history", "before": before, "limit": 2}));
        let page = alice.expect_type("history");
        (
            page["messages"].as_array().unwrap().clone(),
            page["more"].clone(),
        )
    };
    assert_eq!(page(id(&on_b[0])), (on_a[1..].to_vec(), json!(true)));
    assert_eq!(page(id(&on_a[1])), (on_a[..1].to_vec(), json!(false)));
}

#[test]
fn a_server_that_shuts_down_makes_its_users_leave_once() {
    let Some(cluster) = Cluster::<3>::start(&[]) else {
        return;
    };
    // The handle of A is taken out: shutting it down consumes it.
    let Cluster {
        servers: [a, b, c], ..
    } = cluster;
    let [(mut alice, _), (mut bob, _), (mut carol, _)] =
        join_across(&[&a, &b, &c], "farewell", ["alice", "bob", "carol"]);
    a.shutdown();
    alice.expect_close_code(1001);
    // Each of the other two servers hears of it; the room is told once all the same.
    for client in [&mut bob, &mut carol] {
        assert_eq!(client.expect_type("left")["name"], "alice");
    }
    sync_all(&mut [&mut bob, &mut carol]);
}

#[test]
fn a_process_whose_heartbeat_stops_makes_its_users_leave_within_15_s() {
    let Some(cluster) = Cluster::<2>::start(&[]) else {
        return;
    };
    let [b, c] = &cluster.servers;
    // The binary, so that SIGKILL ends it without a word to Redis.
    let (url, prefix) = (cluster.redis.url(), &cluster.prefix);
    let mut child =
        ChildServer::start(&["--redis", &url, "--redis-prefix", prefix, "--data", "none"]);
    let [(mut bob, _), (mut carol, _)] = join_across(&[b, c], "vanish", ["bob", "carol"]);
    let (_alice, welcome) = joined_at(child.ws, "vanish", "alice");
    assert_eq!(users(&welcome), ["alice", "bob", "carol"]);
    for client in [&mut bob, &mut carol] {
        assert_eq!(client.expect_type("joined")["name"], "alice");
    }
    // And dave, alone in a room no other server follows: he must not stay there as a ghost
    // for the next person who comes.
    let (_dave, _) = joined_at(child.ws, "lonely", "dave");

    child.kill();
    let killed = Instant::now();
    for client in [&mut bob, &mut carol] {
        let left = next_json_before(client, killed + LEAVE_LIMIT);
        assert_eq!(left["type"], "left", "{left}");
        assert_eq!(left["name"], "alice", "{left}");
    }
    eprintln!(
        "cluster: a killed process's user left after {:?}",
        killed.elapsed()
    );
    sync_all(&mut [&mut bob, &mut carol]);
    // The same sweep clears "lonely" (perhaps a moment after "vanish").
    let mut raw = redis::Client::open(url.as_str())
        .and_then(|client| client.get_connection())
        .expect("a raw connection");
    let people = format!("{prefix}:{{lonely}}:people");
    wait_until("dave is cleared from a room nobody follows", || {
        redis::cmd("EXISTS")
            .arg(&people)
            .query::<u64>(&mut raw)
            .expect("EXISTS")
            == 0
    });
    let (_erin, welcome) = joined(b, "lonely", "erin");
    assert_eq!(users(&welcome), ["erin"]);
}

#[test]
fn says_during_a_redis_outage_are_refused_and_chat_goes_on_after_it_with_no_gap() {
    let aof = TempDir::new("redis-aof");
    let persistent = ["--appendonly", "yes", "--appendfsync", "always"];
    let Some(mut cluster) = Cluster::<2>::start(&[&persistent[..], &["--dir", aof.arg()]].concat())
    else {
        return;
    };
    let [a, b] = &cluster.servers;
    let [(mut alice, _), (mut bob, _)] = join_across(&[a, b], "outage", ["alice", "bob"]);
    alice.say_echo("before 1");
    bob.expect_said("alice", "before 1");
    let last = id(&bob.say_echo("before 2"));
    alice.expect_said("bob", "before 2");
    cluster.redis.answers_written();

    cluster.redis.stop();
    wait_for_bus(&[a], "down");
    alice.say("while down");
    let refused = alice.expect_error("unavailable");
    assert_eq!(
        refused["text"], "while down",
        "the refusal carries its text"
    );
    let metrics = support::get(a.http_addr(), "/metrics").text();
    for line in ["chatroom_bus_up 0", "chatroom_says_unavailable_total 1"] {
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }

    cluster.redis.restart();
    wait_for_bus(&[a, b], "up");
    // The same connections go on, the ids too; bob's next frame proves the refused say never
    // landed, and each side's next frame that nothing came twice.
    let after = alice.say_echo("after 1");
    assert_eq!(id(&after), last + 1);
    assert_eq!(bob.expect_said("alice", "after 1"), after);
    let after = bob.say_echo("after 2");
    assert_eq!(id(&after), last + 2);
    assert_eq!(alice.expect_said("bob", "after 2"), after);
}

#[test]
fn a_redis_that_lost_its_data_closes_the_room_with_1012_and_a_new_epoch() {
    let Some(mut cluster) = Cluster::<2>::start(&[]) else {
        return;
    };
    let [a, b] = &cluster.servers;
    let [(mut alice, welcome), (mut bob, _)] = join_across(&[a, b], "amnesia", ["alice", "bob"]);
    let epoch = welcome["epoch"].clone();
    let said = alice.say_echo("before");
    bob.expect_said("alice", "before");
    cluster.redis.answers_written();

    cluster.redis.restart(); // without persistence: everything is gone
    wait_for_bus(&[a, b], "up");
    alice.expect_close_code(1012);
    bob.expect_close_code(1012);

    // The ids the clients know now name nothing: a new epoch, so they start over.
    let (mut alice, welcome) = rejoin(a, "amnesia", "alice", id(&said), &epoch);
    assert_ne!(
        welcome["epoch"], epoch,
        "a new epoch after the data was lost"
    );
    let (mut bob, again) = rejoin(b, "amnesia", "bob", id(&said), &epoch);
    assert_eq!(
        again["epoch"], welcome["epoch"],
        "one new epoch on every server"
    );
    assert_eq!(users(&again), ["alice", "bob"]);
    assert_eq!(alice.expect_type("joined")["name"], "bob");
    let after = alice.say_echo("after");
    assert_eq!(bob.expect_said("alice", "after"), after);
}

#[test]
fn room_names_near_key_names_stay_data_and_prefixes_keep_deployments_apart() {
    let Some(cluster) = Cluster::<2>::start(&[]) else {
        return;
    };
    let [a, b] = &cluster.servers;
    // Room names cannot hold `{`, `*` or `:`; these are the valid ones closest to the key
    // layout (`P:{room}:log`, `:seq`, `:epoch`, `:tok:…`, `:people`, `:presence`, `P:ctl:…`,
    // `P:alive:…`) and to each other.
    const ROOMS: [&str; 13] = [
        "room2",
        "room2-log",
        "log",
        "seq",
        "epoch",
        "tok",
        "ctl",
        "people",
        "presence",
        "alive",
        "x",
        "x_",
        "x-",
    ];
    for room in ROOMS {
        let (mut alice, _) = joined(a, room, "alice");
        alice.say_echo(&format!("in {room}"));
    }
    for room in ROOMS {
        let (_bob, welcome) = joined(b, room, "bob");
        assert_eq!(history_texts(&welcome), [format!("in {room}")], "{room}");
    }
    // Another deployment on the same Redis has a room2 of its own.
    let other_prefix = unique("other");
    let other = clustered(&cluster.redis, &other_prefix);
    let (mut eve, welcome) = joined(&other, "room2", "eve");
    assert_eq!(users(&welcome), ["eve"]);
    assert!(history(&welcome).is_empty(), "{welcome}");
    assert_eq!(id(&eve.say_echo("elsewhere")), 1);

    // Every key belongs to one of the two prefixes, and a room's keys carry it as their tag.
    let mut raw = cluster.redis.connection();
    let mut keys = |pattern: String| -> BTreeSet<String> {
        redis::cmd("KEYS").arg(pattern).query(&mut raw).unwrap()
    };
    let prefix = &cluster.prefix;
    let ours = keys(format!("{prefix}:*"));
    let theirs = keys(format!("{other_prefix}:*"));
    assert!(!theirs.is_empty(), "the other deployment wrote nothing");
    let all = keys("*".to_owned());
    assert_eq!(all, &ours | &theirs, "keys outside both prefixes");
    for room in ROOMS {
        let tagged = format!("{prefix}:{{{room}}}:");
        assert!(ours.iter().any(|k| k.starts_with(&tagged)), "no {tagged}…");
    }
    for key in &all {
        if let Some((_, rest)) = key.split_once('{') {
            let tag = rest.split_once('}').map(|(tag, _)| tag);
            assert!(tag.is_some_and(|t| ROOMS.contains(&t)), "{key}");
        }
    }
}

/// Runs the binary with `args` (ephemeral ports, no history on disk); it must exit with
/// `code` within [`TIMEOUT`] without a listening line. Returns its stderr.
fn refused_start(args: &[&str], code: i32) -> String {
    let mut command = Command::new(BIN);
    command
        .args(["--addr", "127.0.0.1:0", "--ws-addr", "127.0.0.1:0"])
        .args(["--data", "none"])
        .args(args);
    let (status, stdout, stderr) = ChildGuard::spawn(command).wait_exit(TIMEOUT);
    assert_eq!(
        status.code(),
        Some(code),
        "{args:?}: {status}; stderr:\n{stderr}"
    );
    assert!(stdout.is_empty(), "{args:?}: stdout {stdout:?}");
    stderr
}

/// The one line a start-up error writes: `chatroom: cannot start: …`.
fn one_line(stderr: &str) -> &str {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line on stderr, got:\n{stderr}");
    assert!(lines[0].starts_with("chatroom: cannot start:"), "{stderr}");
    lines[0]
}

#[test]
fn start_up_fails_clearly_without_a_usable_redis() {
    // Nothing listening: Server::start and the binary both name the address.
    let dead = format!("127.0.0.1:{}", free_port());
    let url = format!("redis://{dead}");
    match Server::start(Config {
        redis: Some(url.clone()),
        ..support::config()
    }) {
        Ok(server) => {
            server.shutdown();
            panic!("a server started without its Redis");
        }
        Err(error) => assert!(error.to_string().contains(&dead), "{error}"),
    }
    let stderr = refused_start(&["--redis", &url], 1);
    let line = one_line(&stderr);
    assert!(line.contains("Redis") && line.contains(&dead), "{line}");

    // Not a Redis URL: a usage error, refused before anything starts.
    let stderr = refused_start(&["--redis", "http://x"], 2);
    assert!(stderr.starts_with("chatroom: bad Redis URL"), "{stderr}");

    // A Redis that wants a password, and a URL without one.
    let Some(redis) = RedisServer::start(&["--requirepass", "secret"]) else {
        return;
    };
    let stderr = refused_start(&["--redis", &redis.url()], 1);
    let line = one_line(&stderr);
    let lower = line.to_lowercase();
    assert!(
        line.contains("Redis") && (lower.contains("password") || lower.contains("auth")),
        "{line}"
    );
}

#[test]
fn typing_reaches_the_room_on_every_server_but_not_the_typist() {
    let Some(cluster) = Cluster::<2>::start(&[]) else {
        return;
    };
    let [a, b] = &cluster.servers;
    let [(mut alice, _), (mut bob, _), (mut carol, _)] =
        join_across(&[a, b], "typing", ["alice", "bob", "carol"]);
    alice.typing();
    assert_eq!(bob.expect_type("typing")["name"], "alice");
    assert_eq!(carol.expect_type("typing")["name"], "alice");
    // alice's next frame is her marker: her own notice never came back to her.
    sync_all(&mut [&mut alice, &mut bob, &mut carol]);
}

#[test]
fn a_redis_restored_from_an_older_snapshot_gives_the_room_a_new_epoch() {
    // An RDB snapshot taken after "kept" and before "lost": Redis killed and started again
    // from it has the room's log end at "kept", while the servers have read "lost". Its next
    // id would name a second message: the room must start over under a new epoch instead.
    let dir = TempDir::new("redis-rdb");
    let Some(mut cluster) = Cluster::<2>::snapshotting(&dir) else {
        return;
    };
    let [a, b] = &cluster.servers;
    let [(mut alice, welcome), (mut bob, _)] = join_across(&[a, b], "snapshot", ["alice", "bob"]);
    let epoch = welcome["epoch"].clone();
    let lost = cluster.snapshot_before_lost(&mut alice, &mut [&mut bob]);

    cluster.redis.restart(); // SIGKILL, then a start that loads r.rdb
    alice.expect_close_code(1012);
    bob.expect_close_code(1012);
    started_over_from_the_snapshot(a, "snapshot", &lost, &epoch);
}

#[test]
fn a_say_that_meets_a_redis_gone_back_in_time_is_handed_back_not_given_a_used_id() {
    // Redis comes back from a snapshot taken before "lost", and alice says "after" at once,
    // before the server's next heartbeat. Appended before the room is checked, "after" would
    // take id 2, which everyone already read as "lost", and make the log look whole to the
    // check: no one would ever see "after", and the room would go on with ids that name two
    // messages. The room must be checked first: "after" comes back to alice (or, when a
    // heartbeat checked the room before it came, is dropped with her connection) and the room
    // starts over.
    let dir = TempDir::new("redis-say-first");
    let Some(mut cluster) = Cluster::<1>::snapshotting(&dir) else {
        return;
    };
    let [a] = &cluster.servers;
    let [(mut alice, welcome), (mut bob, _)] = join_across(&[a], "first", ["alice", "bob"]);
    let epoch = welcome["epoch"].clone();
    let lost = cluster.snapshot_before_lost(&mut alice, &mut [&mut bob]);

    cluster.redis.restart();
    alice.say("after");
    expect_close_after_refusal_of(&mut alice, "after", 1012);
    bob.expect_close_code(1012);
    started_over_from_the_snapshot(a, "first", &lost, &epoch);
}

#[test]
fn a_check_after_an_outage_that_cannot_read_a_room_is_tried_again() {
    // As above, Redis comes back from an older snapshot; but the first time the server
    // checks the room, its log cannot be read (a key of the wrong type stands in for it). The
    // check must not count the room as checked, nor let a say into the room meanwhile: once
    // the log is back, it finds the room went back in time and starts it over. (Before, one
    // failed read ended the check for good.)
    let dir = TempDir::new("redis-recheck");
    let Some(mut cluster) = Cluster::<1>::snapshotting(&dir) else {
        return;
    };
    let [a] = &cluster.servers;
    let [(mut alice, _)] = join_across(&[a], "recheck", ["alice"]);
    cluster.snapshot_before_lost(&mut alice, &mut []);

    // Back with a password the server does not know, so that it cannot look before the log
    // is set aside; then without.
    cluster.redis.restart_with(&["--requirepass", "recheck"]);
    let url = format!("redis://:recheck@127.0.0.1:{}", cluster.redis.port());
    let mut raw = redis::Client::open(url)
        .and_then(|c| c.get_connection())
        .expect("a raw connection with the password");
    let log = format!("{}:{{recheck}}:log", cluster.prefix);
    let aside = format!("{log}-aside");
    let _: () = redis::pipe()
        .cmd("RENAME")
        .arg(&log)
        .arg(&aside)
        .ignore()
        .cmd("SET")
        .arg(&log)
        .arg("not a stream")
        .ignore()
        .cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("")
        .ignore()
        .query(&mut raw)
        .expect("the log set aside");
    // The server's check has met the wrong type: Redis counts the failed read.
    let failed_reads = |raw: &mut redis::Connection| {
        let stats: String = redis::cmd("INFO").arg("commandstats").query(raw).unwrap();
        let line = stats.lines().find(|l| l.starts_with("cmdstat_xrevrange:"));
        let failed = line.and_then(|l| l.split("failed_calls=").nth(1));
        failed
            .and_then(|n| n.split(',').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while failed_reads(&mut raw) == 0 {
        assert!(
            Instant::now() < deadline,
            "the server never checked the room"
        );
        thread::sleep(Duration::from_millis(20));
    }
    let _: () = redis::pipe()
        .cmd("DEL")
        .arg(&log)
        .ignore()
        .cmd("RENAME")
        .arg(&aside)
        .arg(&log)
        .ignore()
        .query(&mut raw)
        .expect("the log put back");
    // Until the next check reads the room, nothing is appended to it: "during" would take
    // id 2, which alice read as "lost", and hide from the check that the log went back.
    alice.say("during");
    expect_close_after_refusal_of(&mut alice, "during", 1012);
}

#[test]
fn a_say_sent_again_on_another_server_with_its_cid_is_answered_with_the_original() {
    let Some(cluster) = Cluster::<2>::start(&[]) else {
        return;
    };
    let [a, b] = &cluster.servers;
    let hello = |name: &str| json!({"type": "hello", "name": name, "session": format!("s-{name}")});
    let mut alice = TestClient::connect(a, "once");
    alice.hello(hello("alice"));
    let mut bob = TestClient::connect(b, "once");
    bob.hello(hello("bob"));
    alice.expect_type("joined");
    let say = json!({"type": "say", "text": "typed before the cut", "cid": "c-1"});
    alice.send_json(&say);
    let original = alice.expect_type("message");
    assert_eq!(bob.expect_type("message"), original);

    // The page moves to the other server (same session) and sends it again: the token in
    // Redis knows it, so it is not a second message.
    drop(alice);
    let mut again = TestClient::connect(b, "once");
    again.hello(hello("alice"));
    again.send_json(&say);
    assert_eq!(again.expect_type("message"), original, "the original");
    let after = again.say_echo("next");
    let seen = bob.skip_until(|f| f["type"] == "message");
    assert_eq!(seen, after, "bob saw the resend as a second message");
}

#[test]
fn a_resume_after_memory_dropped_messages_reads_them_from_redis() {
    // The memory budget trims a shared room as it trims any other; a client that resumes with
    // `since` still gets every message it missed (within --history), read from the stream.
    let Some(cluster) = Cluster::<2>::start_with(&[], |config| Config {
        memory_budget: 256 << 10,
        ..config
    }) else {
        return;
    };
    let [a, b] = &cluster.servers;
    let [(mut alice, welcome), (mut bob, _)] = join_across(&[a, b], "busy", ["alice", "bob"]);
    let epoch = welcome["epoch"].clone();
    let seen = id(&alice.say_echo("seen"));
    bob.expect_said("alice", "seen");
    drop(alice);
    assert_eq!(bob.expect_type("left")["name"], "alice");
    // 40 messages of 16 KB (3,990 four-byte characters each): 640 KB, more than the 256 KiB
    // budget on each server.
    let sent: Vec<u64> = (0..40)
        .map(|n| id(&bob.say_echo(&format!("{n:02} {}", "\u{1F600}".repeat(3_990)))))
        .collect();
    let (_again, welcome) = rejoin(a, "busy", "alice", seen, &epoch);
    let replayed: Vec<u64> = history(&welcome).iter().map(id).collect();
    assert_eq!(replayed, sent, "everything after since, once, in order");
}
