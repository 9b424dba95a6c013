//! History on disk (`--data DIR`, SQLite in `DIR/chatroom.db`): what survives a clean restart,
//! a SIGKILL, a locked database and a backup; retention; refusals at start-up; the store's part
//! of `/healthz`; room names as plain data; many rooms loaded at once.
//!
//! Every test has its own data directory ([`TempDir`]), removed at its end. Servers run in this
//! process where that is enough, and as the real binary ([`ChildServer`]) where a signal, a
//! kill, an exit code or a subcommand is the point. Waits are on frames or on `/healthz`.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chatroom::{Config, Server};
use serde_json::{json, Value};
use tungstenite::Message;

use crate::support::{
    count, db_path, disk_config, health, history, history_texts, id, joined, joined_at,
    running_as_root, start, store_health, wait_until, wait_until_written, ChildGuard, ChildServer,
    TempDir, TestClient, BIN, TIMEOUT,
};

/// The texts of a list of message frames.
fn texts(messages: &[Value]) -> Vec<&str> {
    messages
        .iter()
        .map(|m| m["text"].as_str().expect("message text"))
        .collect()
}

/// The welcome's epoch as a string.
fn epoch(welcome: &Value) -> String {
    welcome["epoch"]
        .as_str()
        .unwrap_or_else(|| panic!("welcome without an epoch: {welcome}"))
        .to_owned()
}

fn assert_strictly_increasing(messages: &[Value], what: &str) {
    let ids: Vec<u64> = messages.iter().map(id).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "{what}: ids not strictly increasing: {ids:?}"
    );
}

/// A `hello` that resumes after `since` in `epoch`.
fn resume(name: &str, since: u64, epoch: &str) -> Value {
    json!({"type": "hello", "name": name, "since": since, "epoch": epoch})
}

#[test]
fn a_clean_restart_keeps_history_ids_and_epoch() {
    // Promise: after a clean shutdown, a server started on the same directory has the same
    // rooms: same epoch, the whole history, ids going on from the last one, and a client that
    // resumes with `since` + `epoch` gets exactly what it missed, no gap and no duplicate.
    let dir = TempDir::new("restart");
    let first = start(disk_config(dir.path()));
    // bob keeps the room in use while alice is away.
    let (mut bob, _) = joined(&first, "room1", "bob");
    let (mut alice, welcome) = joined(&first, "room1", "alice");
    let epoch = epoch(&welcome);
    bob.expect_type("joined");
    let mut all = Vec::new();
    for i in 0..3 {
        all.push(alice.say_echo(&format!("a{i}")));
    }
    let alice_saw = id(all.last().unwrap());
    alice.close();
    bob.skip_until(|v| v["type"] == "left" && v["name"] == "alice");
    let mut missed = Vec::new();
    for i in 0..4 {
        missed.push(bob.say_echo(&format!("b{i}")));
    }
    all.extend(missed.iter().cloned());
    drop(bob);
    // The last messages are younger than a commit interval: shutdown must write them.
    first.shutdown();

    let second = start(disk_config(dir.path()));
    let mut alice = TestClient::connect(&second, "room1");
    let w = alice.hello(resume("alice", alice_saw, &epoch));
    assert_eq!(w["epoch"], epoch.as_str(), "the room keeps its epoch");
    assert_eq!(
        history(&w),
        missed,
        "a resume gets exactly the missed messages, as they were sent"
    );
    let next = alice.say_echo("after the restart");
    assert_eq!(
        id(&next),
        id(missed.last().unwrap()) + 1,
        "ids go on from the last stored one"
    );
    all.push(next.clone());

    let (_carol, w) = joined(&second, "room1", "carol");
    assert_eq!(w["epoch"], epoch.as_str());
    assert_eq!(history(&w), all, "a newcomer gets the whole history");
    let mut dave = TestClient::connect(&second, "room1");
    let w = dave.hello(resume("dave", id(&next), &epoch));
    assert!(history(&w).is_empty(), "nothing was missed: {w}");
}

