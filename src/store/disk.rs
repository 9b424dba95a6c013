//! The disk budget (`--max-disk`): the bytes the database uses, and the passes that prune it
//! back within budget when it grows past it.
//!
//! **What counts**: the pages in use, `(page_count - freelist_count) * page_size`. SQLite never
//! shrinks its file without `VACUUM`: pages freed by pruning go on a free list and the next
//! writes reuse them, so the file stops growing once the pages in use stop growing, and stays at
//! its largest size. A budget on the file itself could never be met again after one overshoot
//! (or after lowering `--max-disk`) without rewriting the whole file; a budget on the pages in
//! use is met within one commit's overshoot, and the file then stays within the budget plus
//! what it held before and the WAL (bounded by `journal_size_limit`, `schema.rs`).
//! `chatroom backup` writes a compacted copy for an operator who wants the space back.
//!
//! **What is pruned first**: every room keeps its newest `level` messages on disk, where the
//! level starts at `--retain`. After a commit that leaves the database past its budget, the
//! store walks every room (a bounded number per turn, so commits and loads are never held up
//! for long) and deletes the chunks that hold only messages older than the newest `level`.
//! If the database is still past its budget after a whole pass, the level drops to three
//! quarters of the biggest room's count and another pass begins. So the rooms with the most
//! messages lose their oldest first, small rooms lose nothing, and a room's newest `--history`
//! messages (what a welcome replays) go only once every room is down to `--history` and the
//! budget is still not met. A room's newest chunk is never deleted (its last id, and so its
//! ids, live there). The level stays lowered (the ordinary pruning after each commit uses it
//! too, so the rooms do not grow past it again), and goes back to `--retain` when the database
//! is under half its budget or at the next start.

use std::collections::HashMap;
use std::path::Path;

use log::{error, info, warn};
use rusqlite::{params, Connection, OptionalExtension};

use super::chunks::{key, MAX_ID};
use super::thread::CachedRoom;
use super::{RoomHandle, StoreHealth};

/// Rooms a pass visits per turn: each costs two index lookups and at most one range delete, so a
/// turn takes milliseconds, and a command waiting behind it waits no longer.
const ROOMS_PER_TURN: usize = 64;

/// After a commit the database is measured at most this often: three pragmas and two `stat`s
/// after each of fifty commits a second cost the store thread measurably (W2 in BENCHMARKS.md),
/// and the budget may be overshot by a quarter second's writes instead of one commit's.
const MEASURE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

/// The bytes of the database's pages in use (the free list excluded).
pub(super) fn used_bytes(conn: &Connection) -> rusqlite::Result<u64> {
    let pragma = |name: &str| -> rusqlite::Result<u64> {
        conn.prepare_cached(&format!("PRAGMA {name}"))?
            .query_row([], |r| r.get::<_, i64>(0))
            .map(|n| n.max(0) as u64)
    };
    let pages = pragma("page_count")?.saturating_sub(pragma("freelist_count")?);
    Ok(pages * pragma("page_size")?)
}

/// The bytes the database's files take: the file and its WAL.
pub(super) fn file_bytes(path: &Path) -> u64 {
    let size = |path: &Path| std::fs::metadata(path).map_or(0, |m| m.len());
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    size(path) + size(Path::new(&wal))
}

/// The budget's state in the store thread.
pub(super) struct DiskBudget {
    max: Option<u64>,
    /// `--retain`: the level to go back to.
    retain: u64,
    /// `--history`: the level passes do not go below while any room holds more.
    history: u64,
    /// Messages each room keeps on disk at most, now.
    level: u64,
    /// The pass under way, if the database is past its budget.
    pass: Option<Pass>,
    /// Set when even one message per room does not fit, so that is logged once.
    gave_up: bool,
    /// When the database was last measured.
    measured_at: Option<std::time::Instant>,
    /// A commit since then was not measured (it came too soon).
    unmeasured: bool,
}

struct Pass {
    /// The next room row to visit.
    next_row: i64,
    /// The most messages a visited room kept.
    largest: u64,
}

impl DiskBudget {
    pub(super) fn new(retain: u64, history: u64) -> Self {
        DiskBudget {
            max: None,
            retain,
            history: history.max(1),
            level: retain,
            pass: None,
            gave_up: false,
            measured_at: None,
            unmeasured: false,
        }
    }

    /// Measures the database after a commit, unless it was measured less than
    /// [`MEASURE_INTERVAL`] ago.
    pub(super) fn measure_after_commit(
        &mut self,
        conn: &Connection,
        path: &Path,
        health: &StoreHealth,
    ) {
        if self
            .measured_at
            .is_some_and(|at| at.elapsed() < MEASURE_INTERVAL)
        {
            self.unmeasured = true;
            return;
        }
        self.measure(conn, path, health);
    }

    /// When a commit is still to be measured: the store thread wakes then to measure it
    /// ([`DiskBudget::measure_if_due`]), so the last burst before a quiet spell is counted.
    pub(super) fn measure_due_at(&self) -> Option<std::time::Instant> {
        self.unmeasured
            .then(|| self.measured_at.map(|at| at + MEASURE_INTERVAL))
            .flatten()
    }

