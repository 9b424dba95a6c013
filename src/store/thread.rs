//! The store thread: [`run`], its loop over the hub's commands, and its state, [`Store`]: the
//! connection, the rooms the hub holds in memory, and the batch of messages not yet committed.
//!
//! The server's starting thread calls [`open`] (so a bad file stops start-up) and hands the
//! [`Store`] to the thread it spawns for [`run`]. The hub talks to it only through the queues
//! of [`super::StoreLink`]; the loaded rooms go back through the `deliver` function. The SQL
//! is elsewhere: the file in `schema.rs`, the rows in `chunks.rs`.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use log::{error, info, warn};
use rusqlite::Connection;

use super::chunks::{self, read_before, read_history, read_room, write_batch};
use super::disk::DiskBudget;
use super::queue::Taken;
use super::{
    schema, Append, LoadedRoom, RoomHandle, StoreCommand, StoreHealth, StoreInbox, StoreState,
};
use crate::room::{ClientId, EpochSource, StoredMessage};

/// With nothing to do and nothing failing, the store still checks its queue this often (the
/// wait needs a deadline); nothing happens then.
const IDLE_WAKE: Duration = Duration::from_secs(3600);
/// Pauses between attempts after a failed commit: doubling from the first to the last.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(1);
/// At shutdown, a failing disk gets this many more attempts before pending messages are lost.
const SHUTDOWN_ATTEMPTS: u32 = 3;

/// What the store remembers of a room the hub holds in memory.
pub(super) struct CachedRoom {
    pub(super) name: String,
    /// Its row in `rooms`; `None` until its first message is committed, so visiting a room
    /// without speaking writes nothing.
    pub(super) row: Option<i64>,
    pub(super) epoch: String,
    /// The newest id handed to the store (committed or pending).
    pub(super) last_id: u64,
    /// Ids up to this one have been pruned (or never existed).
    pub(super) pruned_through: u64,
    /// False when the room could not be read: its ids may clash with stored ones, so its
    /// messages are not written.
    pub(super) persist: bool,
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
    /// `--max-disk` and the pruning that keeps the database within it.
    disk: DiskBudget,
    /// See [`crate::config::CrashForTests::StoreOnLoad`].
    crash_on_load: Option<String>,
}

/// Opens (creating if needed) `dir/chatroom.db`, checks it can be written, and recovers from an
/// unclean end of the previous run. Every error names the database's path.
pub fn open(dir: &Path, history_limit: usize, retain: usize) -> io::Result<Store> {
    let epochs = EpochSource::new();
    let (conn, path) = schema::open_database(dir, &epochs)?;
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
        disk: DiskBudget::new(retain as u64, history_limit as u64),
        crash_on_load: None,
    })
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
    store.disk.measure(&store.conn, &store.path, health);
    // Set after a failed commit: when to try again.
    let mut retry_at: Option<Instant> = None;
    // Whether the hub ended the store itself (Shutdown), having handed over every message.
    let mut told_to_stop = false;
    'serve: loop {
        // Only commands wake the store (and a retry's time, and a disk pass under way, which
        // goes on between commands): appends just wait in their channel.
        let disk_work = store.disk.pass_pending();
        let deadline = match (disk_work, retry_at) {
            (true, _) => Instant::now(),
            (false, Some(at)) => at,
            (false, None) => Instant::now() + IDLE_WAKE,
        };
        let deadline = store
            .disk
            .measure_due_at()
            .map_or(deadline, |at| at.min(deadline));
        let commands = match inbox.commands.take_all(deadline) {
            Taken::Items(commands) => commands,
            Taken::TimedOut if retry_at.is_some() => [StoreCommand::Commit].into(),
            Taken::TimedOut => Vec::new(),
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
                StoreCommand::ReadSince {
                    room,
                    after,
                    client,
                } => {
                    let loaded = store.read_since(&room, after, client, health);
                    if !deliver(room, loaded) {
                        break 'serve;
                    }
                }
                StoreCommand::ReadBefore {
                    room,
                    before,
                    limit,
                    reply,
                } => {
                    let (page, more) = store.read_before(&room, before, limit, health);
                    reply(page, more);
                }
                StoreCommand::Forget { room } => store.forget(&room),
                StoreCommand::DiskBudget(max) => {
                    store.disk.set_max(max);
                    store.disk.measure(&store.conn, &store.path, health);
                }
                StoreCommand::Shutdown => {
                    told_to_stop = true;
                    break 'serve;
                }
            }
        }
        if disk_work {
            store.disk_turn(health);
        }
        store.disk.measure_if_due(&store.conn, &store.path, health);
    }
    // Appends sent after the last command are still waiting: write them too.
    for append in inbox.appends.try_iter() {
        store.accept(append);
    }
    store.close(health, told_to_stop);
}