#[test]
fn a_restarted_room_is_filled_with_its_newest_messages() {
    // Promise: `history` is what a room holds in memory and replays; after a restart a room is
    // filled from disk with its newest `history` messages, and ids go on after the last one.
    let dir = TempDir::new("reload");
    let first = start(Config {
        history: 100,
        ..disk_config(dir.path())
    });
    let (mut alice, welcome) = joined(&first, "room1", "alice");
    let epoch = epoch(&welcome);
    let said: Vec<Value> = (0..8).map(|i| alice.say_echo(&format!("m{i}"))).collect();
    drop(alice);
    first.shutdown();

    let second = start(Config {
        history: 3,
        ..disk_config(dir.path())
    });
    let (mut bob, w) = joined(&second, "room1", "bob");
    assert_eq!(
        history(&w),
        said[5..].to_vec(),
        "the newest 3, oldest first"
    );
    // A resume from before the loaded window gets the window: the older ones are not in memory.
    let mut carol = TestClient::connect(&second, "room1");
    let w = carol.hello(resume("carol", id(&said[1]), &epoch));
    assert_eq!(history_texts(&w), ["m5", "m6", "m7"]);
    bob.expect_type("joined");
    assert_eq!(id(&bob.say_echo("next")), id(&said[7]) + 1);
}

#[test]
fn a_signal_writes_everything_before_the_binary_exits() {
    // Promise: SIGTERM and SIGINT end the binary (exit 0) only once every message it echoed is
    // on disk, so the next start replays all of them under the same epoch.
    for signal in ["TERM", "INT"] {
        let dir = TempDir::new("signal");
        let server = ChildServer::start(&["--data", dir.arg()]);
        let (mut alice, welcome) = joined_at(server.ws, "room1", "alice");
        // A burst without waiting, then the echoes: the last ones are at most a commit
        // interval old when the signal comes.
        let sent: Vec<String> = (0..50).map(|i| format!("{signal} {i}")).collect();
        for text in &sent {
            alice.say(text);
        }
        let echoed: Vec<Value> = sent
            .iter()
            .map(|text| alice.expect_said("alice", text))
            .collect();
        drop(alice);
        server.stop_with(signal);

        let again = ChildServer::start(&["--data", dir.arg()]);
        let (_bob, w) = joined_at(again.ws, "room1", "bob");
        assert_eq!(w["epoch"], welcome["epoch"], "SIG{signal}: same epoch");
        assert_eq!(history(&w), echoed, "SIG{signal}: every echoed message");
        again.stop_with("TERM");
    }
}

#[test]
fn the_binary_keeps_history_in_chatroom_data_unless_told_none() {
    // Promise: without `--data` the binary keeps history in ./chatroom-data/chatroom.db (the
    // directory is created); with `--data none` it keeps it in memory and writes no file.
    let cwd = TempDir::new("default-data");
    let mut command = Command::new(BIN);
    command
        .current_dir(cwd.path())
        .args(["--addr", "127.0.0.1:0", "--ws-addr", "127.0.0.1:0"]);
    let server = ChildServer::from_command(command);
    let (mut alice, _) = joined_at(server.ws, "room1", "alice");
    alice.say_echo("kept on disk");
    wait_until_written(server.http, 1);
    assert!(
        db_path(&cwd.join("chatroom-data")).is_file(),
        "no ./chatroom-data/chatroom.db"
    );
    drop(alice);
    server.stop_with("TERM");

    let cwd = TempDir::new("no-data");
    let mut command = Command::new(BIN);
    command
        .current_dir(cwd.path())
        .args(["--addr", "127.0.0.1:0", "--ws-addr", "127.0.0.1:0"])
        .args(["--data", "none"]);
    let server = ChildServer::from_command(command);
    let (mut alice, _) = joined_at(server.ws, "room1", "alice");
    alice.say_echo("kept in memory");
    let store = store_health(server.http);
    assert_eq!(store["state"], "memory", "{store}");
    drop(alice);
    server.stop_with("TERM");
    let left: Vec<PathBuf> = fs::read_dir(cwd.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "--data none wrote {left:?}");
}

/// One echo a sender got before the kill: the message's id and text, and when it arrived.
struct Echo {
    id: u64,
    text: String,
    at: Instant,
}

