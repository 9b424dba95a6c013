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
//! The database keeps within `--max-disk`: after each commit the store measures the pages in use,
//! and past the budget it lowers how many messages each room keeps, pruning the biggest rooms'
//! oldest chunks a bounded number of rooms at a time (`disk.rs`).
//!
//! What can be lost: nothing at a clean shutdown ([`run`] commits before it returns); after a
//! SIGKILL, at most the last commit interval. A run that did not end cleanly leaves a mark, and
//! the next start gives every room a new epoch, so browsers reload the history instead of
//! trusting ids that the lost messages had used.
//!
//! Room names and message text are only ever SQL parameters, and the file name is fixed.
//!
//! # Layout
//! - this file: what the hub sees: the link and its two queues, the commands, [`Append`],
//!   [`LoadedRoom`], the limits the hub obeys.
//! - `thread.rs`: the thread: [`run`] and its state, [`Store`]: the rooms the hub holds, the
//!   pending batch, commit and retry, the clean close.
//! - `chunks.rs`: the rows: packed keys, a batch written as chunks, a room read back, pruning
//!   to `--retain`.
//! - `schema.rs`: the file: opening it, its tables, the conversion from schema 1, the
//!   clean/unclean mark, and [`backup`].
//! - `disk.rs`: the disk budget: the bytes in use, and the passes that prune to fit.
//! - `health.rs`: [`StoreHealth`], what `/healthz` reports; the hub and the store write it.
//! - `queue.rs`: the command queue, a `Mutex` and a `Condvar`, so an idle store sleeps at once.

mod chunks;
mod disk;
mod health;
mod queue;
mod schema;
#[cfg(test)]
mod testing;
mod thread;

use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use tungstenite::Utf8Bytes;

use crate::room::{ClientId, StoredMessage};

pub use health::{StoreHealth, StoreState};
pub use schema::backup;
pub use thread::{open, run, Store};

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

/// What the hub asks of the store, besides writing messages.
pub enum StoreCommand {
    /// Read a room's epoch, last id and newest `history` messages, and send them to the hub.
    Load {
        room: String,
    },
    /// Read a room's newest `--history` messages after id `after`, for `client`, who resumes
    /// with `since` in a room whose memory dropped them to fit the memory budget. Answered
    /// like a `Load`, with [`LoadedRoom::resume_of`] naming the client.
    ReadSince {
        room: String,
        after: u64,
        client: ClientId,
    },
    /// The hub no longer holds this room in memory; the store may forget its cached state.
    /// A page of older history for one client: up to `limit` messages of `room` with ids
    /// below `before`, answered through `reply` (with whether older ones exist), on the store
    /// thread. The hub makes `reply`; the store knows nothing of clients.
    ReadBefore {
        room: String,
        before: u64,
        limit: usize,
        reply: HistoryReply,
    },
    Forget {
        room: String,
    },
    /// The database's budget in bytes (`--max-disk`; `None`: no limit). The hub sends it first.
    DiskBudget(Option<u64>),
    /// Commit the appends sent so far (the hub sends it [`ASK_TO_COMMIT_AFTER`] after the first).
    Commit,
    /// Commit everything, then end.
    Shutdown,
}

/// The hub's side of the store's two queues: a crossbeam channel for appends (never read until
/// a command comes) and a condvar queue for commands.
pub struct StoreLink {
    appends: Sender<Append>,
    commands: queue::Sender<StoreCommand>,
}

/// The store thread's side.
pub struct StoreInbox {
    appends: Receiver<Append>,
    commands: queue::Receiver<StoreCommand>,
}

/// Makes the channels between the hub and the store.
pub fn channels() -> (StoreLink, StoreInbox) {
    let (appends_tx, appends_rx) = crossbeam_channel::unbounded();
    // Commands go through a condvar queue, not a crossbeam channel: a crossbeam receiver that
    // finds nothing calls `sched_yield` a few times before it sleeps, and the store doing that
    // after each of its 100 commits a second cost W1 12-27% on p99 (bench/NOTES.md). Unbounded:
    // a refused Load would leave a room waiting for ever.
    let (commands_tx, commands_rx) = queue::queue();
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
        self.commands.push(command)
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

/// Where the answer to [`StoreCommand::ReadBefore`] goes: the page (oldest first), and whether
/// older messages exist.
pub type HistoryReply = Box<dyn FnOnce(Vec<StoredMessage>, bool) + Send>;

/// A room as found on disk (or new), ready for the hub.
#[derive(Debug)]
pub struct LoadedRoom {
    /// What [`Append`]s for this room carry.
    pub handle: RoomHandle,
    pub epoch: String,
    pub last_id: u64,
    /// The newest messages, oldest first.
    pub history: Vec<StoredMessage>,
    /// `Some(client)` when this answers a [`StoreCommand::ReadSince`]: `history` is then the
    /// messages after that client's `since`, for its welcome, and the room is already in memory.
    pub resume_of: Option<ClientId>,
}
