//! The Redis bus: rooms shared by several chatroom processes through one Redis (issue 12).
//!
//! The Redis side of `--redis`: keys, scripts and connections. The threads that use it (the
//! bus thread and the follower) are in [`crate::cluster`]; this module knows no threads and
//! no hub.
//!
//! - [`keys`]: the key layout (pure): `chatroom:{room}:log`, `…:seq`, `…:epoch`, `…:people`,
//!   `…:presence`, `…:tok:<t>`, `chatroom:ctl:<process>`, `chatroom:alive:<process>`; room
//!   names are data, escaped into the key.
//! - [`scripts`]: the Lua scripts (append, epoch, join, leave, load, renew epoch) and a frame
//!   cut around its id (pure).
//! - [`connect`]: URLs, connections with deadlines, [`BusError`].
//! - [`Bus`] (this file): one connection for commands: append, epoch, load, join, leave,
//!   typing, heartbeat, reads, pokes.
//! - [`BusHealth`] (`health.rs`): up or down, for `/healthz`.
//! - [`Follower`] (`follow.rs`): one connection that blocks in XREAD over the followed rooms
//!   and the process's control stream.
//!
//! # One order per room
//! A message gets its id and its place in the room's stream in one Lua script ([`scripts::APPEND`]):
//! `INCR seq`, then `XADD log <id>-0`. Scripts run one at a time in Redis, so stream order is
//! id order for every reader, and the stored frame (field `f`) is byte for byte what
//! `protocol::encode_message` gives for that id: a reader hands it to clients as it is.
//!
//! # Exactly one message per say
//! Each append carries a token, unique per say (e.g. the process id and a counter). The script
//! first looks for the token's record (`…:tok:<token>`, kept [`TOKEN_TTL_SECS`]); if it is
//! there, it returns the id that append got and appends nothing. So a caller whose append
//! failed with [`BusErrorKind::Lost`] (timed out: maybe applied, maybe not) retries with the
//! same token and learns the one id, within the token's lifetime.
//!
//! # Limits
//! - A Redis Cluster cannot `XREAD` keys of different slots in one call, and each room is its
//!   own slot (and the control stream another): [`Follower`] needs a single Redis (or, later,
//!   one follower per shard). The scripts touch only one room's keys, so they are cluster-safe.
//! - A room's `seq` lost while its stream was kept: the append script goes on from the
//!   stream's last id. A Redis that lost everything (restarted without persistence) has lost
//!   the epoch too: the next [`Bus::set_epoch_once`] sets a new one, so clients that resume
//!   with the old epoch start over (PROTOCOL.md's `epoch`) instead of trusting ids that now
//!   name other messages.
//! - After a broken connection, [`Bus`] and [`Follower`] connect anew at their next call.
//! - `rediss://` is TLS, checked against the system's CA roots (`connect`'s *TLS* section).

pub mod connect;
mod follow;
mod health;
pub mod keys;
pub mod scripts;

pub use connect::{BusError, BusErrorKind, Target, Timeouts};
pub use follow::{Followed, Follower};
pub use health::{BusHealth, BusState};
pub use keys::Keys;
pub use scripts::{split_message, SplitFrame};

use redis::streams::{StreamId, StreamRangeReply};
use redis::{Connection, Script};

use connect::classify;

/// How long an append token's record lives: a retry of a timed-out append comes within
/// seconds (the bus's backoff), an hour is far beyond it and costs one small key per say.
pub const TOKEN_TTL_SECS: u64 = 3600;
/// About how many pokes a control stream keeps (`MAXLEN ~`): a poke only wakes the reader.
const CONTROL_MAXLEN: usize = 64;
/// A control stream whose process is gone disappears after this long without a poke.
const CONTROL_TTL_SECS: u64 = 24 * 3600;
/// The stream field that holds the frame, and the one that holds the token.
pub(crate) const FRAME_FIELD: &str = "f";

/// One message of a room's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub room: String,
    pub id: u64,
    /// The `message` frame, as clients get it.
    pub frame: String,
}

/// What [`Bus::append`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    pub id: u64,
    /// `false` when the token had been appended before: `id` is that first append's.
    pub fresh: bool,
}

/// A room's state in Redis.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoomState {
    /// `None` until someone sets it ([`Bus::set_epoch_once`]).
    pub epoch: Option<String>,
    /// The last id given out (0: none yet).
    pub last_id: u64,
}

/// Where a stream stands: an entry id `<ms>-<seq>` as Redis writes it (`0-0`: before the
/// first entry). Compared as the pair of numbers, as Redis orders them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamPos(pub u64, pub u64);

