//! The history store: ONE thread owns the SQLite connection and is the only code that touches
//! the disk.
//!
//! The hub ([`crate::hub`]) reaches it through a [`StoreLink`], two unbounded queues, and never
//! waits for an answer: an [`Append`] for every message it has just
//! broadcast, and [`StoreCommand`]s: `Load` the first time a room is used, `Forget` when it
//! drops an idle room from memory. The store answers a `Load` through the `deliver` function
//! it was started with, which puts the room into the hub's own queue, so the hub keeps serving
//! every other room while one is read from disk. The store never names the hub's types: the
//! hub sits above it, and [`crate::Server::start`] wires the two together.
//!
//! Writes are grouped: appends wait at most [`COMMIT_INTERVAL`] and are committed together in
//! one transaction (group commit), so a burst of a thousand messages costs one commit, not a
//! thousand, and each room's share of the batch is one row (a chunk). Appends never wake the
//! store: the hub sends `Commit` once the oldest pending append is [`ASK_TO_COMMIT_AFTER`] old,
//! at the end of one of its bursts (or from its own timer when it is idle), so the store runs
//! when the hub is about to sleep, not in the middle of a fan-out. Between commands the store
//! sleeps on a condvar queue, never spinning or yielding: on W1's one busy core, a store thread
//! that yielded after each commit cost the others 12-27% on p99 (bench/NOTES.md). When a commit
//! fails (disk full, file locked, I/O error) the messages stay pending and the commit is
//! retried with a growing pause; chat goes on from memory meanwhile, and
//! `/healthz` says the store is failing (see [`StoreHealth`]).
//!
//! What can be lost: nothing at a clean shutdown ([`run`] commits before it returns); after a
//! SIGKILL, at most the last commit interval. A run that did not end cleanly leaves a mark, and
//! the next start gives every room a new epoch, so browsers reload the history instead of
//! trusting ids that the lost messages had used.
//!
//! Room names and message text are only ever SQL parameters, and the file name is fixed.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use log::{error, info, warn};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use tungstenite::Utf8Bytes;

use crate::outbox::{self, Inbox, Offer, Outbox, Taken, Weigh};
use crate::protocol;
use crate::room::{EpochSource, StoredMessage};

/// The database's file name inside the data directory.
pub const DATABASE_FILE: &str = "chatroom.db";
/// A message is committed at most this long after the hub handed it over: the most a SIGKILL
/// can take away.
pub const COMMIT_INTERVAL: Duration = Duration::from_millis(20);
/// The hub asks for a commit this long after the oldest message it has handed over, which
/// leaves the other half of [`COMMIT_INTERVAL`] for the store to get a CPU and write. Half-size
/// batches also keep the store's turns on a busy core short: W1's p99 cost went from 12% to 8%.
pub const ASK_TO_COMMIT_AFTER: Duration = Duration::from_millis(10);
/// Messages accepted but not yet on disk, at most. Beyond this (a disk that has been failing
/// for a long time) the hub stops handing messages over and counts them as dropped, so a dead
/// disk cannot grow memory without bound. Chat itself goes on.
pub const MAX_UNWRITTEN: u64 = 100_000;
/// How long SQLite waits for a lock held by another process (a backup tool, a `sqlite3` shell)
/// before a statement fails. Short, so the store never sits on a lock for long.
const BUSY_TIMEOUT: Duration = Duration::from_millis(250);
/// With nothing to do and nothing failing, the store still checks its queue this often (the
/// wait needs a deadline); nothing happens then.
const IDLE_WAKE: Duration = Duration::from_secs(3600);
/// Pauses between attempts after a failed commit: doubling from the first to the last.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(1);
/// At shutdown, a failing disk gets this many more attempts before pending messages are lost.
const SHUTDOWN_ATTEMPTS: u32 = 3;

/// What the hub asks of the store, besides writing messages.
pub enum StoreCommand {
    /// Read a room's epoch, last id and newest `history` messages, and send them to the hub.
    Load { room: String },
    /// The hub no longer holds this room in memory; the store may forget its cached state.
    Forget { room: String },
    /// Commit the appends sent so far (the hub sends it [`ASK_TO_COMMIT_AFTER`] after the first).
    Commit,
    /// Commit everything, then end.
    Shutdown,
}

/// The command queue is unbounded: commands weigh nothing.
impl Weigh for StoreCommand {
    fn bytes(&self) -> usize {
        0
    }
}

/// The hub's side of the store's two queues: a crossbeam channel for appends (never read until
/// a command comes) and a condvar queue for commands.
pub struct StoreLink {
    appends: Sender<Append>,
    commands: Outbox<StoreCommand>,
}

/// The store thread's side.
pub struct StoreInbox {
    appends: Receiver<Append>,
    commands: Inbox<StoreCommand>,
}

/// Makes the channels between the hub and the store.
pub fn channels() -> (StoreLink, StoreInbox) {
    let (appends_tx, appends_rx) = crossbeam_channel::unbounded();
    // Commands go through a condvar queue, not a crossbeam channel: a crossbeam receiver that
    // finds nothing calls `sched_yield` a few times before it sleeps, and the store doing that
    // after each of its 100 commits a second cost W1 12-27% on p99 (bench/NOTES.md). Unbounded:
    // a refused Load would leave a room waiting for ever.
    let (commands_tx, commands_rx) = outbox::outbox(usize::MAX, usize::MAX);
    (
        StoreLink {
            appends: appends_tx,
            commands: commands_tx,
        },
        StoreInbox {
            appends: appends_rx,
            commands: commands_rx,
        },
    )
}

