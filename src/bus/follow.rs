//! The follower: one connection that waits in `XREAD BLOCK` for new messages of the rooms a
//! process follows, and for pokes on its control stream.
//!
//! Owned by one thread (later: the bus thread's reading half), which calls
//! [`Follower::wait`] in a loop and hands the entries on. Whoever changes the set of followed
//! rooms (through that thread's own channel) then calls [`super::Bus::poke`] on another
//! connection: the poke lands on `chatroom:ctl:<process>`, which is in the same XREAD, so the
//! blocked read returns at once and the next one covers the new set. No sleeps, no polling.
//!
//! A single Redis only: on a Cluster the rooms' logs and the control stream are in different
//! slots, and one XREAD cannot span slots.

use std::collections::BTreeMap;
use std::time::Duration;

use redis::streams::{StreamRangeReply, StreamReadReply};
use redis::Connection;

use super::connect::{self, classify, BusError, BusErrorKind, Target, Timeouts};
use super::{parse_entry_id, to_entry, to_presence, Entry, Keys, Presence, StreamPos};

/// What one [`Follower::wait`] brought.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Followed {
    /// New messages, each room's in id order (rooms in key order).
    pub entries: Vec<Entry>,
    /// New joins and leaves, each room's in stream order.
    pub presence: Vec<Presence>,
    /// Whether the control stream was poked: the caller should look at its set of rooms.
    pub poked: bool,
}

/// A blocking reader of the followed rooms' logs. It remembers the last id it returned for
/// each room, so each `wait` resumes where the last one stopped: no gap, no duplicate.
///
/// Like [`super::Bus`], it drops a connection that broke and connects anew at the next
/// [`Follower::wait`], resuming every room (and the control stream) where it stopped.
pub struct Follower {
    /// `None` after a broken connection, until the next `wait` reconnects.
    conn: Option<Connection>,
    target: Target,
    timeouts: Timeouts,
    keys: Keys,
    control: String,
    /// The last control-stream entry id seen.
    control_last: String,
    /// Followed stream key → its room, which of the room's streams it is, and the last entry
    /// id read (or the one it was followed after). Ids are kept as Redis wrote them, so an
    /// entry the bus did not write is passed over once, not read again and again.
    streams: BTreeMap<String, Stream>,
}

/// One followed stream.
struct Stream {
    room: String,
    /// The room's presence stream (else its log).
    presence: bool,
    last: String,
}

impl Follower {
    /// Connects its own connection (it blocks in XREAD) and finds where `process`'s control
    /// stream ends, so only pokes made from now on wake it.
    pub fn connect(
        url: &str,
        keys: Keys,
        process: &str,
        timeouts: Timeouts,
    ) -> Result<Follower, BusError> {
        let target = connect::parse_url(url)?;
        let mut conn = connect::open(&target, timeouts)?;
        let control = keys.control(process);
        let last: StreamRangeReply = redis::cmd("XREVRANGE")
            .arg(&control)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query(&mut conn)
            .map_err(|e| classify(target.shown(), &e, true))?;
        let control_last = last
            .ids
            .first()
            .map_or_else(|| "0-0".to_owned(), |e| e.id.clone());
        Ok(Follower {
            conn: Some(conn),
            target,
            timeouts,
            keys,
            control,
            control_last,
            streams: BTreeMap::new(),
        })
    }

    /// Follows `room`'s messages from the one after `after_id` (replacing any earlier
    /// position).
    pub fn follow(&mut self, room: &str, after_id: u64) {
        self.follow_stream(room, false, StreamPos(after_id, 0));
    }

    /// Follows `room`'s messages after `log_at` and its joins and leaves after `presence_at`
    /// (where [`super::Bus::load`] found them to end).
    pub fn follow_with_presence(&mut self, room: &str, log_at: StreamPos, presence_at: StreamPos) {
        self.follow_stream(room, false, log_at);
        self.follow_stream(room, true, presence_at);
    }

    fn follow_stream(&mut self, room: &str, presence: bool, after: StreamPos) {
        let key = if presence {
            self.keys.presence(room)
        } else {
            self.keys.log(room)
        };
        let stream = Stream {
            room: room.to_owned(),
            presence,
            last: after.to_string(),
        };
        self.streams.insert(key, stream);
    }

    pub fn unfollow(&mut self, room: &str) {
        self.streams.remove(&self.keys.log(room));
        self.streams.remove(&self.keys.presence(room));
    }

    /// The last message id returned for `room` (or the one it was followed after).
    pub fn position(&self, room: &str) -> Option<u64> {
        let stream = self.streams.get(&self.keys.log(room))?;
        parse_entry_id(&stream.last)
    }

    /// Waits up to `block` (at least 1 ms) for messages of the followed rooms or a poke, and
    /// returns at most `count` entries per room. An empty [`Followed`] means the time ran out.
    pub fn wait(&mut self, block: Duration, count: usize) -> Result<Followed, BusError> {
        let block_ms = block.as_millis().clamp(1, u64::MAX as u128) as u64;
        let conn = match &mut self.conn {
            Some(conn) => conn,
            none => none.insert(connect::open(&self.target, self.timeouts)?),
        };
        // The read deadline covers the block and then the usual answer time.
        if let Err(e) = conn.set_read_timeout(Some(block + self.timeouts.read)) {
            self.conn = None;
            return Err(classify(self.target.shown(), &e, false));
        }
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(count.max(1))
            .arg("BLOCK")
            .arg(block_ms)
            .arg("STREAMS")
            .arg(&self.control);
        cmd.arg(self.streams.keys().collect::<Vec<_>>());
        cmd.arg(&self.control_last);
        cmd.arg(self.streams.values().map(|s| &s.last).collect::<Vec<_>>());
        let reply: Option<StreamReadReply> = match cmd.query(conn) {
            Ok(reply) => reply,
            Err(e) => {
                let error = classify(self.target.shown(), &e, true);
                if error.kind != BusErrorKind::Refused {
                    self.conn = None;
                }
                return Err(error);
            }
        };
        let mut followed = Followed::default();
        let Some(reply) = reply else {
            return Ok(followed);
        };
        for stream in &reply.keys {
            if stream.key == self.control {
                if let Some(last) = stream.ids.last() {
                    self.control_last = last.id.clone();
                    followed.poked = true;
                }
                continue;
            }
            // Streams come back by key.
            let Some(followed_stream) = self.streams.get_mut(&stream.key) else {
                continue;
            };
            let room = followed_stream.room.as_str();
            if followed_stream.presence {
                let events = stream.ids.iter().filter_map(|id| to_presence(room, id));
                followed.presence.extend(events);
            } else {
                let entries = stream.ids.iter().filter_map(|id| to_entry(room, id));
                followed.entries.extend(entries);
            }
            if let Some(last) = stream.ids.last() {
                followed_stream.last = last.id.clone();
            }
        }
        Ok(followed)
    }
}