/// Sets the flag when dropped, also when the test panics, so sender threads stop.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Says `{name}-{n}` for n = 0, 1, …, each after the previous one's echo, recording each echo,
/// until the connection breaks (the server was killed), `stop` is set or [`TIMEOUT`] passes.
fn send_until_gone(
    client: &mut TestClient,
    name: &str,
    echoes: &Mutex<Vec<Echo>>,
    stop: &AtomicBool,
) {
    let deadline = Instant::now() + TIMEOUT;
    for n in 0.. {
        if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
            return;
        }
        let text = format!("{name}-{n}");
        let say = json!({"type": "say", "text": text}).to_string();
        if client.try_send_text(&say).is_err() {
            return;
        }
        loop {
            match client.read() {
                Ok(Message::Text(frame)) => {
                    let v: Value = serde_json::from_str(&frame).expect("server frames are JSON");
                    if v["type"] == "message" && v["text"] == text.as_str() {
                        echoes.lock().unwrap().push(Echo {
                            id: id(&v),
                            text,
                            at: Instant::now(),
                        });
                        break;
                    }
                }
                Ok(Message::Close(_)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }
}

#[test]
fn a_kill_loses_nothing_committed_and_gives_the_room_a_new_epoch() {
    // Promise: after SIGKILL, every message whose echo came more than KEPT_AFTER before the
    // kill is still there at the next start, with its id, in id order, once; the room gets a
    // new epoch (a client resuming with the old one gets the whole history rather than
    // trusting `since`), and new ids are above every stored one.
    const SENDERS: usize = 4;
    // The server promises to lose at most the last 20 ms (its commit interval); the test
    // allows ten times that, so a store thread slowed by a loaded machine does not fail it.
    const KEPT_AFTER: Duration = Duration::from_millis(200);
    let dir = TempDir::new("kill");
    // Memory and disk both hold everything sent in the second (well over 10,000 messages).
    let args = [
        "--data",
        dir.arg(),
        "--history",
        "1000000",
        "--retain",
        "1000000",
    ];
    let mut first = ChildServer::start(&args);
    let mut clients = Vec::new();
    let mut epochs = HashSet::new();
    for i in 0..SENDERS {
        let (client, welcome) = joined_at(first.ws, "crash", &format!("s{i}"));
        epochs.insert(epoch(&welcome));
        clients.push(client);
    }
    assert_eq!(epochs.len(), 1, "one room, one epoch: {epochs:?}");
    let old_epoch = epochs.into_iter().next().unwrap();

    let echoes = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let killed_at = std::thread::scope(|scope| {
        let _stop_senders = StopOnDrop(&stop);
        for (i, mut client) in clients.into_iter().enumerate() {
            let (echoes, stop) = (&echoes, &stop);
            std::thread::Builder::new()
                .name(format!("sender-{i}"))
                .spawn_scoped(scope, move || {
                    send_until_gone(&mut client, &format!("s{i}"), echoes, stop)
                })
                .expect("spawn a sender");
        }
        wait_until(
            "enough echoes are older than KEPT_AFTER, after a second",
            || {
                let old = Instant::now() - KEPT_AFTER;
                started.elapsed() >= Duration::from_secs(1)
                    && echoes.lock().unwrap().iter().filter(|e| e.at < old).count() >= SENDERS * 10
            },
        );
        let killed_at = Instant::now();
        first.kill();
        killed_at
    });
    let echoes = echoes.into_inner().unwrap();
    let cutoff = killed_at - KEPT_AFTER;
    let must_keep: Vec<&Echo> = echoes.iter().filter(|e| e.at < cutoff).collect();
    assert!(
        must_keep.len() >= SENDERS * 10,
        "too few messages before the cutoff to test anything: {}",
        must_keep.len()
    );

    let second = ChildServer::start(&args);
    let (mut fresh, welcome) = joined_at(second.ws, "crash", "fresh");
    let stored = history(&welcome);
    assert_strictly_increasing(&stored, "history after the kill");
    let stored_ids: HashMap<&str, u64> = stored
        .iter()
        .map(|m| (m["text"].as_str().expect("text"), id(m)))
        .collect();
    assert_eq!(stored_ids.len(), stored.len(), "a text stored twice");
    for m in &stored {
        let (name, text) = (m["name"].as_str().unwrap(), m["text"].as_str().unwrap());
        assert!(
            text.starts_with(&format!("{name}-")),
            "a message nobody sent: {m}"
        );
    }
    for echo in &echoes {
        let before_kill = killed_at - echo.at;
        match stored_ids.get(echo.text.as_str()) {
            Some(&stored_id) => assert_eq!(
                stored_id, echo.id,
                "{:?} was echoed with id {} but stored with id {stored_id}",
                echo.text, echo.id
            ),
            None => assert!(
                echo.at >= cutoff,
                "{:?} (id {}) was echoed {before_kill:?} before the kill but is lost \
                 ({} of {} echoes stored)",
                echo.text,
                echo.id,
                stored.len(),
                echoes.len()
            ),
        }
    }
    assert_ne!(
        epoch(&welcome),
        old_epoch,
        "the killed run's room must get a new epoch"
    );

    let max_stored = stored.iter().map(id).max().unwrap_or(0);
    let next = fresh.say_echo("after the kill");
    assert!(
        id(&next) > max_stored,
        "new id {} is not above the stored {max_stored}",
        id(&next)
    );
    // A client of the killed run resumes with its epoch and last id: it gets everything.
    let last_echoed = echoes.iter().map(|e| e.id).max().unwrap();
    let mut resumer = TestClient::try_connect(second.ws, "/ws/crash").unwrap();
    let w = resumer.hello(resume("s0", last_echoed, &old_epoch));
    let mut expected = stored.clone();
    expected.push(next);
    assert_eq!(history(&w), expected, "an old epoch gets the whole history");
}

#[test]
fn retention_keeps_the_newest_messages_of_each_room() {
    // Promise: `retain` bounds what stays on disk per room: after a clean restart a room that
    // had more holds exactly its newest `retain` messages (even with a larger `history`),
    // and a room that had fewer holds all of them.
    let dir = TempDir::new("retain");
    let cfg = Config {
        retain: 5,
        history: 100,
        ..disk_config(dir.path())
    };
    let first = start(cfg.clone());
    let (mut alice, _) = joined(&first, "busy", "alice");
    let busy: Vec<Value> = (1..=12).map(|i| alice.say_echo(&format!("m{i}"))).collect();
    let (mut bob, _) = joined(&first, "quiet", "bob");
    let quiet: Vec<Value> = (1..=3).map(|i| bob.say_echo(&format!("q{i}"))).collect();
    drop((alice, bob));
    first.shutdown();

    let second = start(cfg.clone());
    let (mut alice, w) = joined(&second, "busy", "alice");
    assert_eq!(history(&w), busy[7..].to_vec(), "exactly the newest 5");
    assert_eq!(
        history(&w).iter().map(id).collect::<Vec<_>>(),
        [8, 9, 10, 11, 12]
    );
    let (_bob, w) = joined(&second, "quiet", "bob");
    assert_eq!(history(&w), quiet, "a room under the limit keeps all");

    // Pruning goes on in the next run too.
    let more: Vec<Value> = (13..=14)
        .map(|i| alice.say_echo(&format!("m{i}")))
        .collect();
    drop(alice);
    second.shutdown();
    let third = start(cfg);
    let (_alice, w) = joined(&third, "busy", "alice");
    let mut expected = busy[9..].to_vec();
    expected.extend(more);
    assert_eq!(history(&w), expected, "still exactly the newest 5");
}

/// Neither `Server::start` nor the binary starts on `--data data`, and both name the database.
fn assert_cannot_start(data: &Path) {
    let db = db_path(data);
    let error = start_error(disk_config(data));
    assert!(
        error.contains(db.to_str().unwrap()),
        "the error does not name {}: {error}",
        db.display()
    );
    assert_binary_cannot_start(binary_with_data(Path::new(BIN), data), &db);
}

/// The error `Server::start` gives for this config; fails if the server starts.
fn start_error(config: Config) -> String {
    match Server::start(config) {
        Ok(server) => {
            server.shutdown();
            panic!("the server started")
        }
        Err(e) => e.to_string(),
    }
}

/// The binary with ephemeral ports and `--data dir`, ready to spawn.
fn binary_with_data(program: &Path, dir: &Path) -> Command {
    let mut command = Command::new(program);
    command
        .args(["--addr", "127.0.0.1:0", "--ws-addr", "127.0.0.1:0"])
        .arg("--data")
        .arg(dir);
    command
}

/// Runs a start-up that must fail: exit code 1 (within [`TIMEOUT`]), nothing on stdout (no
/// listening line), and exactly one line on stderr, `chatroom: cannot start: …` naming the
/// database.
fn assert_binary_cannot_start(command: Command, db: &Path) {
    let mut process = ChildGuard::spawn(command);
    let (status, stdout, stderr) = process.wait_exit(TIMEOUT);
    assert_eq!(status.code(), Some(1), "{status}; stderr:\n{stderr}");
    assert!(stdout.is_empty(), "stdout should be empty: {stdout:?}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line on stderr, got:\n{stderr}");
    assert!(
        lines[0].starts_with("chatroom: cannot start:"),
        "stderr: {stderr}"
    );
    let db = db.to_str().unwrap();
    assert!(lines[0].contains(db), "stderr does not name {db}: {stderr}");
}

#[test]
fn a_corrupt_database_stops_the_start_and_is_left_alone() {
    // Promise: a file that is not a database is refused at start-up (Server::start's error and
    // the binary's one stderr line name it, exit code 1), and it is not overwritten.
    let dir = TempDir::new("corrupt");
    let db = db_path(dir.path());
    let garbage = b"this is not an SQLite database\n".repeat(200);
    fs::write(&db, &garbage).unwrap();

    assert_cannot_start(dir.path());
    assert_eq!(fs::read(&db).unwrap(), garbage, "the file was changed");
}

#[test]
fn a_data_path_under_a_regular_file_stops_the_start() {
    // Promise: when the data directory cannot be created (its parent is a file), start-up
    // fails with an error naming the database path, and the binary exits 1 with one line.
    let dir = TempDir::new("parent-file");
    fs::write(dir.join("file"), "a plain file").unwrap();
    let data = dir.join("file").join("data");
    assert_cannot_start(&data);
}

/// True when every directory above `file` can be searched by others and `file` can be read
/// and run by them.
fn runnable_by_others(file: &Path) -> bool {
    let mode = |p: &Path| fs::metadata(p).map(|m| m.permissions().mode()).unwrap_or(0);
    mode(file) & 0o005 == 0o005
        && file
            .ancestors()
            .skip(1)
            .filter(|p| !p.as_os_str().is_empty())
            .all(|dir| mode(dir) & 0o001 != 0)
}

/// `setpriv` arguments that run a program as nobody (uid/gid 65534, no groups).
const AS_NOBODY: [&str; 3] = ["--reuid=65534", "--regid=65534", "--clear-groups"];

#[test]
fn a_read_only_data_directory_stops_the_start() {
    // Promise: when the database cannot be created because its directory is read-only,
    // start-up fails naming the database path, and the binary exits 1 with one stderr line.
    // Root ignores permission bits, so as root the binary runs as nobody (setpriv).
    let dir = TempDir::new("read-only");
    let data = dir.join("ro");
    fs::create_dir(&data).unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&data, fs::Permissions::from_mode(0o555)).unwrap();
    let db = db_path(&data);

    if !running_as_root() {
        assert_cannot_start(&data);
        assert!(!db.exists(), "a database appeared in a read-only directory");
        return;
    }

    // As root: nobody must be able to run the binary, or the test would prove nothing.
    let program = if runnable_by_others(Path::new(BIN)) {
        PathBuf::from(BIN)
    } else {
        let bin_dir = dir.join("bin");
        fs::create_dir(&bin_dir).unwrap();
        fs::set_permissions(&bin_dir, fs::Permissions::from_mode(0o755)).unwrap();
        let copy = bin_dir.join("chatroom");
        fs::copy(BIN, &copy).unwrap();
        fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).unwrap();
        copy
    };
    let as_nobody = |program: &Path| {
        let mut command = Command::new("setpriv");
        command.args(AS_NOBODY).arg(program);
        command
    };
    // The set-up holds: nobody runs the binary but cannot write in the directory.
    let version = as_nobody(&program).arg("--version").output().unwrap();
    assert!(
        version.status.success()
            && String::from_utf8_lossy(&version.stdout).starts_with("chatroom"),
        "nobody cannot run {}: {version:?}",
        program.display()
    );
    let probe = data.join("probe");
    let touched = as_nobody(Path::new("touch")).arg(&probe).output().unwrap();
    assert!(
        !touched.status.success() && !probe.exists(),
        "nobody can write in the read-only directory: {touched:?}"
    );

    let mut command = as_nobody(&program);
    command
        .args(["--addr", "127.0.0.1:0", "--ws-addr", "127.0.0.1:0"])
        .arg("--data")
        .arg(&data);
    assert_binary_cannot_start(command, &db);
    assert!(!db.exists(), "a database appeared in a read-only directory");
}