impl StoreLink {
    /// Hands a message over to be written; never waits. False if the store has ended.
    pub fn append(&self, message: Append) -> bool {
        self.appends.send(message).is_ok()
    }

    /// Never waits. False if the store has ended.
    pub fn send(&self, command: StoreCommand) -> bool {
        self.commands.offer(command) == Offer::Queued
    }
}

/// One message to write: which room (the handle the store gave in [`LoadedRoom`]), its id, and
/// the frame the hub broadcast, shared, not copied. Nothing in it is allocated for the store, so
/// handing it over costs the hub a reference count and a channel slot.
pub struct Append {
    pub room: RoomHandle,
    pub id: u64,
    pub frame: Utf8Bytes,
}

/// The store's name for a room it has loaded, valid until the hub forgets the room.
pub type RoomHandle = u64;

/// A room as found on disk (or new), ready for the hub.
#[derive(Debug)]
pub struct LoadedRoom {
    /// What [`Append`]s for this room carry.
    pub handle: RoomHandle,
    pub epoch: String,
    pub last_id: u64,
    /// The newest messages, oldest first.
    pub history: Vec<StoredMessage>,
}

/// The store's state as `/healthz` tells it. The hub and the store thread write it; HTTP reads.
#[derive(Default)]
pub struct StoreHealth {
    state: AtomicU8,
    /// Messages committed since start.
    pub written: AtomicU64,
    /// Messages handed to the store and not yet committed.
    pub unwritten: AtomicU64,
    /// Messages that will never be written: the backlog was full, their room could not be
    /// read, or the disk was still failing at shutdown.
    pub dropped: AtomicU64,
    /// Reads of a room's history that failed: each one logged, and the room served with what
    /// memory still held, so the count tells an operator that a history may have a hole.
    pub read_errors: AtomicU64,
    /// The last error, until a commit succeeds again.
    error: Mutex<Option<String>>,
}

/// Whether history is on disk, and whether the disk is answering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreState {
    /// `--data none`: history lives in memory only.
    Memory,
    Ok,
    /// The last write failed; messages are kept in memory and retried.
    Failing,
}

impl StoreState {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreState::Memory => "memory",
            StoreState::Ok => "ok",
            StoreState::Failing => "failing",
        }
    }
}

impl StoreHealth {
    /// The health of a store that is about to start (`on_disk`), or of memory-only history.
    pub fn new(on_disk: bool) -> Self {
        let health = StoreHealth::default();
        if on_disk {
            health.set_state(StoreState::Ok);
        }
        health
    }

    pub fn state(&self) -> StoreState {
        match self.state.load(Ordering::Relaxed) {
            0 => StoreState::Memory,
            1 => StoreState::Ok,
            _ => StoreState::Failing,
        }
    }

    fn set_state(&self, state: StoreState) {
        let value = match state {
            StoreState::Memory => 0,
            StoreState::Ok => 1,
            StoreState::Failing => 2,
        };
        self.state.store(value, Ordering::Relaxed);
    }

