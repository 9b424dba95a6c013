//! The rows: how messages are laid out in the `messages` table, and every read and write of
//! them.
//!
//! Only the store thread ([`super::Store`]) calls in here, with its connection and its cache
//! of rooms ([`CachedRoom`]): [`write_batch`] at each commit, [`read_room`] and
//! [`read_history`] when the hub asks for a room, [`prune`] after each commit and
//! [`trim_to_retain`] at a clean shutdown. The tables themselves are made in `schema.rs`.

use std::collections::HashMap;

use log::warn;
use rusqlite::{params, Connection, OptionalExtension};
use tungstenite::Utf8Bytes;

use super::schema::sqlite_error;
use super::thread::CachedRoom;
use super::{Append, RoomHandle};
use crate::protocol;
use crate::room::StoredMessage;

/// Messages are kept in chunks: one row holds a run of one room's messages from one commit, as
/// a JSON array of their frames. A row per message cost the store 1.9 µs per message in W1, a
/// third of it in pruning; a chunk costs one B-tree insert (and later one delete) per room per
/// commit (bench/NOTES.md). A chunk's key is its room's row and its first id in one integer,
/// `room << 40 | first id`, so the table is SQLite's plain rowid B-tree and reading, pruning
/// and loading a room are range scans on one integer. Ids go up to 2^40 (a room taking 10,000
/// messages a second for three years) and rooms to 2^23; a message beyond either is not
/// written (and is counted as dropped).
const ID_BITS: u32 = 40;
pub(super) const MAX_ID: u64 = (1 << ID_BITS) - 1;
const MAX_ROOM_ROW: i64 = (1 << (63 - ID_BITS)) - 1;

pub(super) fn key(row: i64, id: u64) -> i64 {
    (row << ID_BITS) | id as i64
}

/// A chunk is closed once its frames pass this size, so a long backlog (after the disk failed
/// for a while) is written as many rows, not one huge one.
const CHUNK_BYTES: usize = 64 * 1024;

/// Writes `batch` in one transaction, one chunk per room (more if a room's frames pass
/// [`CHUNK_BYTES`]). Returns the rows created for new rooms (applied to the cache only once
/// the commit succeeded) and how many messages were skipped. On an error nothing is written.
///
/// `BEGIN` and `COMMIT` are cached statements, not rusqlite's `Transaction` (which parses both
/// anew each time): at W2's hundred commits a second that took about 6% off the store thread's CPU.
pub(super) fn write_batch(
    conn: &Connection,
    batch: &[Append],
    rooms: &HashMap<RoomHandle, CachedRoom>,
) -> rusqlite::Result<(Vec<(RoomHandle, i64)>, u64)> {
    conn.prepare_cached("BEGIN")?.execute([])?;
    let written = insert_chunks(conn, batch, rooms)
        .and_then(|done| conn.prepare_cached("COMMIT")?.execute([]).map(|_| done));
    if written.is_err() {
        // A failed COMMIT (a locked or full disk) leaves the transaction open.
        let _ = conn.execute_batch("ROLLBACK");
    }
    written
}