#[test]
fn a_locked_database_keeps_the_chat_going_and_catches_up() {
    // Promise: while the database cannot be written the chat goes on in memory (ids increase,
    // newcomers get the history) and /healthz says the store is failing; once it can be
    // written again the backlog is written without help, and a restart shows every message.
    let dir = TempDir::new("locked");
    let server = start(disk_config(dir.path()));
    let http = server.http_addr();
    let (mut alice, welcome) = joined(&server, "room1", "alice");
    let epoch = epoch(&welcome);
    let mut all = vec![alice.say_echo("before the lock")];
    wait_until_written(http, 1);

    // In WAL mode an exclusive transaction holds the write lock; readers are not blocked.
    let lock = rusqlite::Connection::open(db_path(dir.path())).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    for i in 0..10 {
        let echo = alice.say_echo(&format!("locked {i}"));
        assert_eq!(id(&echo), id(all.last().unwrap()) + 1, "{echo}");
        all.push(echo);
    }
    let (mut bob, w) = joined(&server, "room1", "bob");
    assert_eq!(history(&w), all, "a newcomer gets the history from memory");
    alice.expect_type("joined");

    let mut report = Value::Null;
    wait_until("/healthz says the store is failing", || {
        report = health(http);
        report["store"]["state"] == "failing"
    });
    assert_eq!(report["status"], "degraded", "{report}");
    let store = &report["store"];
    assert!(
        store["error"].as_str().is_some_and(|e| !e.is_empty()),
        "failing without an error text: {report}"
    );
    assert!(count(store, "unwritten") > 0, "{report}");

    let echo = bob.say_echo("while failing");
    alice.expect_said("bob", "while failing");
    all.push(echo);

    drop(lock); // rolls back and releases the write lock
    let store = wait_until_written(http, all.len() as u64);
    assert_eq!(store["error"], Value::Null, "{store}");
    assert_eq!(count(&store, "dropped"), 0, "{store}");
    assert_eq!(health(http)["status"], "ok");

    drop((alice, bob));
    server.shutdown();
    let again = start(disk_config(dir.path()));
    let (_carol, w) = joined(&again, "room1", "carol");
    assert_eq!(w["epoch"], epoch.as_str());
    assert_eq!(history(&w), all, "every message, once, in order");
}