    pub fn error(&self) -> Option<String> {
        self.error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn set_error(&self, error: Option<String>) {
        *self
            .error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = error;
    }
}

/// What the store remembers of a room the hub holds in memory.
struct CachedRoom {
    name: String,
    /// Its row in `rooms`; `None` until its first message is committed, so visiting a room
    /// without speaking writes nothing.
    row: Option<i64>,
    epoch: String,
    /// The newest id handed to the store (committed or pending).
    last_id: u64,
    /// Ids up to this one have been pruned (or never existed).
    pruned_through: u64,
    /// False when the room could not be read: its ids may clash with stored ones, so its
    /// messages are not written.
    persist: bool,
    /// The hub forgot the room while some of its messages were pending.
    forget_after_commit: bool,
}

/// The store thread's state: the connection, the pending batch and the rooms in use.
pub struct Store {
    conn: Connection,
    path: PathBuf,
    history_limit: usize,
    retain: u64,
    epochs: EpochSource,
    /// The rooms the hub holds, by handle, and their handles by name.
    rooms: HashMap<RoomHandle, CachedRoom>,
    handles: HashMap<String, RoomHandle>,
    handles_made: RoomHandle,
    pending: Vec<Append>,
    /// The pause before the next attempt after a failure.
    retry_after: Duration,
    /// See [`crate::config::CrashForTests::StoreOnLoad`].
    crash_on_load: Option<String>,
}

/// Opens (creating if needed) `dir/chatroom.db`, checks it can be written, and recovers from an
/// unclean end of the previous run. Every error names the database's path.
pub fn open(dir: &Path, history_limit: usize, retain: usize) -> io::Result<Store> {
    let path = dir.join(DATABASE_FILE);
    let fail = |what: &str, err: &dyn std::fmt::Display| {
        io::Error::other(format!(
            "cannot {what} the history database {}: {err}",
            path.display()
        ))
    };
    std::fs::create_dir_all(dir).map_err(|err| fail("create the directory of", &err))?;
    // Logs and errors from here on name the file absolutely: that is where an operator looks.
    let path = std::fs::canonicalize(dir).map_or(path, |dir| dir.join(DATABASE_FILE));
    let fail = |what: &str, err: &dyn std::fmt::Display| {
        io::Error::other(format!(
            "cannot {what} the history database {}: {err}",
            path.display()
        ))
    };
    let conn = Connection::open(&path).map_err(|err| fail("open", &err))?;
    if conn.is_readonly(rusqlite::MAIN_DB).unwrap_or(true) {
        return Err(fail("write", &"the file is read-only"));
    }
    let epochs = EpochSource::new();
    prepare(&conn, &epochs).map_err(|err| fail("use", &err))?;
    Ok(Store {
        conn,
        path,
        history_limit,
        retain: retain as u64,
        epochs,
        rooms: HashMap::new(),
        handles: HashMap::new(),
        handles_made: 0,
        pending: Vec::new(),
        retry_after: RETRY_FIRST,
        crash_on_load: None,
    })
}

/// Messages are kept in chunks: one row holds a run of one room's messages from one commit, as
/// a JSON array of their frames. A row per message cost the store 1.9 µs per message in W1, a
/// third of it in pruning; a chunk costs one B-tree insert (and later one delete) per room per
/// commit (bench/NOTES.md). A chunk's key is its room's row and its first id in one integer,
/// `room << 40 | first id`, so the table is SQLite's plain rowid B-tree and reading, pruning
/// and loading a room are range scans on one integer. Ids go up to 2^40 (a room taking 10,000
/// messages a second for three years) and rooms to 2^23; a message beyond either is not
/// written (and is counted as dropped).
const ID_BITS: u32 = 40;
const MAX_ID: u64 = (1 << ID_BITS) - 1;
const MAX_ROOM_ROW: i64 = (1 << (63 - ID_BITS)) - 1;

fn key(row: i64, id: u64) -> i64 {
    (row << ID_BITS) | id as i64
}

/// A chunk is closed once its frames pass this size, so a long backlog (after the disk failed
/// for a while) is written as many rows, not one huge one.
const CHUNK_BYTES: usize = 64 * 1024;

/// The schema this code writes. Version 1 had one row per message (`key`, `frame`); it is
/// converted at open, each message becoming a chunk of one.
const SCHEMA_VERSION: i64 = 2;

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS meta (
        key   TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS rooms (
        id    INTEGER PRIMARY KEY,
        name  TEXT NOT NULL UNIQUE,
        epoch TEXT NOT NULL
    );
    INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', 2), ('clean', 1);
";

/// The messages table and the view for people, in the current version.
const MESSAGES_SCHEMA: &str = "
    -- One row per chunk: key = rooms.id << 40 | the chunk's first id; last_id = its last id;
    -- frames = a JSON array of the `message` events as they were broadcast (PROTOCOL.md),
    -- oldest first, so a reload sends the same bytes.
    CREATE TABLE IF NOT EXISTS messages (
        key     INTEGER PRIMARY KEY,
        last_id INTEGER NOT NULL,
        frames  TEXT NOT NULL
    );
    -- For people reading the file: every message with its room, id, time, sender and text.
    CREATE VIEW IF NOT EXISTS history AS
        SELECT rooms.name AS room, message.value ->> '$.id' AS id,
               message.value ->> '$.ts' AS ts, message.value ->> '$.name' AS name,
               message.value ->> '$.text' AS text
        FROM messages JOIN rooms ON rooms.id = messages.key >> 40,
             json_each(messages.frames) AS message;
";

/// Version 1 to 2: each message becomes a chunk of one, in one transaction.
const MIGRATE_1_TO_2: &str = "
    BEGIN;
    DROP VIEW IF EXISTS history;
    ALTER TABLE messages RENAME TO messages_v1;
    CREATE TABLE messages (
        key     INTEGER PRIMARY KEY,
        last_id INTEGER NOT NULL,
        frames  TEXT NOT NULL
    );
    INSERT INTO messages (key, last_id, frames)
        SELECT key, key & 1099511627775, '[' || frame || ']' FROM messages_v1;
    DROP TABLE messages_v1;
    UPDATE meta SET value = 2 WHERE key = 'schema';
    COMMIT;
";

/// Settings, schema, and the crash check, in the caller's thread (so errors stop start-up).
fn prepare(conn: &Connection, epochs: &EpochSource) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // WAL: readers (a backup) never block the writer. synchronous=NORMAL: a commit is in the
    // OS's hands at once (safe from a killed process) but not fsynced each time; a power cut
    // can lose the last commits, never corrupt the file.
    conn.pragma_update(None, "journal_mode", "WAL")?;

    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(SCHEMA)?;
    let version: i64 = conn.query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
        r.get(0)
    })?;
    match version {
        1 => {
            info!("converting the history database to chunks (schema 1 to 2)");
            conn.execute_batch(MIGRATE_1_TO_2)?;
        }
        SCHEMA_VERSION => {}
        other => {
            return Err(sqlite_error(
                rusqlite::ffi::SQLITE_ERROR,
                format!(
                    "it has schema version {other}, from a newer chatroom; \
                     this one reads {SCHEMA_VERSION}"
                ),
            ))
        }
    }
    conn.execute_batch(MESSAGES_SCHEMA)?;
    let clean: i64 = conn.query_row("SELECT value FROM meta WHERE key = 'clean'", [], |r| {
        r.get(0)
    })?;
    if clean == 0 {
        // The last run ended without committing everything: ids it handed out may not be on
        // disk and would be handed out again. A new epoch for every room tells browsers to
        // take the history afresh.
        let renamed = conn.execute(
            "UPDATE rooms SET epoch = ?1 || '-r' || id",
            [epochs.prefix()],
        )?;
        warn!(
            "the last run did not shut down cleanly: up to {} ms of messages may be lost; \
             {renamed} rooms get a new epoch",
            COMMIT_INTERVAL.as_millis()
        );
    }
    // Marked clean again only after the final commit at shutdown.
    conn.execute("UPDATE meta SET value = 0 WHERE key = 'clean'", [])?;
    Ok(())
}