impl StreamPos {
    pub fn parse(id: &str) -> Option<StreamPos> {
        let (ms, seq) = id.split_once('-')?;
        Some(StreamPos(ms.parse().ok()?, seq.parse().ok()?))
    }
}

impl std::fmt::Display for StreamPos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

/// One join or leave of a room, as every process reads it from the presence stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Presence {
    pub room: String,
    /// Its place in the presence stream.
    pub at: StreamPos,
    /// The connection, `<process>/<client>`.
    pub member: String,
    /// The person's name in the room.
    pub name: String,
    /// `true` for a join, `false` for a leave (or a typing notice).
    pub joined: bool,
    /// A typing notice: not a change of who is in the room, only passed on.
    pub typing: bool,
    /// A join that made a new person appear, or a leave that was the person's last connection.
    pub person: bool,
}

/// A room as [`Bus::load`] read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub epoch: String,
    /// Who is in the room: (member, name) for every connection, from every process.
    pub people: Vec<(String, String)>,
    /// Where the presence stream ended: follow it after this.
    pub presence_at: StreamPos,
    /// Where the log ended: follow it after this (its id is the room's last message id).
    pub log_at: StreamPos,
    /// The newest messages, oldest first.
    pub history: Vec<Entry>,
}

/// The member name of one connection: `<process>/<client>`.
pub fn member(process: &str, client: u64) -> String {
    format!("{process}/{client}")
}

/// Parses a presence stream entry; `None` for an entry the bus did not write.
pub(crate) fn to_presence(room: &str, entry: &StreamId) -> Option<Presence> {
    let event: String = entry.get("e")?;
    Some(Presence {
        room: room.to_owned(),
        at: StreamPos::parse(&entry.id)?,
        member: entry.get("m")?,
        name: entry.get("n")?,
        joined: event == "j",
        typing: event == "t",
        person: entry.get::<String>("x")? == "1",
    })
}

/// Parses a stream entry id `<id>-0`.
pub(crate) fn parse_entry_id(id: &str) -> Option<u64> {
    match id.split_once('-') {
        Some((ms, "0")) => ms.parse().ok(),
        _ => None,
    }
}

/// A stream entry as an [`Entry`] of `room`; `None` for an entry the bus did not write.
pub(crate) fn to_entry(room: &str, entry: &StreamId) -> Option<Entry> {
    Some(Entry {
        room: room.to_owned(),
        id: parse_entry_id(&entry.id)?,
        frame: entry.get(FRAME_FIELD)?,
    })
}

/// One connection to Redis for the bus's commands. Not shared between threads: each thread
/// that talks to Redis has its own (a `Connection` answers one command at a time).
///
/// After a command fails with a broken connection ([`BusErrorKind::Lost`]), the connection is
/// dropped, never used again: a late answer to the failed command would otherwise be read as
/// the answer to the next one. The next call connects anew (and may fail with
/// [`BusErrorKind::Unreachable`]: nothing sent).
pub struct Bus {
    /// `None` after a broken connection, until the next call reconnects.
    conn: Option<Connection>,
    target: Target,
    timeouts: Timeouts,
    keys: Keys,
    append: Script,
    epoch: Script,
    join: Script,
    leave: Script,
    load: Script,
    renew: Script,
}

impl Bus {
    /// Connects to the Redis at `url` (see [`connect::parse_url`]), checks it answers, and
    /// returns a bus whose keys start with `keys`' prefix.
    pub fn connect(url: &str, keys: Keys, timeouts: Timeouts) -> Result<Bus, BusError> {
        let target = connect::parse_url(url)?;
        let mut bus = Bus {
            conn: None,
            target,
            timeouts,
            keys,
            append: Script::new(scripts::APPEND),
            epoch: Script::new(scripts::EPOCH),
            join: Script::new(scripts::JOIN),
            leave: Script::new(scripts::LEAVE),
            load: Script::new(scripts::LOAD),
            renew: Script::new(scripts::RENEW_EPOCH),
        };
        bus.conn = Some(bus.open()?);
        Ok(bus)
    }

    /// A new connection, with both scripts loaded: an append is then one round trip
    /// (`EVALSHA`), not two (`NOSCRIPT`, then `EVAL`) the first time.
    fn open(&self) -> Result<Connection, BusError> {
        let mut conn = connect::open(&self.target, self.timeouts)?;
        for script in [
            &self.append,
            &self.epoch,
            &self.join,
            &self.leave,
            &self.load,
            &self.renew,
        ] {
            script
                .load(&mut conn)
                .map_err(|e| classify(&self.target.shown, &e, false))?;
        }
        Ok(conn)
    }

