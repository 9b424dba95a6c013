//! One client's outbound queue: a bounded queue of frames built on a `Mutex` and a `Condvar`.
//!
//! Senders are the hub (broadcasts), the client's reader (errors, pongs, close echoes) and the
//! connection registry (the shutdown wake-up); the only receiver is the client's writer
//! ([`crate::client`]). The store's command queue is one too, unbounded, for the same reason
//! as the writers': its thread must sleep at once when it has nothing to do ([`crate::store`]).
//!
//! - **Bounded, never blocking the sender.** [`Outbox::offer`] refuses with [`Offer::Full`] when
//!   `capacity` frames, or frames of `byte_limit` bytes in all, wait: that client is a slow
//!   consumer, and the hub drops it rather than wait. (A frame limit alone would let a client
//!   that stopped reading pin 1,024 large messages: 16 MB of a busy room's 4,000-character
//!   messages, per stalled client.)
//! - **The writer takes everything at once.** [`Inbox::take_all`] swaps the whole queue out under
//!   the lock, so a burst costs one lock and one flush, however long it is.
//! - **The writer sleeps at once.** crossbeam's `recv` spins and then calls `sched_yield` several
//!   times before it parks; with hundreds of writers each woken for one frame, the benchmark
//!   measured 57% of the server's CPU in those yields. A condvar parks straight away, and a
//!   sender only pays for a wake-up (`notify_one`) when the writer is actually asleep — and the
//!   hub pays it once per burst ([`Outbox::offer_deferred`]).
//! - **Idle clients cost nothing.** The queue owns no buffer while it is empty: the writer takes
//!   the `VecDeque` away with each batch.
//! - **Disconnection is the stop signal.** When the last [`Outbox`] is dropped, the writer's
//!   [`Inbox::take_all`] returns [`Taken::Closed`] once the queue is empty; when the [`Inbox`] is
//!   dropped, offers return [`Offer::Gone`].

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

/// The sending side; clone it for each sender.
pub struct Outbox<T> {
    queue: Arc<Queue<T>>,
}

/// Wakes one sleeping writer; see [`Outbox::offer_deferred`].
pub struct Waker<T> {
    queue: Arc<Queue<T>>,
}

impl<T> Waker<T> {
    pub fn wake(self) {
        self.queue.wake_writer.notify_one();
    }
}

/// The receiving side, owned by the writer.
pub struct Inbox<T> {
    queue: Arc<Queue<T>>,
}

/// What a queued item weighs, for the byte limit.
pub trait Weigh {
    fn bytes(&self) -> usize;
}

struct Queue<T> {
    state: Mutex<State<T>>,
    /// Signalled when a frame arrives for a sleeping writer, or the last sender leaves.
    wake_writer: Condvar,
    capacity: usize,
    byte_limit: usize,
}

struct State<T> {
    frames: VecDeque<T>,
    /// The sum of `frames`' weights.
    bytes: usize,
    senders: usize,
    receiver_alive: bool,
    writer_asleep: bool,
}

/// What became of an offered frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Offer {
    Queued,
    /// `capacity` frames are waiting: the client is not keeping up.
    Full,
    /// The writer has ended.
    Gone,
}

/// What the writer found.
#[derive(Debug, PartialEq)]
pub enum Taken<T> {
    /// Every frame that was waiting, oldest first.
    Frames(VecDeque<T>),
    /// Nothing came before the deadline.
    TimedOut,
    /// Nothing is waiting and every sender has gone.
    Closed,
}

/// A new queue that holds at most `capacity` frames and `byte_limit` bytes (a single frame is
/// always let into an empty queue, whatever its size).
pub fn outbox<T: Weigh>(capacity: usize, byte_limit: usize) -> (Outbox<T>, Inbox<T>) {
    let queue = Arc::new(Queue {
        state: Mutex::new(State {
            frames: VecDeque::new(),
            bytes: 0,
            senders: 1,
            receiver_alive: true,
            writer_asleep: false,
        }),
        wake_writer: Condvar::new(),
        capacity,
        byte_limit,
    });
    (
        Outbox {
            queue: Arc::clone(&queue),
        },
        Inbox { queue },
    )
}

