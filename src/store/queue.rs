//! The store's command queue: unbounded, a `Mutex` around a `Vec` and a `Condvar`.
//!
//! One sender, the hub's [`StoreLink`](super::StoreLink), pushes commands and never waits; one
//! receiver, the store thread ([`run`](super::run)), takes everything waiting at once. Dropping
//! the sender is the stop signal: the receiver then finds [`Taken::Closed`]. Dropping the
//! receiver makes every later push report false, so the hub knows the store has ended.
//!
//! Why not a crossbeam channel: crossbeam's `recv` spins and calls `sched_yield` several times
//! before it parks. The store does that after each of its 100 commits a second, and on W1's one
//! busy core those yields cost the other threads 12-27% on p99 (bench/NOTES.md, "The store's
//! p99 cost on W1 was its sched_yield calls"). A condvar parks at once, and a push pays for a
//! wake-up (`notify_one`) only when the store is actually asleep.
//!
//! Unbounded, because a refused `Load` would leave a room waiting for ever; commands are few
//! (one `Commit` per burst, one `Load` or `Forget` per room that comes or goes).

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

/// The pushing side, held by the hub.
pub(super) struct Sender<T> {
    queue: Arc<Queue<T>>,
}

/// The taking side, held by the store thread.
pub(super) struct Receiver<T> {
    queue: Arc<Queue<T>>,
}

struct Queue<T> {
    state: Mutex<State<T>>,
    /// Signalled when an item arrives for a sleeping receiver, or the sender leaves.
    wake_receiver: Condvar,
}

struct State<T> {
    items: Vec<T>,
    sender_alive: bool,
    receiver_alive: bool,
    receiver_asleep: bool,
}

/// What [`Receiver::take_all`] found.
#[derive(Debug, PartialEq)]
pub(super) enum Taken<T> {
    /// Every item that was waiting, oldest first.
    Items(Vec<T>),
    /// Nothing came before the deadline.
    TimedOut,
    /// Nothing is waiting and the sender has gone.
    Closed,
}

/// A new empty queue.
pub(super) fn queue<T>() -> (Sender<T>, Receiver<T>) {
    let queue = Arc::new(Queue {
        state: Mutex::new(State {
            items: Vec::new(),
            sender_alive: true,
            receiver_alive: true,
            receiver_asleep: false,
        }),
        wake_receiver: Condvar::new(),
    });
    let receiver = Receiver {
        queue: Arc::clone(&queue),
    };
    (Sender { queue }, receiver)
}

impl<T> Queue<T> {
    /// The state; a panic while holding the lock left it consistent (a push or a swap).
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<T> Sender<T> {
    /// Queues an item; never blocks. False if the receiver has gone (the item is dropped).
    pub(super) fn push(&self, item: T) -> bool {
        let mut state = self.queue.lock();
        if !state.receiver_alive {
            return false;
        }
        state.items.push(item);
        let wake = std::mem::take(&mut state.receiver_asleep);
        drop(state);
        if wake {
            self.queue.wake_receiver.notify_one();
        }
        true
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        self.queue.lock().sender_alive = false;
        self.queue.wake_receiver.notify_one();
    }
}

impl<T> Receiver<T> {
    /// Takes every waiting item, sleeping until one arrives, the deadline passes, or the sender
    /// leaves.
    pub(super) fn take_all(&self, deadline: Instant) -> Taken<T> {
        let mut state = self.queue.lock();
        // Seen by a push only while the wait below has let go of the lock.
        state.receiver_asleep = true;
        let timeout = deadline.saturating_duration_since(Instant::now());
        let (mut state, _) = self
            .queue
            .wake_receiver
            .wait_timeout_while(state, timeout, |state| {
                state.items.is_empty() && state.sender_alive
            })
            .unwrap_or_else(PoisonError::into_inner);
        state.receiver_asleep = false;
        if !state.items.is_empty() {
            Taken::Items(std::mem::take(&mut state.items))
        } else if !state.sender_alive {
            Taken::Closed
        } else {
            Taken::TimedOut
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let mut state = self.queue.lock();
        state.receiver_alive = false;
        // Items nobody will take are freed now, not when the sender lets go.
        state.items = Vec::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;
    use std::time::Duration;

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[test]
    fn take_all_returns_everything_waiting_in_order() {
        let (sender, receiver) = queue();
        for n in 0..3 {
            assert!(sender.push(n));
        }
        assert_eq!(receiver.take_all(soon()), Taken::Items(vec![0, 1, 2]));
        assert!(sender.push(3));
        assert_eq!(receiver.take_all(soon()), Taken::Items(vec![3]));
    }

    #[test]
    fn take_all_times_out_when_nothing_comes() {
        let (_sender, receiver) = queue::<u8>();
        let start = Instant::now();
        let wait = Duration::from_millis(20);
        assert_eq!(receiver.take_all(start + wait), Taken::TimedOut);
        assert!(start.elapsed() >= wait);
    }

    #[test]
    fn a_sleeping_receiver_wakes_for_a_push() {
        let (sender, receiver) = queue();
        let taker = thread::spawn(move || receiver.take_all(soon()));
        // Whether the push comes before or after the receiver sleeps, it gets the item.
        thread::sleep(Duration::from_millis(10));
        assert!(sender.push(7));
        assert_eq!(taker.join().unwrap(), Taken::Items(vec![7]));
    }

    #[test]
    fn closed_once_the_sender_has_gone_and_the_queue_is_empty() {
        let (sender, receiver) = queue();
        assert!(sender.push(1));
        drop(sender);
        assert_eq!(receiver.take_all(soon()), Taken::Items(vec![1]));
        assert_eq!(receiver.take_all(soon()), Taken::Closed);
    }

    #[test]
    fn a_sleeping_receiver_wakes_when_the_sender_leaves() {
        let (sender, receiver) = queue::<u8>();
        let taker = thread::spawn(move || receiver.take_all(soon()));
        thread::sleep(Duration::from_millis(10));
        drop(sender);
        assert_eq!(taker.join().unwrap(), Taken::Closed);
    }

    #[test]
    fn a_push_reports_a_dropped_receiver() {
        let (sender, receiver) = queue();
        assert!(sender.push(1));
        drop(receiver);
        assert!(!sender.push(2));
    }
}