#[test]
fn healthz_reports_the_store() {
    // Promise: /healthz tells an operator where history goes and whether it is written:
    // "memory" without a data directory; "ok" with the count of messages committed since
    // start, nothing unwritten, nothing dropped and no error, once the commits are done; and
    // the memory and disk used against their budgets (disk null without a data directory).
    let server = start(crate::support::config());
    let (mut alice, _) = joined(&server, "room1", "alice");
    alice.say_echo("in memory");
    let (memory, disk) = budgets(&server);
    assert!(
        count(&memory, "used") > 0,
        "a room with a message: {memory}"
    );
    assert_eq!(count(&memory, "budget"), 64 << 20);
    assert_eq!(disk, Value::Null, "no disk with --data none");
    assert_eq!(
        without_budgets(health(server.http_addr())),
        json!({"status": "ok", "failed": null, "clients": 1, "rooms": 1, "store": {
            "state": "memory", "written": 0, "unwritten": 0, "dropped": 0, "read_errors": 0, "error": null}})
    );
    drop(alice);
    server.shutdown();

    let dir = TempDir::new("healthz");
    let server = start(disk_config(dir.path()));
    let (_, disk) = budgets(&server);
    assert!(
        count(&disk, "used") > 0 && count(&disk, "file") > 0,
        "{disk}"
    );
    assert_eq!(count(&disk, "budget"), 1 << 30);
    assert_eq!(
        without_budgets(health(server.http_addr())),
        json!({"status": "ok", "failed": null, "clients": 0, "rooms": 0, "store": {
            "state": "ok", "written": 0, "unwritten": 0, "dropped": 0, "read_errors": 0, "error": null}})
    );
    let (mut alice, _) = joined(&server, "room1", "alice");
    for i in 0..3 {
        alice.say_echo(&format!("m{i}"));
    }
    wait_until_written(server.http_addr(), 3);
    assert_eq!(
        without_budgets(health(server.http_addr())),
        json!({"status": "ok", "failed": null, "clients": 1, "rooms": 1, "store": {
            "state": "ok", "written": 3, "unwritten": 0, "dropped": 0, "read_errors": 0, "error": null}})
    );
    drop(alice);
    server.shutdown();

    // `written` counts since start: the messages already on disk are not counted again.
    let server = start(disk_config(dir.path()));
    let (_bob, w) = joined(&server, "room1", "bob");
    assert_eq!(history(&w).len(), 3);
    assert_eq!(count(&store_health(server.http_addr()), "written"), 0);
}