impl<T> Queue<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic while holding this lock leaves the queue consistent (a push or a swap).
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl<T> State<T> {
    fn has_room_for(&self, frame: &T, capacity: usize, byte_limit: usize) -> bool
    where
        T: Weigh,
    {
        self.frames.is_empty()
            || (self.frames.len() < capacity && self.bytes + frame.bytes() <= byte_limit)
    }
}

impl<T: Weigh> Outbox<T> {
    /// Queues a frame unless the queue is full or the writer is gone; never blocks.
    pub fn offer(&self, frame: T) -> Offer {
        let (offer, waker) = self.offer_deferred(frame);
        if let Some(waker) = waker {
            waker.wake();
        }
        offer
    }

    /// Like [`Outbox::offer`], but leaves the wake-up to the caller: when the writer sleeps,
    /// the frame comes back queued with a [`Waker`] to call later. The hub wakes writers only
    /// after it has fanned out everything it has to hand, so each writer wakes once for a whole
    /// burst instead of once per frame (a woken thread tends to preempt its waker at once, and
    /// would then find just one frame).
    pub fn offer_deferred(&self, frame: T) -> (Offer, Option<Waker<T>>) {
        let mut state = self.queue.lock();
        if !state.receiver_alive {
            return (Offer::Gone, None);
        }
        if !state.has_room_for(&frame, self.queue.capacity, self.queue.byte_limit) {
            return (Offer::Full, None);
        }
        state.bytes += frame.bytes();
        state.frames.push_back(frame);
        let waker = std::mem::take(&mut state.writer_asleep).then(|| Waker {
            queue: Arc::clone(&self.queue),
        });
        (Offer::Queued, waker)
    }
}