impl Store {
    /// The room's state for the hub: from the cache when the hub dropped it and comes back
    /// before the store forgot it, else from disk, else new.
    pub(super) fn load(&mut self, room: &str, health: &StoreHealth) -> LoadedRoom {
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
            let mut history = match row.map(|row| read_history(&self.conn, row, 0, limit)) {
                Some(Ok(history)) => history,
                None => Vec::new(),
                Some(Err(err)) => {
                    // Counted, not `failing`: that state says the disk refuses writes.
                    error!("cannot read a room's history; it is served without it: {err}");
                    health.read_errors.fetch_add(1, Ordering::Relaxed);
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
                resume_of: None,
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
            resume_of: None,
        };
        self.handles.insert(room.to_owned(), handle);
        self.rooms.insert(handle, cached);
        loaded
    }

    /// The newest `--history` messages after `after` of a room the hub holds, committed or
    /// pending, for `client`'s welcome. Empty if the room is unknown or its history unreadable
    /// (the client then gets what memory holds).
    pub(super) fn read_since(
        &mut self,
        room: &str,
        after: u64,
        client: ClientId,
        health: &StoreHealth,
    ) -> LoadedRoom {
        let limit = self.history_limit;
        let cached = self
            .handles
            .get(room)
            .and_then(|h| Some((*h, self.rooms.get(h)?)));
        let Some((handle, cached)) = cached else {
            return LoadedRoom {
                handle: 0,
                epoch: String::new(),
                last_id: 0,
                history: Vec::new(),
                resume_of: Some(client),
            };
        };
        let mut history = match cached.row.filter(|_| cached.persist) {
            None => Vec::new(),
            Some(row) => read_history(&self.conn, row, after, limit).unwrap_or_else(|err| {
                error!("cannot read a room's history for a resume: {err}");
                health.read_errors.fetch_add(1, Ordering::Relaxed);
                Vec::new()
            }),
        };
        history.extend(
            self.pending
                .iter()
                .filter(|m| m.room == handle && m.id > after)
                .map(|m| StoredMessage {
                    id: m.id,
                    frame: m.frame.clone(),
                }),
        );
        let skip = history.len().saturating_sub(limit);
        history.drain(..skip);
        LoadedRoom {
            handle,
            epoch: cached.epoch.clone(),
            last_id: cached.last_id,
            history,
            resume_of: Some(client),
        }
    }

    /// Up to `limit` messages of a room below id `before`, committed or pending, oldest first,
    /// and whether older ones exist. A room the store does not know, or cannot read, gives
    /// what it has (the error logged and counted).
    pub(super) fn read_before(
        &mut self,
        room: &str,
        before: u64,
        limit: usize,
        health: &StoreHealth,
    ) -> (Vec<StoredMessage>, bool) {
        let Some(&handle) = self.handles.get(room) else {
            return (Vec::new(), false);
        };
        let Some(cached) = self.rooms.get(&handle) else {
            return (Vec::new(), false);
        };
        // One more than asked for: whether it exists is `more`.
        let wanted = limit + 1;
        let mut page = match cached.row.filter(|_| cached.persist) {
            None => Vec::new(),
            Some(row) => read_before(&self.conn, row, before, wanted).unwrap_or_else(|err| {
                error!("cannot read a page of a room's history: {err}");
                health.read_errors.fetch_add(1, Ordering::Relaxed);
                Vec::new()
            }),
        };
        page.extend(
            self.pending
                .iter()
                .filter(|m| m.room == handle && m.id < before)
                .map(|m| StoredMessage {
                    id: m.id,
                    frame: m.frame.clone(),
                }),
        );
        page.sort_by_key(|m| m.id);
        page.dedup_by_key(|m| m.id);
        page.drain(..page.len().saturating_sub(wanted));
        let more = page.len() > limit;
        if more {
            page.remove(0);
        }
        (page, more)
    }

    /// One bounded turn of the disk budget's pass.
    fn disk_turn(&mut self, health: &StoreHealth) {
        self.disk
            .turn(&mut self.conn, &self.path, &mut self.rooms, health);
    }

    /// The bytes of the frames handed over and not yet committed.
    fn pending_bytes(&self) -> u64 {
        self.pending.iter().map(|m| m.frame.len() as u64).sum()
    }

    pub(super) fn accept(&mut self, message: Append) {
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

    pub(super) fn forget(&mut self, room: &str) {
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
        health.set_error(Some(schema::describe(err, &self.path)));
    }

    /// Commits the pending batch in one transaction. On failure nothing is committed and the
    /// batch stays pending for the next attempt.
    pub(super) fn commit(&mut self, health: &StoreHealth) -> Result<(), ()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let batch = self.pending.len() as u64;
        let batch_bytes = self.pending_bytes();
        match write_batch(&self.conn, &self.pending, &self.rooms) {
            Ok((new_rows, skipped)) => {
                for (handle, row) in new_rows {
                    if let Some(cached) = self.rooms.get_mut(&handle) {
                        cached.row = Some(row);
                    }
                }
                self.pending.clear();
                health.unwritten.fetch_sub(batch, Ordering::Relaxed);
                health
                    .unwritten_bytes
                    .fetch_sub(batch_bytes, Ordering::Relaxed);
                health.written.fetch_add(batch - skipped, Ordering::Relaxed);
                health.dropped.fetch_add(skipped, Ordering::Relaxed);
                if health.state() == StoreState::Failing {
                    info!("the history database is writable again; {batch} messages written");
                }
                health.set_state(StoreState::Ok);
                health.set_error(None);
                self.retry_after = RETRY_FIRST;
                self.forget_committed();
                let keep = self.disk.keep();
                chunks::prune(&self.conn, &mut self.rooms, keep, keep / 10 + 100);
                self.disk
                    .measure_after_commit(&self.conn, &self.path, health);
                Ok(())
            }
            Err(err) => {
                if health.state() != StoreState::Failing {
                    error!(
                        "cannot write history to {}: {}; chat goes on from memory and \
                         the write is retried",
                        self.path.display(),
                        schema::describe(&err, &self.path)
                    );
                }
                self.failed(health, &err);
                Err(())
            }
        }
    }

    /// The end: commit what is pending (a failing disk gets a few more tries), prune to the
    /// exact limit, and mark the run clean if nothing was lost. A hub that ended without
    /// telling the store (it died) may have broadcast a message it never handed over, whose id
    /// the next run would give again: that run is not marked clean, so its rooms get new epochs.
    pub(super) fn close(mut self, health: &StoreHealth, hub_stopped_cleanly: bool) {
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
            health
                .unwritten_bytes
                .fetch_sub(self.pending_bytes(), Ordering::Relaxed);
            health.dropped.fetch_add(lost, Ordering::Relaxed);
            return; // Not marked clean: the next start gives rooms new epochs.
        }
        chunks::prune(&self.conn, &mut self.rooms, self.retain, 0);
        if let Err(err) = chunks::trim_to_retain(&mut self.conn, &self.rooms, self.retain) {
            warn!("cannot trim history to --retain: {err}");
        }
        if !hub_stopped_cleanly {
            error!("the hub ended without stopping the store: the run is not marked clean");
            return;
        }
        match schema::mark_clean(&self.conn) {
            Ok(_) => info!("history written to {}", self.path.display()),
            Err(err) => error!("cannot mark the history database clean: {err}"),
        }
    }
}

/// For the tests of every file here: they speak in a room by its name.
#[cfg(test)]
impl Store {
    pub(super) fn handle_of(&self, room: &str) -> RoomHandle {
        self.handles[room]
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{fresh, ids, say};
    use super::*;

    #[test]
    fn a_clean_close_keeps_epoch_ids_and_history() {
        let (dir, health, mut store) = fresh("clean", 100, 1000);
        let first = store.load("room", &health);
        assert_eq!((first.last_id, first.history.len()), (0, 0));
        for id in 1..=3 {
            say(&mut store, &health, "room", id);
        }
        store.close(&health, true);
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
    fn a_room_reloaded_before_its_commit_includes_pending_messages() {
        let (_dir, health, mut store) = fresh("pending", 2, 1000);
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
    fn names_and_text_are_only_data() {
        let (dir, health, mut store) = fresh("data", 100, 1000);
        let hostile = "x'); DROP TABLE messages; --";
        store.load(hostile, &health);
        say(&mut store, &health, hostile, 1);
        store.close(&health, true);
        let mut store = open(&dir.0, 100, 1000).unwrap();
        assert_eq!(ids(&store.load(hostile, &health)), [1]);
        assert_eq!(store.load("other", &health).last_id, 0);
    }
}