/// `/healthz`'s `memory` and `disk` objects.
fn budgets(server: &chatroom::ServerHandle) -> (Value, Value) {
    let body = health(server.http_addr());
    (body["memory"].clone(), body["disk"].clone())
}

/// `/healthz` without its `memory` and `disk` objects, whose numbers depend on the build.
fn without_budgets(mut body: Value) -> Value {
    let object = body.as_object_mut().expect("an object");
    assert!(object.remove("memory").is_some(), "no memory in {body:?}");
    assert!(object.remove("disk").is_some(), "no disk in /healthz");
    body
}

#[test]
fn a_backup_of_a_running_server_restores_its_rooms() {
    // Promise: `chatroom backup FILE --data DIR` copies the live database while the server
    // runs and keeps writing (exit 0, nothing on stdout); the copy is a consistent data
    // directory (each room's history is a prefix of what was said, under a new epoch);
    // and an existing FILE is refused (exit 1, `chatroom: …`) and left as it was.
    let live = TempDir::new("backup-live");
    let copy = TempDir::new("backup-copy");
    let server = start(disk_config(live.path()));
    let (mut alice, welcome) = joined(&server, "kept", "alice");
    let kept_epoch = epoch(&welcome);
    let kept: Vec<Value> = (0..5).map(|i| alice.say_echo(&format!("k{i}"))).collect();
    let (mut bob, welcome) = joined(&server, "busy", "bob");
    let busy_epoch = epoch(&welcome);
    let on_disk: Vec<Value> = (0..20).map(|i| bob.say_echo(&format!("b{i}"))).collect();
    wait_until_written(server.http_addr(), 25);

    let file = db_path(copy.path());
    let backup = || {
        let mut command = Command::new(BIN);
        command
            .arg("backup")
            .arg(&file)
            .arg("--data")
            .arg(live.path());
        ChildGuard::spawn(command).wait_exit(TIMEOUT)
    };
    // bob keeps talking in "busy" while the backup runs.
    let done = AtomicBool::new(false);
    let (busy, (status, stdout, stderr)) = std::thread::scope(|scope| {
        let talker = scope.spawn(|| {
            let mut said = on_disk.clone();
            while !done.load(Ordering::Relaxed) && said.len() < 5000 {
                said.push(bob.say_echo(&format!("b{}", said.len())));
            }
            said
        });
        let result = {
            let _stop = StopOnDrop(&done);
            backup()
        };
        (talker.join().expect("talker"), result)
    });
    assert_eq!(status.code(), Some(0), "{status}; stderr:\n{stderr}");
    assert!(stdout.is_empty(), "backup printed on stdout: {stdout:?}");
    assert!(file.is_file(), "no backup at {}", file.display());

    let before = fs::read(&file).unwrap();
    let (status, stdout, stderr) = backup();
    assert_eq!(
        status.code(),
        Some(1),
        "an existing FILE: {status}; {stderr}"
    );
    assert!(stdout.is_empty(), "{stdout:?}");
    assert!(
        stderr.lines().any(|l| l.starts_with("chatroom: ")),
        "stderr: {stderr}"
    );
    assert_eq!(
        fs::read(&file).unwrap(),
        before,
        "the existing FILE changed"
    );

    let restored = start(Config {
        history: 100_000,
        ..disk_config(copy.path())
    });
    // A copy of a running server is restored as after a crash: what the live server said after
    // the copy is not in it, and those ids will be handed out again, so every room gets a new
    // epoch (pages reload the history instead of resuming by id).
    let (mut carol, w) = joined(&restored, "kept", "carol");
    assert_ne!(w["epoch"], kept_epoch.as_str());
    assert_eq!(history(&w), kept);
    let next = carol.say_echo("after the restore");
    let last_kept = kept.last().map_or(0, |m| m["id"].as_u64().unwrap());
    assert_eq!(next["id"].as_u64(), Some(last_kept + 1));
    let (_dave, w) = joined(&restored, "busy", "dave");
    let copied = history(&w);
    assert!(
        copied.len() >= on_disk.len()
            && copied.len() <= busy.len()
            && copied == busy[..copied.len()],
        "the copy of \"busy\" is not a prefix of what bob said, at least what was on disk \
         before the backup: {} copied, {} on disk before, {} said",
        copied.len(),
        on_disk.len(),
        busy.len()
    );
    assert_ne!(w["epoch"], busy_epoch.as_str());
    // The live server is untouched by it all.
    alice.say_echo("still here");
}