/// Writes a consistent copy of the live database in `dir` to `dest` (`VACUUM INTO`), safe
/// while a server is running on `dir`. `dest` must not exist.
pub fn backup(dir: &Path, dest: &Path) -> io::Result<()> {
    let path = dir.join(DATABASE_FILE);
    if dest.exists() {
        return Err(io::Error::other(format!(
            "{} exists; a backup never overwrites a file",
            dest.display()
        )));
    }
    let dest_text = dest
        .to_str()
        .ok_or_else(|| io::Error::other(format!("{} is not valid UTF-8", dest.display())))?;
    let conn = Connection::open_with_flags(
        &path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|err| io::Error::other(format!("cannot open {}: {err}", path.display())))?;
    conn.busy_timeout(Duration::from_secs(5))
        .and_then(|_| conn.execute("VACUUM INTO ?1", [dest_text]))
        .map_err(|err| {
            io::Error::other(format!(
                "cannot copy {} to {}: {err}",
                path.display(),
                dest.display()
            ))
        })?;
    Ok(())
}

/// Runs the store until [`StoreCommand::Shutdown`] or until the hub is gone, then commits what
/// is pending, prunes, and marks the run clean.
/// `deliver` hands a loaded room to the hub; it returns false once the hub has ended.
pub fn run(
    mut store: Store,
    inbox: StoreInbox,
    deliver: impl Fn(String, LoadedRoom) -> bool,
    health: &StoreHealth,
) {
    info!("history is kept in {}", store.path.display());
    // Set after a failed commit: when to try again.
    let mut retry_at: Option<Instant> = None;
    'serve: loop {
        // Only commands wake the store (and a retry's time): appends just wait in their channel.
        let deadline = retry_at.unwrap_or_else(|| Instant::now() + IDLE_WAKE);
        let commands = match inbox.commands.take_all(deadline) {
            Taken::Frames(commands) => commands,
            Taken::TimedOut if retry_at.is_some() => [StoreCommand::Commit].into(),
            Taken::TimedOut => continue,
            Taken::Closed => break, // The hub is gone.
        };
        // Whatever the hub appended before sending these commands is in its channel already:
        // take it first, so a Load sees every message sent before it.
        for append in inbox.appends.try_iter() {
            store.accept(append);
        }
        for command in commands {
            match command {
                // While a failing disk waits for its retry time, the hub's asks change nothing.
                StoreCommand::Commit if retry_at.is_some_and(|at| Instant::now() < at) => {}
                StoreCommand::Commit => {
                    retry_at = match store.commit(health) {
                        Ok(()) => None,
                        Err(()) => Some(Instant::now() + store.next_retry()),
                    };
                }
                StoreCommand::Load { room } => {
                    let loaded = store.load(&room, health);
                    if !deliver(room, loaded) {
                        break 'serve; // The hub has ended: so does the server.
                    }
                }
                StoreCommand::Forget { room } => store.forget(&room),
                StoreCommand::Shutdown => break 'serve,
            }
        }
    }
    store.close(health);
}

impl Store {
    /// The room's state for the hub: from the cache when the hub dropped it and comes back
    /// before the store forgot it, else from disk, else new.
    fn load(&mut self, room: &str, health: &StoreHealth) -> LoadedRoom {
        if self.crash_on_load.as_deref() == Some(room) {
            panic!("crash_for_tests: the store thread panics loading a room");
        }
        let limit = self.history_limit;
        if let Some(&handle) = self.handles.get(room) {
            let cached = self
                .rooms
                .get_mut(&handle)
                .expect("a handle names a cached room");
            cached.forget_after_commit = false;
            let (epoch, last_id, row) = (cached.epoch.clone(), cached.last_id, cached.row);
            let mut history = match row.map(|row| read_history(&self.conn, row, limit)) {
                Some(Ok(history)) => history,
                None => Vec::new(),
                Some(Err(err)) => {
                    error!("cannot read a room's history; it is served without it: {err}");
                    health.read_errors.fetch_add(1, Ordering::Relaxed);
                    self.failed(health, &err);
                    Vec::new()
                }
            };
            // Messages not yet committed are history too.
            history.extend(self.pending.iter().filter(|m| m.room == handle).map(|m| {
                StoredMessage {
                    id: m.id,
                    frame: m.frame.clone(),
                }
            }));
            let skip = history.len().saturating_sub(limit);
            history.drain(..skip);
            return LoadedRoom {
                handle,
                epoch,
                last_id,
                history,
            };
        }
        let (cached, history) = match read_room(&self.conn, room, limit) {
            Ok(Some((row, epoch, first_id, last_id, history))) => (
                CachedRoom {
                    name: room.to_owned(),
                    row: Some(row),
                    epoch,
                    last_id,
                    pruned_through: first_id.saturating_sub(1),
                    persist: true,
                    forget_after_commit: false,
                },
                history,
            ),
            Ok(None) => (self.new_room(room, true), Vec::new()),
            Err(err) => {
                error!("cannot read a room's history; it starts empty and is not kept: {err}");
                health.read_errors.fetch_add(1, Ordering::Relaxed);
                self.failed(health, &err);
                (self.new_room(room, false), Vec::new())
            }
        };
        self.handles_made += 1;
        let handle = self.handles_made;
        let loaded = LoadedRoom {
            handle,
            epoch: cached.epoch.clone(),
            last_id: cached.last_id,
            history,
        };
        self.handles.insert(room.to_owned(), handle);
        self.rooms.insert(handle, cached);
        loaded
    }