    /// Drops the connection (e.g. when another connection to the same Redis broke): the next
    /// call connects anew.
    pub fn disconnect(&mut self) {
        self.conn = None;
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Where this bus connects, `host:port`.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Runs `command` on the connection (connecting first if the last one broke), and drops
    /// the connection if it breaks.
    fn run<T>(
        &mut self,
        command: impl FnOnce(&mut Connection, &Keys) -> redis::RedisResult<T>,
    ) -> Result<T, BusError> {
        if self.conn.is_none() {
            self.conn = Some(self.open()?);
        }
        let Some(conn) = &mut self.conn else {
            unreachable!("connected just above");
        };
        command(conn, &self.keys).map_err(|e| {
            let error = classify(&self.target.shown, &e, true);
            if error.kind != BusErrorKind::Refused {
                self.conn = None;
            }
            error
        })
    }

    /// Appends `frame` to `room`'s log with the next id, once per `token`: calling again with
    /// the same token returns the first call's id and appends nothing. The stream keeps about
    /// `retain` entries (at least 1).
    pub fn append(
        &mut self,
        room: &str,
        frame: &SplitFrame,
        token: &str,
        retain: usize,
    ) -> Result<Appended, BusError> {
        let script = self.append.clone();
        let (id, fresh): (u64, u8) = self.run(|conn, keys| {
            script
                .key(keys.seq(room))
                .key(keys.log(room))
                .key(keys.token(room, token))
                .arg(frame.head)
                .arg(&frame.tail)
                .arg(token)
                .arg(retain.max(1))
                .arg(TOKEN_TTL_SECS)
                .invoke(conn)
        })?;
        Ok(Appended {
            id,
            fresh: fresh == 1,
        })
    }

    /// Sets `room`'s epoch to `candidate` unless it has one, and returns the one in force:
    /// every process that asks gets the same.
    pub fn set_epoch_once(&mut self, room: &str, candidate: &str) -> Result<String, BusError> {
        let script = self.epoch.clone();
        self.run(|conn, keys| script.key(keys.epoch(room)).arg(candidate).invoke(conn))
    }

    /// `room`'s epoch (if set) and last id, read together.
    pub fn room_state(&mut self, room: &str) -> Result<RoomState, BusError> {
        let (epoch, last_id): (Option<String>, Option<u64>) = self.run(|conn, keys| {
            redis::cmd("MGET")
                .arg(keys.epoch(room))
                .arg(keys.seq(room))
                .query(conn)
        })?;
        Ok(RoomState {
            epoch,
            last_id: last_id.unwrap_or(0),
        })
    }

    /// Up to `count` messages of `room` with ids above `after_id`, oldest first.
    pub fn read_after(
        &mut self,
        room: &str,
        after_id: u64,
        count: usize,
    ) -> Result<Vec<Entry>, BusError> {
        match after_id.checked_add(1) {
            Some(start) => self.read_range(room, &format!("{start}-0"), "+", count, false),
            None => Ok(Vec::new()),
        }
    }

    /// The newest `count` messages of `room` with ids above `after`, oldest first (what a
    /// client resuming after `after` missed, within `--history`).
    pub fn read_newest_after(
        &mut self,
        room: &str,
        after: u64,
        count: usize,
    ) -> Result<Vec<Entry>, BusError> {
        match after.checked_add(1) {
            Some(start) => self.read_range(room, &format!("{start}-0"), "+", count, true),
            None => Ok(Vec::new()),
        }
    }

    /// Up to `count` messages of `room` with ids below `before_id`, oldest first (a page of
    /// older history).
    pub fn read_before(
        &mut self,
        room: &str,
        before_id: u64,
        count: usize,
    ) -> Result<Vec<Entry>, BusError> {
        match before_id.checked_sub(1) {
            Some(end) => self.read_range(room, "-", &format!("{end}-0"), count, true),
            None => Ok(Vec::new()),
        }
    }

    /// Up to `count` messages of `room`'s log from stream id `from` to `to` (`-` and `+` for
    /// the ends), the oldest ones (`XRANGE`) or with `newest` the newest ones (`XREVRANGE`),
    /// oldest first either way.
    fn read_range(
        &mut self,
        room: &str,
        from: &str,
        to: &str,
        count: usize,
        newest: bool,
    ) -> Result<Vec<Entry>, BusError> {
        let (command, first, second) = if newest {
            ("XREVRANGE", to, from)
        } else {
            ("XRANGE", from, to)
        };
        let reply: StreamRangeReply = self.run(|conn, keys| {
            redis::cmd(command)
                .arg(keys.log(room))
                .arg(first)
                .arg(second)
                .arg("COUNT")
                .arg(count.max(1))
                .query(conn)
        })?;
        let mut entries: Vec<Entry> = reply.ids.iter().filter_map(|e| to_entry(room, e)).collect();
        if newest {
            entries.reverse();
        }
        Ok(entries)
    }

    /// Reads `room` to start following it (see [`scripts::LOAD`]), setting its epoch to
    /// `candidate` if it has none, with its newest `count` messages.
    pub fn load(
        &mut self,
        room: &str,
        candidate: &str,
        count: usize,
    ) -> Result<Snapshot, BusError> {
        let script = self.load.clone();
        type Reply = (String, Vec<String>, String, String, Vec<String>);
        let (epoch, people, presence_at, log_at, messages): Reply = self.run(|conn, keys| {
            script
                .key(keys.epoch(room))
                .key(keys.people(room))
                .key(keys.presence(room))
                .key(keys.log(room))
                .arg(candidate)
                .arg(count)
                .invoke(conn)
        })?;
        let looks_name: std::collections::HashMap<&str, &str> = people
            .chunks_exact(2)
            .filter_map(|kv| Some((kv[0].strip_prefix("n:")?, kv[1].as_str())))
            .collect();
        let people = people
            .chunks_exact(2)
            .filter_map(|kv| {
                let member = kv[0].strip_prefix("m:")?;
                let name = looks_name.get(kv[1].as_str())?;
                Some((member.to_owned(), (*name).to_owned()))
            })
            .collect();
        let mut history: Vec<Entry> = messages
            .chunks_exact(2)
            .filter_map(|pair| {
                Some(Entry {
                    room: room.to_owned(),
                    id: parse_entry_id(&pair[0])?,
                    frame: pair[1].clone(),
                })
            })
            .collect();
        history.reverse();
        let position = |id: &str| StreamPos::parse(id).unwrap_or_default();
        Ok(Snapshot {
            epoch,
            people,
            presence_at: position(&presence_at),
            log_at: position(&log_at),
            history,
        })
    }

    /// `member` joins `room` (see [`scripts::JOIN`]): the first of `candidates` (name,
    /// look-alike key) that no one in the room looks like, or its session's person. Returns
    /// the name and whether a new person appeared.
    pub fn join(
        &mut self,
        room: &str,
        member: &str,
        session: Option<&str>,
        candidates: &[(String, String)],
        presence_maxlen: usize,
    ) -> Result<(String, bool), BusError> {
        let script = self.join.clone();
        let (name, new): (String, String) = self.run(|conn, keys| {
            let mut call = script.key(keys.people(room));
            call.key(keys.presence(room))
                .arg(member)
                .arg(session.unwrap_or(""))
                .arg(presence_maxlen);
            for (name, looks) in candidates {
                call.arg(name).arg(looks);
            }
            call.invoke(conn)
        })?;
        Ok((name, new == "1"))
    }

    /// Connections leave `room` (see [`scripts::LEAVE`]): the named `members`, or with
    /// `whole_processes` every member of the processes named. Returns how many left.
    pub fn leave(
        &mut self,
        room: &str,
        members: &[String],
        whole_processes: bool,
        presence_maxlen: usize,
    ) -> Result<usize, BusError> {
        let script = self.leave.clone();
        self.run(|conn, keys| {
            let mut call = script.key(keys.people(room));
            call.key(keys.presence(room))
                .arg(presence_maxlen)
                .arg(if whole_processes { "p" } else { "m" });
            for member in members {
                if whole_processes {
                    call.arg(format!("{member}/"));
                } else {
                    call.arg(member);
                }
            }
            call.invoke(conn)
        })
    }

    /// Tells every process that `name` (connection `member`) is typing in `room`: an entry
    /// of the presence stream that changes nothing.
    pub fn typing(
        &mut self,
        room: &str,
        member: &str,
        name: &str,
        presence_maxlen: usize,
    ) -> Result<(), BusError> {
        self.run(|conn, keys| {
            redis::cmd("XADD")
                .arg(keys.presence(room))
                .arg("MAXLEN")
                .arg("~")
                .arg(presence_maxlen)
                .arg("*")
                .arg("e")
                .arg("t")
                .arg("m")
                .arg(member)
                .arg("n")
                .arg(name)
                .arg("x")
                .arg("0")
                .query::<String>(conn)
                .map(drop)
        })
    }

    /// Registers `process` (so survivors look for its heartbeat) and notes that it has
    /// members in `room` (so they clear it when the heartbeat stops).
    pub fn note_room(&mut self, process: &str, room: &str) -> Result<(), BusError> {
        self.run(|conn, keys| {
            redis::pipe()
                .cmd("SADD")
                .arg(keys.processes())
                .arg(process)
                .ignore()
                .cmd("SADD")
                .arg(keys.rooms_of(process))
                .arg(room)
                .ignore()
                .query::<()>(conn)
        })
    }

    /// `process` no longer has members in `room`.
    pub fn unnote_room(&mut self, process: &str, room: &str) -> Result<(), BusError> {
        self.run(|conn, keys| {
            redis::cmd("SREM")
                .arg(keys.rooms_of(process))
                .arg(room)
                .query::<()>(conn)
        })
    }

    /// Every registered process.
    pub fn processes(&mut self) -> Result<Vec<String>, BusError> {
        self.run(|conn, keys| redis::cmd("SMEMBERS").arg(keys.processes()).query(conn))
    }

    /// Up to `count` of the rooms where `process` has had members.
    pub fn rooms_of(&mut self, process: &str, count: usize) -> Result<Vec<String>, BusError> {
        self.run(|conn, keys| {
            redis::cmd("SRANDMEMBER")
                .arg(keys.rooms_of(process))
                .arg(count)
                .query(conn)
        })
    }

    /// Forgets a dead process whose rooms have all been cleared.
    pub fn forget_process(&mut self, process: &str) -> Result<(), BusError> {
        self.run(|conn, keys| {
            redis::pipe()
                .cmd("SREM")
                .arg(keys.processes())
                .arg(process)
                .ignore()
                .cmd("DEL")
                .arg(keys.rooms_of(process))
                .ignore()
                .query::<()>(conn)
        })
    }

    /// Says `process` is alive for `ttl` more (its heartbeat), or with `ttl` zero that it is
    /// gone.
    pub fn set_alive(&mut self, process: &str, ttl: std::time::Duration) -> Result<(), BusError> {
        self.run(|conn, keys| {
            if ttl.is_zero() {
                redis::cmd("DEL").arg(keys.alive(process)).query(conn)
            } else {
                redis::cmd("SET")
                    .arg(keys.alive(process))
                    .arg(1)
                    .arg("PX")
                    .arg(ttl.as_millis() as u64)
                    .query(conn)
            }
        })
    }

    /// Which of `processes` are alive (their heartbeat key exists), in the same order.
    pub fn alive(&mut self, processes: &[String]) -> Result<Vec<bool>, BusError> {
        if processes.is_empty() {
            return Ok(Vec::new());
        }
        let found: Vec<Option<String>> = self.run(|conn, keys| {
            let mut cmd = redis::cmd("MGET");
            for process in processes {
                cmd.arg(keys.alive(process));
            }
            cmd.query(conn)
        })?;
        Ok(found.iter().map(Option::is_some).collect())
    }

    /// The id of the newest message in `room`'s log (0: none).
    pub fn log_end(&mut self, room: &str) -> Result<u64, BusError> {
        let newest = self.read_range(room, "-", "+", 1, true)?;
        Ok(newest.last().map_or(0, |entry| entry.id))
    }

    /// Replaces `room`'s epoch `old` with `new` (see [`scripts::RENEW_EPOCH`]); returns the
    /// epoch in force.
    pub fn renew_epoch(&mut self, room: &str, old: &str, new: &str) -> Result<String, BusError> {
        let script = self.renew.clone();
        self.run(|conn, keys| {
            script
                .key(keys.epoch(room))
                .key(keys.people(room))
                .arg(old)
                .arg(new)
                .invoke(conn)
        })
    }

    /// Wakes the [`Follower`] of `process` (blocked in XREAD) by adding to its control stream:
    /// how a change of the followed rooms reaches it without polling.
    pub fn poke(&mut self, process: &str) -> Result<(), BusError> {
        self.run(|conn, keys| {
            let key = keys.control(process);
            redis::pipe()
                .cmd("XADD")
                .arg(&key)
                .arg("MAXLEN")
                .arg("~")
                .arg(CONTROL_MAXLEN)
                .arg("*")
                .arg("p")
                .arg(1)
                .ignore()
                .cmd("EXPIRE")
                .arg(&key)
                .arg(CONTROL_TTL_SECS)
                .ignore()
                .query::<()>(conn)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids() {
        assert_eq!(parse_entry_id("17-0"), Some(17));
        assert_eq!(parse_entry_id("17-1"), None);
        assert_eq!(parse_entry_id("x-0"), None);
        assert_eq!(parse_entry_id("17"), None);
    }
}
