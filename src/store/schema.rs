//! The database file: opening it, its settings and tables, the conversion from schema 1, the
//! clean/unclean mark, and [`backup`].
//!
//! [`super::open`] calls [`open_database`] in the server's starting thread, so a file that cannot
//! be used stops start-up with its path and the reason; the store thread marks the run clean
//! ([`mark_clean`]) as the last thing it does. `chatroom backup` (`src/main.rs`) calls
//! [`backup`], beside a running server or not. The rows themselves are `chunks.rs`'s business.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use log::{info, warn};
use rusqlite::{Connection, OpenFlags};

use super::{COMMIT_INTERVAL, DATABASE_FILE};
use crate::room::EpochSource;

/// How long SQLite waits for a lock held by another process (a backup tool, a `sqlite3` shell)
/// before a statement fails. Short, so the store never sits on a lock for long.
const BUSY_TIMEOUT: Duration = Duration::from_millis(250);

/// The most the WAL file keeps between checkpoints (bytes): SQLite's default checkpoint at
/// 1,000 pages is 4 MiB of WAL; a larger batch may grow it for a while.
const JOURNAL_SIZE_LIMIT: i64 = 4 * 1024 * 1024;

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

/// Opens (creating if needed) `dir/chatroom.db`, checks it can be written, and recovers from an
/// unclean end of the previous run, giving rooms epochs made by `epochs`. Returns the
/// connection and the file's path, absolute when it can be. Every error names that path.
pub(super) fn open_database(dir: &Path, epochs: &EpochSource) -> io::Result<(Connection, PathBuf)> {
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
    let conn = Connection::open(&path).map_err(|err| fail("open", &describe(&err, &path)))?;
    if conn.is_readonly(rusqlite::MAIN_DB).unwrap_or(true) {
        return Err(fail("write", &"the file is read-only"));
    }
    prepare(&conn, epochs).map_err(|err| fail("use", &describe(&err, &path)))?;
    Ok((conn, path))
}

/// A file written and removed to learn whether the disk has room, when SQLite only says
/// "disk I/O error" (it does when the disk is full as it extends its shared-memory file).
const SPACE_PROBE: &str = ".chatroom-space-probe";
/// What the probe writes: one page, as SQLite would.
const SPACE_PROBE_BYTES: usize = 4096;

/// An error of the database at `path` in words an operator can act on: a full disk is called
/// that, with the directory it is in, whether SQLite said "database or disk is full" or only
/// "disk I/O error" (then a small write beside the file tells).
pub(super) fn describe(err: &rusqlite::Error, path: &Path) -> String {
    let dir = path.parent().unwrap_or(Path::new("."));
    let full = match err.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DiskFull) => true,
        Some(rusqlite::ErrorCode::SystemIoFailure) => disk_is_full(dir),
        _ => false,
    };
    if full {
        format!("the disk holding {} is full ({err})", dir.display())
    } else {
        err.to_string()
    }
}

/// Whether writing one page in `dir` fails for want of space.
fn disk_is_full(dir: &Path) -> bool {
    use std::io::Write;
    let probe = dir.join(SPACE_PROBE);
    let written = std::fs::File::create(&probe).and_then(|mut file| {
        file.write_all(&[0; SPACE_PROBE_BYTES])?;
        file.sync_all()
    });
    let _ = std::fs::remove_file(&probe);
    matches!(written, Err(err) if err.kind() == io::ErrorKind::StorageFull)
}

/// Settings, schema, and the crash check, in the caller's thread (so errors stop start-up).
fn prepare(conn: &Connection, epochs: &EpochSource) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // WAL: readers (a backup) never block the writer. synchronous=NORMAL: a commit is in the
    // OS's hands at once (safe from a killed process) but not fsynced each time; a power cut
    // can lose the last commits, never corrupt the file.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // A big commit grows the WAL; after the next checkpoint it is cut back to this, so the
    // files stay near the pages in use (the disk budget, `disk.rs`).
    conn.pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT)?;

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

/// Marks the run clean: every message handed to the store is on disk. Called last, after the
/// final commit; [`prepare`] clears the mark at the next start.
pub(super) fn mark_clean(conn: &Connection) -> rusqlite::Result<usize> {
    conn.execute("UPDATE meta SET value = 1 WHERE key = 'clean'", [])
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

/// An error of ours in SQLite's terms, so it is reported like SQLite's own.
pub(super) fn sqlite_error(code: std::ffi::c_int, message: String) -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), Some(message))
}

#[cfg(test)]
mod tests {
    use rusqlite::params;

    use super::super::chunks::key;
    use super::super::testing::{fresh, ids, say, Scratch};
    use super::super::{open, StoreHealth};
    use super::*;
    use crate::protocol;

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
            let frame = protocol::encode_message(id, "room", "alice", "hi", 1000, None);
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
        store.close(&health, true);
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
    fn a_full_disk_is_called_that_with_its_directory() {
        let path = Path::new("/srv/chat/chatroom.db");
        let full = sqlite_error(
            rusqlite::ffi::SQLITE_FULL,
            "database or disk is full".into(),
        );
        let said = describe(&full, path);
        assert!(
            said.starts_with("the disk holding /srv/chat is full"),
            "{said}"
        );
        let other = sqlite_error(rusqlite::ffi::SQLITE_BUSY, "database is locked".into());
        assert_eq!(describe(&other, path), "database is locked");
    }

    #[test]
    fn an_unclean_end_gives_rooms_a_new_epoch_and_ids_go_on() {
        let (dir, health, mut store) = fresh("unclean", 100, 1000);
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
}