    fn accept(&mut self, message: Append) {
        if let Some(cached) = self.rooms.get_mut(&message.room) {
            cached.last_id = cached.last_id.max(message.id);
        }
        self.pending.push(message);
    }

    fn new_room(&mut self, room: &str, persist: bool) -> CachedRoom {
        CachedRoom {
            name: room.to_owned(),
            row: None,
            epoch: self.epochs.make(),
            last_id: 0,
            pruned_through: 0,
            persist,
            forget_after_commit: false,
        }
    }

    fn forget(&mut self, room: &str) {
        let Some(&handle) = self.handles.get(room) else {
            return;
        };
        if self.pending.iter().any(|m| m.room == handle) {
            if let Some(cached) = self.rooms.get_mut(&handle) {
                cached.forget_after_commit = true;
            }
        } else {
            self.rooms.remove(&handle);
            self.handles.remove(room);
        }
    }

    /// Drops the rooms the hub forgot while their messages were pending, now written.
    fn forget_committed(&mut self) {
        let handles = &mut self.handles;
        self.rooms.retain(|_, cached| {
            if cached.forget_after_commit {
                handles.remove(&cached.name);
            }
            !cached.forget_after_commit
        });
    }

    /// See [`crate::config::CrashForTests::StoreOnLoad`].
    #[doc(hidden)]
    pub fn crash_on_load_for_tests(&mut self, room: String) {
        self.crash_on_load = Some(room);
    }

    fn next_retry(&mut self) -> Duration {
        let pause = self.retry_after;
        self.retry_after = (pause * 2).min(RETRY_MAX);
        pause
    }

    fn failed(&self, health: &StoreHealth, err: &rusqlite::Error) {
        health.set_state(StoreState::Failing);
        health.set_error(Some(err.to_string()));
    }

    /// Commits the pending batch in one transaction. On failure nothing is committed and the
    /// batch stays pending for the next attempt.
    fn commit(&mut self, health: &StoreHealth) -> Result<(), ()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let batch = self.pending.len() as u64;
        match write_batch(&mut self.conn, &self.pending, &self.rooms) {
            Ok((new_rows, skipped)) => {
                for (handle, row) in new_rows {
                    if let Some(cached) = self.rooms.get_mut(&handle) {
                        cached.row = Some(row);
                    }
                }
                self.pending.clear();
                health.unwritten.fetch_sub(batch, Ordering::Relaxed);
                health.written.fetch_add(batch - skipped, Ordering::Relaxed);
                health.dropped.fetch_add(skipped, Ordering::Relaxed);
                if health.state() == StoreState::Failing {
                    info!("the history database is writable again; {batch} messages written");
                }
                health.set_state(StoreState::Ok);
                health.set_error(None);
                self.retry_after = RETRY_FIRST;
                self.forget_committed();
                self.prune(self.retain / 10 + 100);
                Ok(())
            }
            Err(err) => {
                if health.state() != StoreState::Failing {
                    error!(
                        "cannot write history to {}: {err}; chat goes on from memory and \
                         the write is retried",
                        self.path.display()
                    );
                }
                self.failed(health, &err);
                Err(())
            }
        }
    }

    /// Deletes each room's chunks that hold only messages beyond `retain`, once `slack` more
    /// have piled up (so pruning is an occasional bulk delete, not one per commit). A chunk
    /// that straddles the limit stays whole until [`Store::trim_to_retain`] at shutdown.
    fn prune(&mut self, slack: u64) {
        for cached in self.rooms.values_mut() {
            let Some(row) = cached.row else { continue };
            let keep_from = cached.last_id.saturating_sub(self.retain);
            if keep_from <= cached.pruned_through + slack || cached.last_id <= self.retain {
                continue;
            }
            match self.conn.execute(
                "DELETE FROM messages WHERE key BETWEEN ?1 AND ?2 AND last_id <= ?3",
                params![key(row, 0), key(row, keep_from), keep_from as i64],
            ) {
                Ok(_) => cached.pruned_through = keep_from,
                // Not urgent: the next commit tries again.
                Err(err) => warn!("cannot prune old history: {err}"),
            }
        }
    }

    /// Rewrites each room's chunk that straddles `retain` without its older messages, so that
    /// after a clean shutdown a room holds exactly its newest `retain`.
    fn trim_to_retain(&mut self) -> rusqlite::Result<()> {
        let tx = self.conn.transaction()?;
        for cached in self.rooms.values() {
            let Some(row) = cached.row else { continue };
            let keep_from = cached.last_id.saturating_sub(self.retain);
            if keep_from == 0 {
                continue;
            }
            let straddling: Option<(i64, i64, String)> = tx
                .query_row(
                    "SELECT key, last_id, frames FROM messages \
                     WHERE key BETWEEN ?1 AND ?2 AND last_id > ?3",
                    params![key(row, 0), key(row, keep_from), keep_from as i64],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;
            let Some((old_key, last_id, frames)) = straddling else {
                continue;
            };
            let kept: Vec<(u64, Utf8Bytes)> = protocol::split_message_frames(&frames)
                .map_err(|err| {
                    sqlite_error(
                        rusqlite::ffi::SQLITE_CORRUPT,
                        format!("a damaged chunk: {err}"),
                    )
                })?
                .into_iter()
                .filter(|(id, _)| *id > keep_from)
                .collect();
            tx.execute("DELETE FROM messages WHERE key = ?1", [old_key])?;
            if let Some((first_id, _)) = kept.first() {
                tx.execute(
                    "INSERT INTO messages (key, last_id, frames) VALUES (?1, ?2, ?3)",
                    params![
                        key(row, *first_id),
                        last_id,
                        protocol::join_message_frames(kept.iter().map(|(_, f)| f.as_str())),
                    ],
                )?;
            }
        }
        tx.commit()
    }

    /// The end: commit what is pending (a failing disk gets a few more tries), prune to the
    /// exact limit, and mark the run clean if nothing was lost.
    fn close(mut self, health: &StoreHealth) {
        let mut committed = self.commit(health).is_ok();
        for _ in 1..SHUTDOWN_ATTEMPTS {
            if committed {
                break;
            }
            std::thread::sleep(self.next_retry());
            committed = self.commit(health).is_ok();
        }
        if !committed {
            let lost = self.pending.len() as u64;
            error!("{lost} messages could not be written before shutdown");
            health.unwritten.fetch_sub(lost, Ordering::Relaxed);
            health.dropped.fetch_add(lost, Ordering::Relaxed);
            return; // Not marked clean: the next start gives rooms new epochs.
        }
        self.prune(0);
        if let Err(err) = self.trim_to_retain() {
            warn!("cannot trim history to --retain: {err}");
        }
        match self
            .conn
            .execute("UPDATE meta SET value = 1 WHERE key = 'clean'", [])
        {
            Ok(_) => info!("history written to {}", self.path.display()),
            Err(err) => error!("cannot mark the history database clean: {err}"),
        }
    }
}