#[test]
fn room_names_are_only_data_across_a_restart() {
    // Promise: any valid room name is just a name: names that look like SQL or like LIKE
    // patterns keep separate histories across a restart, and names that differ only in case
    // are one room (names are lowercased).
    let rooms = [
        "x-drop_table--",
        "1-or-1--",
        "--",
        "_",
        "a_c",
        "abc",
        "a-c",
        "select_-from_rooms",
        "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz",
    ];
    let dir = TempDir::new("names");
    let first = start(disk_config(dir.path()));
    let mut said: HashMap<&str, Vec<Value>> = HashMap::new();
    for room in rooms {
        let (mut c, w) = joined(&first, room, "alice");
        assert_eq!(w["room"], room);
        said.insert(
            room,
            (0..2)
                .map(|i| c.say_echo(&format!("{i} in {room}")))
                .collect(),
        );
    }
    let (mut upper, w) = joined(&first, "MiXeD-Case", "alice");
    assert_eq!(w["room"], "mixed-case");
    let mut mixed = vec![upper.say_echo("from MiXeD-Case")];
    drop(upper);
    let (mut lower, w) = joined(&first, "mixed-case", "bob");
    assert_eq!(history(&w), mixed, "one room, whatever the case");
    // alice's `left` may come first: her connection was dropped, not waited for.
    lower.say("from mixed-case");
    mixed.push(lower.skip_until(|frame| frame["type"] == "message"));
    drop(lower);
    first.shutdown();

    let second = start(disk_config(dir.path()));
    for room in rooms {
        let (_c, w) = joined(&second, room, "carol");
        assert_eq!(history(&w), said[room], "room {room:?}");
    }
    let (_c, w) = joined(&second, "MIXED-CASE", "carol");
    assert_eq!(w["room"], "mixed-case");
    assert_eq!(history(&w), mixed);
}

