//! The bus's state as `/healthz` tells it: [`BusHealth`].
//!
//! Shared behind the server's `Arc`: the bus thread and the follower thread
//! ([`crate::cluster`]) write it after each talk with Redis; HTTP only reads.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

/// Whether this process uses Redis, and whether Redis answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusState {
    /// No `--redis`: one process alone.
    Off,
    Up,
    /// The last command failed: says are refused (`unavailable`) until Redis answers again.
    Down,
}

impl BusState {
    pub fn as_str(self) -> &'static str {
        match self {
            BusState::Off => "off",
            BusState::Up => "up",
            BusState::Down => "down",
        }
    }
}

/// The bus's state, its Redis (`host:port`) and the last error while down.
pub struct BusHealth {
    state: AtomicU8,
    redis: String,
    error: Mutex<Option<String>>,
}

impl BusHealth {
    /// `redis`: where the bus connects (`host:port`), or `None` without `--redis`.
    pub fn new(redis: Option<String>) -> BusHealth {
        let state = if redis.is_some() {
            BusState::Up
        } else {
            BusState::Off
        };
        BusHealth {
            state: AtomicU8::new(state as u8),
            redis: redis.unwrap_or_default(),
            error: Mutex::new(None),
        }
    }

    pub fn state(&self) -> BusState {
        match self.state.load(Ordering::Relaxed) {
            x if x == BusState::Up as u8 => BusState::Up,
            x if x == BusState::Down as u8 => BusState::Down,
            _ => BusState::Off,
        }
    }

    pub fn redis(&self) -> &str {
        &self.redis
    }

    pub fn error(&self) -> Option<String> {
        self.lock().clone()
    }

    /// Redis answered. Returns whether it was down before (the caller then checks what
    /// the outage may have cost).
    pub fn up(&self) -> bool {
        let was = self.state.swap(BusState::Up as u8, Ordering::Relaxed);
        *self.lock() = None;
        was == BusState::Down as u8
    }

    /// Redis did not answer. Returns whether it was up before (so the change is logged once).
    pub fn down(&self, error: &str) -> bool {
        *self.lock() = Some(error.to_owned());
        let was = self.state.swap(BusState::Down as u8, Ordering::Relaxed);
        was == BusState::Up as u8
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.error.lock().unwrap_or_else(|p| p.into_inner())
    }
}