/// Writes `batch` in one transaction, one chunk per room (more if a room's frames pass
/// [`CHUNK_BYTES`]). Returns the rows created for new rooms (applied to the cache only once
/// the commit succeeded) and how many messages were skipped.
fn write_batch(
    conn: &mut Connection,
    batch: &[Append],
    rooms: &HashMap<RoomHandle, CachedRoom>,
) -> rusqlite::Result<(Vec<(RoomHandle, i64)>, u64)> {
    let tx = conn.transaction()?;
    let mut new_rows: Vec<(RoomHandle, i64)> = Vec::new();
    let mut skipped = 0;
    {
        let mut insert_room =
            tx.prepare_cached("INSERT INTO rooms (name, epoch) VALUES (?1, ?2)")?;
        // OR IGNORE: one impossible duplicate must not poison the batch for ever.
        let mut insert_chunk = tx.prepare_cached(
            "INSERT OR IGNORE INTO messages (key, last_id, frames) VALUES (?1, ?2, ?3)",
        )?;
        let mut write = |chunk: &Chunk<'_>| {
            insert_chunk.execute(params![
                key(chunk.row, chunk.first_id),
                chunk.last_id as i64,
                protocol::join_message_frames(chunk.frames.iter().copied()),
            ])
        };
        // Each room's open chunk; messages of different rooms interleave in the batch.
        let mut chunks: HashMap<RoomHandle, Chunk<'_>> = HashMap::new();
        for message in batch {
            let row = match chunks.get(&message.room) {
                Some(chunk) => Some(chunk.row),
                None => match rooms.get(&message.room).filter(|c| c.persist) {
                    None => None,
                    Some(CachedRoom { row: Some(row), .. }) => Some(*row),
                    Some(cached) => match new_rows.iter().find(|(h, _)| *h == message.room) {
                        Some((_, row)) => Some(*row),
                        None => {
                            insert_room.execute(params![cached.name, cached.epoch])?;
                            let row = tx.last_insert_rowid();
                            new_rows.push((message.room, row));
                            Some(row)
                        }
                    },
                },
            };
            let Some(row) = row.filter(|row| *row <= MAX_ROOM_ROW && message.id <= MAX_ID) else {
                skipped += 1;
                continue;
            };
            let chunk = chunks
                .entry(message.room)
                .or_insert_with(|| Chunk::new(row));
            if chunk.bytes + message.frame.len() > CHUNK_BYTES && !chunk.frames.is_empty() {
                write(chunk)?;
                *chunk = Chunk::new(row);
            }
            chunk.push(message.id, message.frame.as_str());
        }
        for chunk in chunks.values() {
            write(chunk)?;
        }
    }
    tx.commit()?;
    Ok((new_rows, skipped))
}

/// One room's messages from one commit, on their way into one row.
struct Chunk<'a> {
    row: i64,
    first_id: u64,
    last_id: u64,
    bytes: usize,
    frames: Vec<&'a str>,
}

impl<'a> Chunk<'a> {
    fn new(row: i64) -> Self {
        Chunk {
            row,
            first_id: 0,
            last_id: 0,
            bytes: 0,
            frames: Vec::new(),
        }
    }

    fn push(&mut self, id: u64, frame: &'a str) {
        if self.frames.is_empty() {
            self.first_id = id;
        }
        self.last_id = id;
        self.bytes += frame.len() + 1;
        self.frames.push(frame);
    }
}

