//! The store's health as `/healthz` tells it: [`StoreHealth`] and its [`StoreState`].
//!
//! Shared, behind the server's `Arc`: the hub counts what it hands over (`unwritten`) and what
//! it refuses (`dropped`); the store thread ([`super::Store`]) counts what it writes and sets
//! the state and the last error; HTTP ([`crate::http`]) only reads.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;

/// The store's state as `/healthz` tells it. The hub and the store thread write it; HTTP reads.
#[derive(Default)]
pub struct StoreHealth {
    state: AtomicU8,
    /// Messages committed since start.
    pub written: AtomicU64,
    /// Messages handed to the store and not yet committed.
    pub unwritten: AtomicU64,
    /// Their frames' bytes: while the disk fails they wait in memory, so the hub bounds them
    /// by the memory budget too, not by their count alone.
    pub unwritten_bytes: AtomicU64,
    /// Messages that will never be written: the backlog was full, their room could not be
    /// read, or the disk was still failing at shutdown.
    pub dropped: AtomicU64,
    /// Reads of a room's history that failed: each one logged, and the room served with what
    /// memory still held, so the count tells an operator that a history may have a hole.
    pub read_errors: AtomicU64,
    /// Bytes of history held in memory (rooms with members and the idle rooms' cache), kept by
    /// the hub, against `--memory-budget`.
    pub memory_bytes: AtomicU64,
    /// Bytes of the history database's pages in use, kept by the store after each commit,
    /// against `--max-disk` (see `disk.rs` for why pages in use, not the file's size).
    pub disk_bytes: AtomicU64,
    /// Bytes the database's files take on disk (the file and its WAL), kept with `disk_bytes`.
    pub disk_file_bytes: AtomicU64,
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

    pub(super) fn set_state(&self, state: StoreState) {
        let value = match state {
            StoreState::Memory => 0,
            StoreState::Ok => 1,
            StoreState::Failing => 2,
        };
        self.state.store(value, Ordering::Relaxed);
    }

    pub(super) fn set_disk(&self, used: u64, files: u64) {
        self.disk_bytes.store(used, Ordering::Relaxed);
        self.disk_file_bytes.store(files, Ordering::Relaxed);
    }

    pub fn error(&self) -> Option<String> {
        self.error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub(super) fn set_error(&self, error: Option<String>) {
        *self
            .error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = error;
    }
}
