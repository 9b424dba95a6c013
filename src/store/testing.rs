//! What the unit tests of every file in `store/` share: a scratch directory, a message said in
//! a room, and a few short readers of the results. Compiled for tests only.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use rusqlite::Connection;

use super::{open, Append, LoadedRoom, Store, StoreHealth};
use crate::protocol;

/// A fresh directory for one test, removed when dropped.
pub(super) struct Scratch(pub(super) PathBuf);

impl Scratch {
    pub(super) fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("chatroom-unit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A store opened on a fresh directory (removed when the [`Scratch`] is dropped), and the
/// health it reports to.
pub(super) fn fresh(
    name: &str,
    history_limit: usize,
    retain: usize,
) -> (Scratch, StoreHealth, Store) {
    let dir = Scratch::new(name);
    let health = StoreHealth::default();
    let store = open(&dir.0, history_limit, retain).unwrap();
    (dir, health, store)
}

/// Hands `room` a message with this id, as the hub would after broadcasting it.
pub(super) fn say(store: &mut Store, health: &StoreHealth, room: &str, id: u64) {
    health.unwritten.fetch_add(1, Ordering::Relaxed);
    let handle = store.handle_of(room);
    let text = format!("message {id}");
    let frame = protocol::encode_message(id, room, "alice", &text, 1000 + id, None);
    health
        .unwritten_bytes
        .fetch_add(frame.len() as u64, Ordering::Relaxed);
    store.accept(Append {
        room: handle,
        id,
        frame,
    });
}

/// The one number `sql` selects.
pub(super) fn number(conn: &Connection, sql: &str) -> i64 {
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

/// The ids of a loaded room's history.
pub(super) fn ids(loaded: &LoadedRoom) -> Vec<u64> {
    loaded.history.iter().map(|m| m.id).collect()
}