/// An error of ours in SQLite's terms, so it is reported like SQLite's own.
fn sqlite_error(code: std::ffi::c_int, message: String) -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), Some(message))
}

/// A stored room: its row, epoch, first and last ids, and newest `limit` messages.
type RoomOnDisk = (i64, String, u64, u64, Vec<StoredMessage>);

fn read_room(conn: &Connection, room: &str, limit: usize) -> rusqlite::Result<Option<RoomOnDisk>> {
    let Some((row, epoch)) = conn
        .prepare_cached("SELECT id, epoch FROM rooms WHERE name = ?1")?
        .query_row([room], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        })
        .optional()?
    else {
        return Ok(None);
    };
    let range = [key(row, 0), key(row, MAX_ID)];
    let first: Option<i64> = conn
        .prepare_cached("SELECT MIN(key) FROM messages WHERE key BETWEEN ?1 AND ?2")?
        .query_row(range, |r| r.get(0))?;
    let last: Option<i64> = conn
        .prepare_cached(
            "SELECT last_id FROM messages WHERE key BETWEEN ?1 AND ?2 ORDER BY key DESC LIMIT 1",
        )?
        .query_row(range, |r| r.get(0))
        .optional()?;
    let first = first.map_or(0, |key| key as u64 & MAX_ID);
    let history = read_history(conn, row, limit)?;
    Ok(Some((
        row,
        epoch,
        first,
        last.map_or(0, |id| id as u64),
        history,
    )))
}