impl<T> Outbox<T> {
    /// Frames waiting right now.
    pub fn len(&self) -> usize {
        self.queue.lock().frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T> Clone for Outbox<T> {
    fn clone(&self) -> Self {
        self.queue.lock().senders += 1;
        Outbox {
            queue: Arc::clone(&self.queue),
        }
    }
}

impl<T> Drop for Outbox<T> {
    fn drop(&mut self) {
        let mut state = self.queue.lock();
        state.senders -= 1;
        if state.senders == 0 {
            self.queue.wake_writer.notify_one();
        }
    }
}

impl<T> Inbox<T> {
    /// Takes every waiting frame, sleeping until one arrives, the deadline passes, or the last
    /// sender leaves.
    pub fn take_all(&self, deadline: Instant) -> Taken<T> {
        let mut state = self.queue.lock();
        loop {
            if !state.frames.is_empty() {
                state.bytes = 0;
                return Taken::Frames(std::mem::take(&mut state.frames));
            }
            if state.senders == 0 {
                return Taken::Closed;
            }
            let now = Instant::now();
            if now >= deadline {
                return Taken::TimedOut;
            }
            state.writer_asleep = true;
            state = self
                .queue
                .wake_writer
                .wait_timeout(state, deadline - now)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|poisoned| poisoned.into_inner().0);
            state.writer_asleep = false;
        }
    }
}

impl<T> Drop for Inbox<T> {
    fn drop(&mut self) {
        let mut state = self.queue.lock();
        state.receiver_alive = false;
        // Frames nobody will send are freed now, not when the last sender lets go.
        state.frames = VecDeque::new();
        state.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;
    use std::time::Duration;

    impl Weigh for i32 {
        fn bytes(&self) -> usize {
            self.unsigned_abs() as usize
        }
    }

    impl Weigh for u8 {
        fn bytes(&self) -> usize {
            1
        }
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[test]
    fn frames_come_out_in_order_all_at_once() {
        let (outbox, inbox) = outbox(10, 1000);
        for n in 0..3 {
            assert_eq!(outbox.offer(n), Offer::Queued);
        }
        assert_eq!(
            inbox.take_all(soon()),
            Taken::Frames(VecDeque::from([0, 1, 2]))
        );
        assert!(outbox.is_empty());
    }

    #[test]
    fn a_full_queue_refuses_without_blocking() {
        let (outbox, inbox) = outbox(2, 1000);
        assert_eq!(outbox.offer(1), Offer::Queued);
        assert_eq!(outbox.offer(2), Offer::Queued);
        assert_eq!(outbox.offer(3), Offer::Full);
        assert_eq!(
            inbox.take_all(soon()),
            Taken::Frames(VecDeque::from([1, 2]))
        );
        assert_eq!(outbox.offer(3), Offer::Queued);
    }

    #[test]
    fn the_byte_limit_refuses_too_but_an_empty_queue_takes_any_frame() {
        let (outbox, inbox) = outbox(100, 10);
        assert_eq!(outbox.offer(25), Offer::Queued); // alone, over the limit: still queued
        assert_eq!(outbox.offer(1), Offer::Full);
        assert_eq!(inbox.take_all(soon()), Taken::Frames(VecDeque::from([25])));
        assert_eq!(outbox.offer(6), Offer::Queued);
        assert_eq!(outbox.offer(4), Offer::Queued);
        assert_eq!(outbox.offer(1), Offer::Full);
        assert_eq!(
            inbox.take_all(soon()),
            Taken::Frames(VecDeque::from([6, 4]))
        );
    }

    #[test]
    fn the_writer_sees_the_deadline_and_then_the_end() {
        let (outbox, inbox) = outbox::<u8>(2, 1000);
        assert_eq!(inbox.take_all(Instant::now()), Taken::TimedOut);
        let second = outbox.clone();
        drop(outbox);
        assert_eq!(second.offer(7), Offer::Queued);
        drop(second);
        // What was queued before the last sender left is still delivered.
        assert_eq!(inbox.take_all(soon()), Taken::Frames(VecDeque::from([7])));
        assert_eq!(inbox.take_all(soon()), Taken::Closed);
    }

    #[test]
    fn a_sleeping_writer_wakes_for_a_frame_and_for_the_end() {
        let (outbox, inbox) = outbox(4, 1000);
        let writer = thread::spawn(move || {
            let first = inbox.take_all(soon());
            let second = inbox.take_all(soon());
            (first, second)
        });
        assert_eq!(outbox.offer(1), Offer::Queued);
        drop(outbox);
        let (first, second) = writer.join().unwrap();
        // The frame and the end may arrive in one wake-up or two; nothing is lost.
        match first {
            Taken::Frames(frames) => {
                assert_eq!(frames, VecDeque::from([1]));
                assert_eq!(second, Taken::Closed);
            }
            other => panic!("expected the frame first, got {other:?}"),
        }
    }

    #[test]
    fn a_deferred_offer_leaves_the_wake_up_to_the_caller() {
        let (outbox, inbox) = outbox(1_000_000, usize::MAX);
        // No writer asleep: nothing to wake.
        assert!(outbox.offer_deferred(0).1.is_none());
        assert_eq!(inbox.take_all(soon()), Taken::Frames(VecDeque::from([0])));

        let writer = thread::spawn(move || inbox.take_all(soon()));
        // Offer until the writer is seen asleep (before that, it may take a frame by itself).
        let mut n = 0;
        let waker = loop {
            n += 1;
            match outbox.offer_deferred(n) {
                (Offer::Queued, Some(waker)) => break Some(waker),
                // The writer took a frame before it ever slept, and has ended.
                (Offer::Gone, _) => break None,
                (Offer::Queued, None) => thread::yield_now(),
                (other, _) => panic!("unexpected {other:?}"),
            }
        };
        // Only the waker wakes it; no frame is lost either way.
        if let Some(waker) = waker {
            waker.wake();
        }
        match writer.join().unwrap() {
            Taken::Frames(frames) => assert_eq!(frames.front(), Some(&1)),
            other => panic!("expected frames, got {other:?}"),
        }
    }

    #[test]
    fn offers_to_a_gone_writer_are_refused() {
        let (outbox, inbox) = outbox(4, 1000);
        drop(inbox);
        assert_eq!(outbox.offer(1), Offer::Gone);
    }
}