    /// Measures a commit that came too soon after the last measure, once that is long enough
    /// ago.
    pub(super) fn measure_if_due(&mut self, conn: &Connection, path: &Path, health: &StoreHealth) {
        if self
            .measure_due_at()
            .is_some_and(|at| std::time::Instant::now() >= at)
        {
            self.measure(conn, path, health);
        }
    }

    pub(super) fn set_max(&mut self, max: Option<u64>) {
        self.max = max;
    }

    /// Messages a room keeps on disk: `--retain`, or fewer while the budget demands it.
    pub(super) fn keep(&self) -> u64 {
        self.level.min(self.retain)
    }

    /// Whether a pass has rooms left to visit.
    pub(super) fn pass_pending(&self) -> bool {
        self.pass.is_some()
    }

    /// Measures the database, publishes it, and starts a pass if it is past its budget.
    pub(super) fn measure(&mut self, conn: &Connection, path: &Path, health: &StoreHealth) {
        self.measured_at = Some(std::time::Instant::now());
        self.unmeasured = false;
        let used = match used_bytes(conn) {
            Ok(used) => used,
            Err(err) => {
                warn!("cannot measure the history database: {err}");
                return;
            }
        };
        health.set_disk(used, file_bytes(path));
        let Some(max) = self.max else { return };
        if used > max {
            if self.pass.is_none() && !self.gave_up {
                self.pass = Some(Pass {
                    next_row: 0,
                    largest: 0,
                });
            }
        } else if used < max / 2 && self.level < self.retain {
            info!("the history database is under half its budget: rooms keep --retain again");
            self.level = self.retain;
            self.gave_up = false;
        }
    }

    /// One turn of the pass: prunes up to [`ROOMS_PER_TURN`] rooms to the level, in one
    /// transaction. At the end of a pass, measures again, and lowers the level for another
    /// pass if the budget is still not met.
    pub(super) fn turn(
        &mut self,
        conn: &mut Connection,
        path: &Path,
        rooms: &mut HashMap<RoomHandle, CachedRoom>,
        health: &StoreHealth,
    ) {
        let Some(pass) = &mut self.pass else { return };
        let level = self.level;
        let visited = match prune_rooms(conn, pass, level, rooms) {
            Ok(visited) => visited,
            Err(err) => {
                // The next commit measures again and starts over.
                warn!("cannot prune the history database to its budget: {err}");
                self.pass = None;
                return;
            }
        };
        if visited == ROOMS_PER_TURN {
            return;
        }
        let largest = pass.largest;
        self.pass = None;
        self.measure(conn, path, health);
        if self.pass.is_none() {
            return; // Within budget.
        }
        let basis = largest.min(level);
        let mut next = basis * 3 / 4;
        if basis > self.history {
            next = next.max(self.history);
        }
        let next = next.max(1);
        if next >= level {
            self.pass = None;
            self.gave_up = true;
            error!(
                "the history database is past --max-disk with one message per room; \
                 it cannot be pruned further"
            );
            return;
        }
        if next < self.history && level >= self.history {
            warn!(
                "the history database is past --max-disk with {} messages per room: \
                 rooms now keep fewer than --history on disk",
                self.history
            );
        }
        self.level = next;
    }
}

/// Visits up to [`ROOMS_PER_TURN`] rooms from `pass.next_row`, deleting each one's chunks that
/// hold only messages older than its newest `level`. Returns how many rooms it visited.
fn prune_rooms(
    conn: &mut Connection,
    pass: &mut Pass,
    level: u64,
    rooms: &mut HashMap<RoomHandle, CachedRoom>,
) -> rusqlite::Result<usize> {
    let tx = conn.transaction()?;
    let rows: Vec<i64> = tx
        .prepare_cached("SELECT id FROM rooms WHERE id >= ?1 ORDER BY id LIMIT ?2")?
        .query_map(params![pass.next_row, ROOMS_PER_TURN as i64], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for &row in &rows {
        let range = [key(row, 0), key(row, MAX_ID)];
        let last: Option<i64> = tx
            .prepare_cached(
                "SELECT last_id FROM messages WHERE key BETWEEN ?1 AND ?2 \
                 ORDER BY key DESC LIMIT 1",
            )?
            .query_row(range, |r| r.get(0))
            .optional()?;
        let Some(last) = last.map(|id| id as u64) else {
            continue;
        };
        let first: i64 = tx
            .prepare_cached("SELECT MIN(key) FROM messages WHERE key BETWEEN ?1 AND ?2")?
            .query_row(range, |r| r.get(0))?;
        let first = first as u64 & MAX_ID;
        let mut count = last.saturating_sub(first) + 1;
        if count > level {
            let keep_from = last - level;
            tx.execute(
                "DELETE FROM messages WHERE key BETWEEN ?1 AND ?2 AND last_id <= ?3",
                params![key(row, 0), key(row, keep_from), keep_from as i64],
            )?;
            count = level;
            if let Some(cached) = rooms.values_mut().find(|c| c.row == Some(row)) {
                cached.pruned_through = cached.pruned_through.max(keep_from);
            }
        }
        pass.largest = pass.largest.max(count);
    }
    tx.commit()?;
    if let Some(last) = rows.last() {
        pass.next_row = last + 1;
    }
    Ok(rows.len())
}