/// The newest `limit` messages of a room, oldest first, as they were broadcast.
fn read_history(conn: &Connection, row: i64, limit: usize) -> rusqlite::Result<Vec<StoredMessage>> {
    let mut statement = conn.prepare_cached(
        "SELECT frames FROM messages WHERE key BETWEEN ?1 AND ?2 ORDER BY key DESC",
    )?;
    let mut chunks = statement.query([key(row, 0), key(row, MAX_ID)])?;
    // Newest chunk first, until there are enough.
    let mut newest_first: Vec<Vec<StoredMessage>> = Vec::new();
    let mut count = 0;
    while count < limit {
        let Some(chunk) = chunks.next()? else { break };
        let frames = chunk.get_ref(0)?.as_str()?;
        let messages = protocol::split_message_frames(frames).map_err(|err| {
            sqlite_error(
                rusqlite::ffi::SQLITE_CORRUPT,
                format!("a damaged chunk: {err}"),
            )
        })?;
        count += messages.len();
        newest_first.push(
            messages
                .into_iter()
                .map(|(id, frame)| StoredMessage { id, frame })
                .collect(),
        );
    }
    let mut history: Vec<StoredMessage> = newest_first.into_iter().rev().flatten().collect();
    history.drain(..history.len().saturating_sub(limit));
    Ok(history)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol;

    /// A fresh directory for one test, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir =
                std::env::temp_dir().join(format!("chatroom-unit-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn say(store: &mut Store, health: &StoreHealth, room: &str, id: u64) {
        health.unwritten.fetch_add(1, Ordering::Relaxed);
        let handle = store.handles[room];
        let text = format!("message {id}");
        store.accept(Append {
            room: handle,
            id,
            frame: protocol::encode_message(id, room, "alice", &text, 1000 + id),
        });
    }

    fn number(conn: &Connection, sql: &str) -> i64 {
        conn.query_row(sql, [], |r| r.get(0)).unwrap()
    }

    fn ids(loaded: &LoadedRoom) -> Vec<u64> {
        loaded.history.iter().map(|m| m.id).collect()
    }

    #[test]
    fn a_clean_close_keeps_epoch_ids_and_history() {
        let dir = Scratch::new("clean");
        let health = StoreHealth::default();
        let mut store = open(&dir.0, 100, 1000).unwrap();
        let first = store.load("room", &health);
        assert_eq!((first.last_id, first.history.len()), (0, 0));
        for id in 1..=3 {
            say(&mut store, &health, "room", id);
        }
        store.close(&health);
        assert_eq!(health.written.load(Ordering::Relaxed), 3);
        assert_eq!(health.unwritten.load(Ordering::Relaxed), 0);

        let mut store = open(&dir.0, 100, 1000).unwrap();
        let again = store.load("room", &health);
        assert_eq!(again.epoch, first.epoch);
        assert_eq!(again.last_id, 3);
        assert_eq!(ids(&again), [1, 2, 3]);
        assert!(again.history[2]
            .frame
            .as_str()
            .contains(r#""text":"message 3""#));
    }

    #[test]
    fn an_unclean_end_gives_rooms_a_new_epoch_and_ids_go_on() {
        let dir = Scratch::new("unclean");
        let health = StoreHealth::default();
        let mut store = open(&dir.0, 100, 1000).unwrap();
        let first = store.load("room", &health);
        say(&mut store, &health, "room", 1);
        store.commit(&health).unwrap();
        drop(store); // As if killed: no close, so the run is not marked clean.

        let mut store = open(&dir.0, 100, 1000).unwrap();
        let again = store.load("room", &health);
        assert_ne!(again.epoch, first.epoch);
        assert_eq!(again.last_id, 1);
        assert_eq!(ids(&again), [1]);
    }

    #[test]
    fn retention_keeps_the_newest_and_a_room_without_messages_is_not_written() {
        let dir = Scratch::new("retain");
        let health = StoreHealth::default();
        let mut store = open(&dir.0, 100, 5).unwrap();
        store.load("busy", &health);
        store.load("quiet", &health);
        for id in 1..=12 {
            say(&mut store, &health, "busy", id);
        }
        store.close(&health);

        let conn = Connection::open(dir.0.join(DATABASE_FILE)).unwrap();
        assert_eq!(
            number(&conn, "SELECT COUNT(*) FROM rooms"),
            1,
            "only the room that spoke has a row"
        );
        // The view operators read: room names and ids, not packed keys.
        let kept: Vec<(String, i64)> = conn
            .prepare("SELECT room, id FROM history ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        let expected: Vec<(String, i64)> = (8..=12).map(|id| ("busy".to_owned(), id)).collect();
        assert_eq!(kept, expected);
        let mut store = open(&dir.0, 100, 5).unwrap();
        assert_eq!(ids(&store.load("busy", &health)), [8, 9, 10, 11, 12]);
    }

    #[test]
    fn a_room_reloaded_before_its_commit_includes_pending_messages() {
        let dir = Scratch::new("pending");
        let health = StoreHealth::default();
        let mut store = open(&dir.0, 2, 1000).unwrap();
        let first = store.load("room", &health);
        for id in 1..=3 {
            say(&mut store, &health, "room", id);
        }
        store.forget("room"); // The hub dropped the idle room; its messages are not committed.
        let again = store.load("room", &health);
        assert_eq!(again.epoch, first.epoch);
        assert_eq!((again.last_id, ids(&again)), (3, vec![2, 3]));
    }

    #[test]
    fn history_reads_across_chunks_and_a_long_batch_is_split() {
        let dir = Scratch::new("chunks");
        let health = StoreHealth::default();
        let mut store = open(&dir.0, 50, 100_000).unwrap();
        store.load("room", &health);
        // Three commits of 10, then one backlog of 1,000 (about 90 KiB of frames).
        for commit in 0..3 {
            for id in commit * 10 + 1..=commit * 10 + 10 {
                say(&mut store, &health, "room", id);
            }
            store.commit(&health).unwrap();
        }
        for id in 31..=1030 {
            say(&mut store, &health, "room", id);
        }
        store.close(&health);

        let conn = Connection::open(dir.0.join(DATABASE_FILE)).unwrap();
        let chunks = number(&conn, "SELECT COUNT(*) FROM messages");
        assert!(
            chunks >= 5,
            "3 commits and a split backlog: {chunks} chunks"
        );
        let ids_in_view: Vec<i64> = conn
            .prepare("SELECT id FROM history ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(ids_in_view, (1..=1030).collect::<Vec<i64>>());

        let mut store = open(&dir.0, 50, 100_000).unwrap();
        let loaded = store.load("room", &health);
        assert_eq!(loaded.last_id, 1030);
        assert_eq!(ids(&loaded), (981..=1030).collect::<Vec<u64>>());
        let mut store = open(&dir.0, 25, 100_000).unwrap();
        assert_eq!(
            ids(&store.load("room", &health)),
            (1006..=1030).collect::<Vec<u64>>()
        );
    }

    #[test]
    fn a_database_with_one_row_per_message_is_converted() {
        let dir = Scratch::new("schema1");
        std::fs::create_dir_all(&dir.0).unwrap();
        let conn = Connection::open(dir.0.join(DATABASE_FILE)).unwrap();
        conn.execute_batch(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
             CREATE TABLE rooms (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,
                                 epoch TEXT NOT NULL);
             CREATE TABLE messages (key INTEGER PRIMARY KEY, frame TEXT NOT NULL);
             CREATE VIEW history AS SELECT messages.key & 1099511627775 AS id FROM messages;
             INSERT INTO meta VALUES ('schema', 1), ('clean', 1);
             INSERT INTO rooms VALUES (1, 'room', 'e-old');",
        )
        .unwrap();
        for id in 1..=3u64 {
            let frame = protocol::encode_message(id, "room", "alice", "hi", 1000);
            conn.execute(
                "INSERT INTO messages VALUES (?1, ?2)",
                params![key(1, id), frame.as_str()],
            )
            .unwrap();
        }
        drop(conn);

        let health = StoreHealth::default();
        let mut store = open(&dir.0, 100, 1000).unwrap();
        let loaded = store.load("room", &health);
        assert_eq!((loaded.epoch.as_str(), loaded.last_id), ("e-old", 3));
        assert_eq!(ids(&loaded), [1, 2, 3]);
        say(&mut store, &health, "room", 4);
        store.close(&health);
        let conn = Connection::open(dir.0.join(DATABASE_FILE)).unwrap();
        let (version, texts): (i64, i64) = conn
            .query_row(
                "SELECT (SELECT value FROM meta WHERE key = 'schema'),
                        (SELECT COUNT(*) FROM history WHERE text IS NOT NULL)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((version, texts), (2, 4));
    }

    #[test]
    fn names_and_text_are_only_data() {
        let dir = Scratch::new("data");
        let health = StoreHealth::default();
        let mut store = open(&dir.0, 100, 1000).unwrap();
        let hostile = "x'); DROP TABLE messages; --";
        store.load(hostile, &health);
        say(&mut store, &health, hostile, 1);
        store.close(&health);
        let mut store = open(&dir.0, 100, 1000).unwrap();
        assert_eq!(ids(&store.load(hostile, &health)), [1]);
        assert_eq!(store.load("other", &health).last_id, 0);
    }
}