#[test]
fn twenty_rooms_first_used_at_once_after_a_restart() {
    // Promise: right after a restart, many rooms used for the first time at the same moment
    // each come back with their own history, and messages sent at once after `hello` (before
    // the welcome arrives) are echoed in order with ids after the stored ones.
    const ROOMS: usize = 20;
    const PER_ROOM: usize = 3;
    const SAYS: usize = 3;
    let dir = TempDir::new("many-rooms");
    let first = start(disk_config(dir.path()));
    let mut stored = Vec::new();
    let mut epochs = Vec::new();
    for r in 0..ROOMS {
        let (mut c, w) = joined(&first, &format!("r{r}"), "old");
        epochs.push(epoch(&w));
        // Histories of different lengths, so one room's cannot pass for another's.
        stored.push(
            (0..1 + r % 4)
                .map(|i| c.say_echo(&format!("r{r} old {i}")))
                .collect::<Vec<Value>>(),
        );
    }
    first.shutdown();

    let second = start(disk_config(dir.path()));
    let ws_addr = second.ws_addr();
    // Every connection is open before any hello; dropping `go` releases all clients at once
    // (also when this thread panics, so no client waits forever).
    let mut clients = Vec::new();
    for r in 0..ROOMS {
        for k in 0..PER_ROOM {
            let client = TestClient::try_connect(ws_addr, &format!("/ws/r{r}")).unwrap();
            clients.push((r, k, client));
        }
    }
    let (go, ready) = crossbeam_channel::bounded::<()>(0);
    std::thread::scope(|scope| {
        for (r, k, mut client) in clients {
            let (ready, stored, epochs) = (ready.clone(), &stored[r], &epochs[r]);
            std::thread::Builder::new()
                .name(format!("r{r}-c{k}"))
                .spawn_scoped(scope, move || {
                    let name = format!("c{k}");
                    let mine: Vec<String> =
                        (0..SAYS).map(|i| format!("r{r} {name} new {i}")).collect();
                    let _ = ready.recv(); // returns when `go` is dropped
                    client.send_json(&json!({"type": "hello", "name": name}));
                    for text in &mine {
                        client.say(text);
                    }
                    let w = client.expect_type("welcome");
                    assert_eq!(&epoch(&w), epochs, "r{r}: the stored epoch");
                    let replay = history(&w);
                    assert!(
                        replay.len() >= stored.len() && replay[..stored.len()] == stored[..],
                        "r{r}/{name}: welcome does not start with the room's own history: {w}"
                    );
                    assert_strictly_increasing(&replay, &format!("r{r} welcome"));
                    let mut last = replay.last().map(id).unwrap_or(0);
                    let mut echoed = Vec::new();
                    while echoed.len() < SAYS {
                        let v = client.next_json();
                        if v["type"] != "message" {
                            continue;
                        }
                        assert_eq!(v["room"], format!("r{r}").as_str(), "{v}");
                        assert!(id(&v) > last, "r{r}/{name}: id {} after {last}", id(&v));
                        last = id(&v);
                        if v["name"] == name.as_str() {
                            echoed.push(v["text"].as_str().unwrap().to_owned());
                        }
                    }
                    assert_eq!(echoed, mine, "r{r}/{name}: my messages, in order");
                })
                .expect("spawn a client");
        }
        drop(go);
    });
    // Nothing was lost or mixed up: a newcomer per room sees its history and the new ones.
    for (r, before) in stored.iter().enumerate() {
        let (_c, w) = joined(&second, &format!("r{r}"), "late");
        let replay = history(&w);
        assert_eq!(replay[..before.len()], before[..], "r{r}");
        assert_eq!(replay.len(), before.len() + PER_ROOM * SAYS, "r{r}: {w}");
        assert_strictly_increasing(&replay, &format!("r{r} at the end"));
        let new_texts = texts(&replay[before.len()..]);
        assert!(
            new_texts.iter().all(|t| t.starts_with(&format!("r{r} c"))),
            "r{r}: {new_texts:?}"
        );
    }
}