/// The rows of [`write_batch`], inside its transaction.
fn insert_chunks(
    tx: &Connection,
    batch: &[Append],
    rooms: &HashMap<RoomHandle, CachedRoom>,
) -> rusqlite::Result<(Vec<(RoomHandle, i64)>, u64)> {
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

/// A stored room: its row, epoch, first and last ids, and newest `limit` messages.
type RoomOnDisk = (i64, String, u64, u64, Vec<StoredMessage>);

pub(super) fn read_room(
    conn: &Connection,
    room: &str,
    limit: usize,
) -> rusqlite::Result<Option<RoomOnDisk>> {
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
    let history = read_history(conn, row, 0, limit)?;
    Ok(Some((
        row,
        epoch,
        first,
        last.map_or(0, |id| id as u64),
        history,
    )))
}

/// The newest `limit` messages of a room with ids above `after`, oldest first, as they were
/// broadcast.
pub(super) fn read_history(
    conn: &Connection,
    row: i64,
    after: u64,
    limit: usize,
) -> rusqlite::Result<Vec<StoredMessage>> {
    let mut statement = conn.prepare_cached(
        "SELECT frames FROM messages WHERE key BETWEEN ?1 AND ?2 AND last_id > ?3 \
         ORDER BY key DESC",
    )?;
    let chunks = statement.query(params![key(row, 0), key(row, MAX_ID), after as i64])?;
    newest_of(chunks, |id| id > after, limit)
}

/// Up to `count` of a room's newest messages with ids below `before`, oldest first, as they
/// were broadcast: a page of older history.
pub(super) fn read_before(
    conn: &Connection,
    row: i64,
    before: u64,
    count: usize,
) -> rusqlite::Result<Vec<StoredMessage>> {
    // Chunks are keyed by their first id: those starting below `before`, newest first.
    let last = key(row, before.saturating_sub(1).min(MAX_ID));
    let mut statement = conn.prepare_cached(
        "SELECT frames FROM messages WHERE key BETWEEN ?1 AND ?2 ORDER BY key DESC",
    )?;
    let chunks = statement.query(params![key(row, 0), last])?;
    newest_of(chunks, |id| id < before, count)
}

/// The newest `count` messages that `wanted` keeps, from chunks given newest first, oldest
/// first: chunks are read only until there are enough.
fn newest_of(
    mut chunks: rusqlite::Rows<'_>,
    wanted: impl Fn(u64) -> bool,
    count: usize,
) -> rusqlite::Result<Vec<StoredMessage>> {
    let mut newest_first: Vec<Vec<StoredMessage>> = Vec::new();
    let mut found = 0;
    while found < count {
        let Some(chunk) = chunks.next()? else { break };
        let mut messages = split_chunk(chunk.get_ref(0)?.as_str()?)?;
        messages.retain(|(id, _)| wanted(*id));
        found += messages.len();
        newest_first.push(
            messages
                .into_iter()
                .map(|(id, frame)| StoredMessage { id, frame })
                .collect(),
        );
    }
    let mut messages: Vec<StoredMessage> = newest_first.into_iter().rev().flatten().collect();
    messages.drain(..messages.len().saturating_sub(count));
    Ok(messages)
}

/// A chunk's frames with their ids; a row that does not parse is reported as corruption.
fn split_chunk(frames: &str) -> rusqlite::Result<Vec<(u64, Utf8Bytes)>> {
    protocol::split_message_frames(frames).map_err(|err| {
        sqlite_error(
            rusqlite::ffi::SQLITE_CORRUPT,
            format!("a damaged chunk: {err}"),
        )
    })
}

/// Deletes each room's chunks that hold only messages beyond `retain`, once `slack` more
/// have piled up (so pruning is an occasional bulk delete, not one per commit). A chunk
/// that straddles the limit stays whole until [`trim_to_retain`] at shutdown.
pub(super) fn prune(
    conn: &Connection,
    rooms: &mut HashMap<RoomHandle, CachedRoom>,
    retain: u64,
    slack: u64,
) {
    for cached in rooms.values_mut() {
        let Some(row) = cached.row else { continue };
        let keep_from = cached.last_id.saturating_sub(retain);
        if keep_from <= cached.pruned_through + slack || cached.last_id <= retain {
            continue;
        }
        match conn.execute(
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
pub(super) fn trim_to_retain(
    conn: &mut Connection,
    rooms: &HashMap<RoomHandle, CachedRoom>,
    retain: u64,
) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    for cached in rooms.values() {
        let Some(row) = cached.row else { continue };
        let keep_from = cached.last_id.saturating_sub(retain);
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
        let kept: Vec<(u64, Utf8Bytes)> = split_chunk(&frames)?
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

#[cfg(test)]
mod tests {
    use super::super::testing::{fresh, ids, number, say};
    use super::super::{open, DATABASE_FILE};
    use super::*;

    #[test]
    fn retention_keeps_the_newest_and_a_room_without_messages_is_not_written() {
        let (dir, health, mut store) = fresh("retain", 100, 5);
        store.load("busy", &health);
        store.load("quiet", &health);
        for id in 1..=12 {
            say(&mut store, &health, "busy", id);
        }
        store.close(&health, true);

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
    fn history_reads_across_chunks_and_a_long_batch_is_split() {
        let (dir, health, mut store) = fresh("chunks", 50, 100_000);
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
        store.close(&health, true);

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
}
