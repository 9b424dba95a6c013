//! Rooms shared by several processes (`--redis`): the bus thread and the follower thread
//! between the hub and Redis.
//!
//! The hub ([`crate::hub`]) never talks to Redis. It sends [`BusCommand`]s through a
//! [`BusLink`] (a bounded channel, never waited on) to the **bus thread**, which owns one
//! Redis connection ([`Bus`]) and runs them one at a time: read a room to follow it, a join, a
//! leave, an append. The **follower thread** owns another connection ([`Follower`]), blocked
//! in `XREAD` over the logs and presence streams of every room this process follows, and hands
//! what it reads to the hub in stream order. A message said here takes the same path as one
//! said in another process: appended by the bus thread, read back by the follower, fanned out
//! by the hub. So every process delivers one order. Both threads answer through `deliver`
//! (which puts a [`BusEvent`] into the hub's queue): this module never names the hub's types.
//!
//! Failures:
//! - An append that fails before anything is sent (Redis unreachable) is refused at once:
//!   the client gets `unavailable` with its text. One that fails in flight (timed out: maybe
//!   applied) is retried with the same token until Redis runs it again, so it ends as exactly
//!   one message or, if it never landed and Redis refuses it, one error. Says behind a retried
//!   one wait behind it, so a client's messages keep their order.
//! - Every [`HEARTBEAT`] the bus thread marks this process alive (for [`ALIVE_FOR`]), reads
//!   every registered process's heartbeat in one `MGET`, and clears the rooms of those that
//!   are dead (each process lists the rooms it joins under its name before joining): a process
//!   that dies leaves its rooms within `ALIVE_FOR + HEARTBEAT` (12 s), announced once (the
//!   leave script announces only what it removes). At a clean stop it removes its own at once.
//! - After an outage it reads each followed room's epoch again, before it appends anything: a
//!   room whose epoch changed or vanished (a Redis restarted without persistence) is lost for
//!   this process, and the hub closes its clients with 1012 so they join again and start from
//!   the new epoch. A room whose log ends before what was read gets a new epoch first. Says on
//!   their way to a lost room are handed back (`unavailable`) before its clients are closed. A
//!   room the check fails to read is read again at the next heartbeat, never taken as passed;
//!   until then says to it are refused (or, if they may have landed, wait).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use log::{error, info, warn};

use crate::bus::{
    Appended, Bus, BusError, BusErrorKind, BusHealth, Entry, Follower, Keys, Presence, Snapshot,
    SplitFrame, StreamPos, Timeouts,
};
use crate::room::{ClientId, EpochSource};

/// Says handed to the bus thread and not yet answered, at most. Past it a say is refused
/// (`unavailable`) rather than queued: a Redis that stalls must not grow memory or stall the
/// hub. The other commands come one or two per client, and are never refused.
pub const SAYS_IN_FLIGHT: usize = 8 * 1024;
/// How often the bus thread marks this process alive and looks for dead processes' members.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// How long a heartbeat keeps this process alive in Redis: five heartbeats, so a slow second
/// or two is not taken for death.
pub const ALIVE_FOR: Duration = Duration::from_secs(10);
/// Rooms of dead processes cleared per heartbeat, at most: each is one script, run between
/// says.
const REAP_PER_BEAT: usize = 64;
/// About how many joins and leaves a room's presence stream keeps: only followers that fell
/// this far behind need them, and they read the room anew instead.
const PRESENCE_MAXLEN: usize = 1000;
/// How long the follower blocks in one `XREAD`: it also bounds how long a follower whose
/// process stopped while Redis was unreachable lives on.
const FOLLOW_BLOCK: Duration = Duration::from_secs(2);
/// Entries per stream per `XREAD`.
const FOLLOW_COUNT: usize = 512;
/// Pause before retrying after a failure: doubles from the first to the last.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_LAST: Duration = Duration::from_secs(2);

/// A name for this process in Redis, unique among processes and among servers in one
/// process: the start time in nanoseconds, the pid and a counter, in hex.
pub fn process_id() -> String {
    static STARTED: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let n = STARTED.fetch_add(1, Ordering::Relaxed);
    format!("{nanos:x}{:x}{n:x}", std::process::id())
}

/// A page of older history, or `None` when Redis could not be read.
pub type PageReply = Box<dyn FnOnce(Option<(Vec<Entry>, bool)>) + Send>;

/// What the hub asks of the bus thread.
pub enum BusCommand {
    /// Read a room and follow it; answered with [`BusEvent::Loaded`] or
    /// [`BusEvent::LoadFailed`].
    Load { room: String },
    /// Read up to `--history` messages after `after` for a resuming client whose history
    /// memory dropped; answered with [`BusEvent::SinceRead`].
    ReadSince {
        room: String,
        after: u64,
        client: ClientId,
    },
    /// Up to `limit` messages before `before`, answered through `reply` on the bus thread.
    ReadBefore {
        room: String,
        before: u64,
        limit: usize,
        reply: PageReply,
    },
    /// A client joins: its presence event comes back through the follower;
    /// [`BusEvent::JoinFailed`] if Redis cannot be reached.
    Join {
        room: String,
        client: ClientId,
        session: Option<String>,
        /// (name, look-alike key): the wanted name, then `name (2)`, …
        candidates: Vec<(String, String)>,
    },
    /// A client is typing: passed to the other processes through the room's presence stream
    /// (dropped if Redis does not answer: it is not history).
    Typing {
        room: String,
        client: ClientId,
        name: String,
    },
    /// A client has gone (retried until Redis takes it).
    Leave { room: String, client: ClientId },
    /// Append a message; answered with [`BusEvent::Said`] (the echo itself comes through the
    /// follower).
    Say(Box<Say>),
    /// The hub no longer holds the room: stop following it.
    Forget { room: String },
    /// From the follower: its connection broke, so the bus thread's is likely broken too.
    /// Dropped now, before a say is written into it, a say that comes next cannot be lost in
    /// flight (maybe applied, so held until Redis answers): it finds Redis unreachable,
    /// nothing sent, and is refused at once.
    ConnectionBroke,
    /// Remove this process's members everywhere, and end.
    Shutdown,
}

/// A say on its way to Redis.
pub struct Say {
    pub room: String,
    pub client: ClientId,
    pub frame: SplitFrame,
    /// Unique per say (the same for a resend of one `cid`): the append happens once.
    pub token: String,
    pub text: String,
    pub cid: Option<String>,
}

/// What the bus and follower threads tell the hub.
pub enum BusEvent {
    Loaded {
        room: String,
        snapshot: Snapshot,
    },
    LoadFailed {
        room: String,
    },
    SinceRead {
        room: String,
        client: ClientId,
        history: Vec<Entry>,
    },
    JoinFailed {
        room: String,
        client: ClientId,
    },
    /// A say's append, when the hub has something to do about it: `Ok` with `fresh` false (its
    /// token had landed before from an earlier say, a resend of its `cid`, never from this
    /// say's own retry), or `Err(())`: it was not appended, and never will be. A say appended
    /// afresh is not reported: its echo comes through the follower.
    Said {
        room: String,
        client: ClientId,
        result: Result<Appended, ()>,
        text: String,
        cid: Option<String>,
    },
    /// New messages and presence events, each room's in stream order.
    Followed {
        messages: Vec<Entry>,
        presence: Vec<Presence>,
    },
    /// The room's data in Redis is not what this process followed (its epoch changed).
    RoomLost {
        room: String,
    },
}

/// The hub's side of the bus thread: an unbounded channel (sending never waits), with the
/// says in flight counted and bounded.
pub struct BusLink {
    commands: Sender<BusCommand>,
    says_in_flight: Arc<AtomicUsize>,
    process: String,
}

impl BusLink {
    /// Hands a command over; `false` when the bus thread has ended.
    pub fn send(&self, command: BusCommand) -> bool {
        self.commands.send(command).is_ok()
    }

    /// Hands a command over, or gives it back when the bus thread has ended.
    pub fn send_or_return(&self, command: BusCommand) -> Result<(), BusCommand> {
        self.commands.send(command).map_err(|e| e.into_inner())
    }

    /// Hands a say over; `false` when [`SAYS_IN_FLIGHT`] are waiting already (or the bus
    /// thread has ended): the say is refused.
    pub fn send_say(&self, say: Say) -> bool {
        if self.says_in_flight.fetch_add(1, Ordering::AcqRel) >= SAYS_IN_FLIGHT
            || !self.send(BusCommand::Say(Box::new(say)))
        {
            self.says_in_flight.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// This process's name in Redis: its members are `<process>/<client>`.
    pub fn process(&self) -> &str {
        &self.process
    }
}

/// The two connections, made at start-up so a bad URL, a refused login or a Redis that does
/// not answer stops the server before it serves anyone.
pub struct Connected {
    bus: Bus,
    follower: Follower,
    process: String,
}

/// Connects both of the process's connections to the Redis at `url`.
pub fn connect(url: &str, prefix: &str) -> Result<Connected, BusError> {
    let keys = Keys::new(prefix).map_err(|e| BusError::new(BusErrorKind::BadUrl, e))?;
    let process = process_id();
    let timeouts = Timeouts::default();
    let bus = Bus::connect(url, keys.clone(), timeouts)?;
    let follower = Follower::connect(url, keys, &process, timeouts)?;
    Ok(Connected {
        bus,
        follower,
        process,
    })
}

impl Connected {
    /// `host:port` of the Redis.
    pub fn target(&self) -> String {
        self.bus.target().shown().to_owned()
    }

    /// The link for the hub, and the two thread bodies (the bus thread's, the follower's).
    pub fn start(
        self,
        history: usize,
        retain: usize,
        health: Arc<BusHealth>,
        deliver: impl Fn(BusEvent) -> bool + Send + Sync + 'static,
    ) -> (BusLink, impl FnOnce() + Send, impl FnOnce() + Send) {
        let (commands, inbox) = crossbeam_channel::unbounded();
        let says_in_flight = Arc::new(AtomicUsize::new(0));
        let positions = Positions::default();
        let (changes, follower_inbox) = crossbeam_channel::unbounded();
        let deliver: Arc<dyn Fn(BusEvent) -> bool + Send + Sync> = Arc::new(deliver);
        let link = BusLink {
            commands,
            says_in_flight: Arc::clone(&says_in_flight),
            process: self.process.clone(),
        };
        let mut thread = BusThread {
            bus: self.bus,
            process: self.process,
            changes,
            deliver: Arc::clone(&deliver),
            health: Arc::clone(&health),
            epochs: EpochSource::new(),
            followed: HashMap::new(),
            says: VecDeque::new(),
            leaves: Vec::new(),
            noted: Default::default(),
            retry_at: None,
            backoff: BACKOFF_FIRST,
            down: false,
            unchecked: HashSet::new(),
            positions: Arc::clone(&positions),
            says_in_flight,
            history,
            retain,
        };
        let follower = self.follower;
        let broke = link.commands.clone();
        let bus_body = move || thread.run(inbox);
        let follower_body =
            move || follow(follower, follower_inbox, deliver, health, broke, positions);
        (link, bus_body, follower_body)
    }
}

/// The last message id read in each followed room: written by the follower thread, read by
/// the bus thread after an outage.
type Positions = Arc<std::sync::Mutex<HashMap<String, u64>>>;

fn read_position(positions: &Positions, room: &str) -> u64 {
    let positions = positions.lock().unwrap_or_else(|p| p.into_inner());
    positions.get(room).copied().unwrap_or(0)
}

/// What the bus thread tells the follower thread.
enum FollowChange {
    Follow {
        room: String,
        log_at: StreamPos,
        presence_at: StreamPos,
    },
    Unfollow {
        room: String,
    },
    Stop,
}

/// A say appended once already with no answer (it may have landed), or waiting behind one.
struct PendingSay {
    say: Say,
    tried: bool,
}

struct BusThread {
    bus: Bus,
    process: String,
    changes: Sender<FollowChange>,
    deliver: Arc<dyn Fn(BusEvent) -> bool + Send + Sync>,
    health: Arc<BusHealth>,
    epochs: EpochSource,
    /// Followed room → the epoch it had when read.
    followed: HashMap<String, String>,
    /// Says whose append must be retried, in order, with those that came after them.
    says: VecDeque<PendingSay>,
    /// Leaves Redis has not taken yet: (room, member).
    leaves: Vec<(String, String)>,
    /// Rooms listed under this process in Redis (`P:rooms:<process>`).
    noted: HashSet<String>,
    /// When to retry `says` and `leaves`.
    retry_at: Option<Instant>,
    backoff: Duration,
    /// Whether this thread's last talk with Redis failed (the follower writes `health` too, so
    /// the end of an outage is told by this, not by `health`).
    down: bool,
    /// Followed rooms the check after an outage has not read yet ([`BusThread::check_epochs`]):
    /// one that failed is read again at the next heartbeat, and says to it wait or are
    /// refused until then.
    unchecked: HashSet<String>,
    /// The last message id the follower has read in each followed room (the follower writes).
    positions: Positions,
    /// Shared with the [`BusLink`]: one less for each say answered.
    says_in_flight: Arc<AtomicUsize>,
    history: usize,
    retain: usize,
}

impl BusThread {
    fn run(&mut self, inbox: Receiver<BusCommand>) {
        let mut next_beat = Instant::now();
        loop {
            let now = Instant::now();
            if now >= next_beat {
                self.heartbeat();
                next_beat = Instant::now() + HEARTBEAT;
            }
            if self.retry_at.is_some_and(|at| now >= at) {
                self.retry();
            }
            let wake = self.retry_at.map_or(next_beat, |at| at.min(next_beat));
            match inbox.recv_deadline(wake) {
                Ok(BusCommand::Shutdown) | Err(RecvTimeoutError::Disconnected) => break,
                Ok(command) => self.handle(command),
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
        self.stop();
    }

    /// Notes how a talk with Redis went, for `/healthz` and the log.
    fn answered<T>(&mut self, result: &Result<T, BusError>) {
        match result {
            Ok(_) => {
                self.health.up();
                if std::mem::take(&mut self.down) {
                    info!("Redis at {} answers again", self.health.redis());
                    self.check_epochs();
                }
            }
            Err(e) if e.kind == BusErrorKind::Refused => {}
            Err(e) => {
                self.health.down(&e.to_string());
                if !std::mem::replace(&mut self.down, true) {
                    error!("{e}: says are refused until Redis answers");
                }
            }
        }
    }

    fn handle(&mut self, command: BusCommand) {
        match command {
            BusCommand::Load { room } => self.load(room),
            BusCommand::ReadSince {
                room,
                after,
                client,
            } => {
                let read = self.bus.read_newest_after(&room, after, self.history);
                self.answered(&read);
                let history = read.unwrap_or_default();
                (self.deliver)(BusEvent::SinceRead {
                    room,
                    client,
                    history,
                });
            }
            BusCommand::ReadBefore {
                room,
                before,
                limit,
                reply,
            } => {
                let read = self.bus.read_before(&room, before, limit + 1);
                self.answered(&read);
                reply(read.ok().map(|mut page| {
                    let more = page.len() > limit;
                    page.drain(..page.len().saturating_sub(limit));
                    (page, more)
                }));
            }
            BusCommand::Join {
                room,
                client,
                session,
                candidates,
            } => self.join(room, client, session, candidates),
            BusCommand::Leave { room, client } => {
                let member = crate::bus::member(&self.process, client);
                self.leaves.push((room, member));
                self.retry_leaves();
            }
            BusCommand::Say(say) => {
                // Behind a say that waits for a retry, it waits too: a client's says keep
                // their order.
                let waiting = !self.says.is_empty();
                self.says.push_back(PendingSay {
                    say: *say,
                    tried: false,
                });
                if !waiting {
                    self.send_says();
                }
            }
            BusCommand::Typing { room, client, name } => {
                let member = crate::bus::member(&self.process, client);
                let sent = self.bus.typing(&room, &member, &name, PRESENCE_MAXLEN);
                self.answered(&sent);
            }
            BusCommand::ConnectionBroke => {
                self.bus.disconnect();
                self.down = true;
            }
            BusCommand::Forget { room } => {
                self.followed.remove(&room);
                // No client of this process is left there, unless a leave still waits.
                if !self.leaves.iter().any(|(r, _)| *r == room)
                    && self.noted.remove(&room)
                    && self.bus.unnote_room(&self.process, &room).is_err()
                {
                    self.noted.insert(room.clone());
                }
                let _ = self.changes.send(FollowChange::Unfollow { room });
            }
            BusCommand::Shutdown => {}
        }
    }

    fn load(&mut self, room: String) {
        let candidate = self.epochs.make();
        let loaded = self.bus.load(&room, &candidate, self.history);
        self.answered(&loaded);
        match loaded {
            Ok(snapshot) => {
                // Read just now: nothing for the check after an outage to find.
                self.unchecked.remove(&room);
                self.followed.insert(room.clone(), snapshot.epoch.clone());
                let change = FollowChange::Follow {
                    room: room.clone(),
                    log_at: snapshot.log_at,
                    presence_at: snapshot.presence_at,
                };
                let _ = self.changes.send(change);
                self.poke();
                (self.deliver)(BusEvent::Loaded { room, snapshot });
            }
            Err(e) => {
                warn!("reading a room from Redis failed: {e}");
                (self.deliver)(BusEvent::LoadFailed { room });
            }
        }
    }

    /// Wakes the follower so its next `XREAD` covers the new set of rooms.
    fn poke(&mut self) {
        let poked = self.bus.poke(&self.process);
        self.answered(&poked);
    }

    fn join(
        &mut self,
        room: String,
        client: ClientId,
        session: Option<String>,
        candidates: Vec<(String, String)>,
    ) {
        let member = crate::bus::member(&self.process, client);
        // Listed first, so a process that dies right after the join is cleared from the room.
        if self.noted.insert(room.clone()) {
            if let Err(e) = self.bus.note_room(&self.process, &room) {
                self.noted.remove(&room);
                self.answered::<()>(&Err(e));
                (self.deliver)(BusEvent::JoinFailed { room, client });
                return;
            }
        }
        let mut joined = self.bus.join(
            &room,
            &member,
            session.as_deref(),
            &candidates,
            PRESENCE_MAXLEN,
        );
        // A join is the same on a second try (the script knows the member), so one lost in
        // flight is simply tried again on a new connection.
        if joined.as_ref().is_err_and(BusError::may_have_applied) {
            joined = self.bus.join(
                &room,
                &member,
                session.as_deref(),
                &candidates,
                PRESENCE_MAXLEN,
            );
        }
        self.answered(&joined);
        if let Err(e) = joined {
            warn!("a join through Redis failed: {e}");
            // It may have landed all the same: make sure it is undone.
            self.leaves.push((room.clone(), member));
            self.schedule_retry();
            (self.deliver)(BusEvent::JoinFailed { room, client });
        }
    }

    /// Appends the waiting says in order, stopping at the first that must wait again.
    ///
    /// After an outage the rooms are checked before anything is appended to them (a heartbeat
    /// reconnects, and its answer runs the check): a say appended first would lengthen a log
    /// that went back in time, hide that from the check, and take an id already given out.
    /// While Redis stays out of reach, a say that was never sent is refused at once (one try
    /// to reach Redis per batch, not one per say), and one that may have landed waits.
    fn send_says(&mut self) {
        if self.down {
            self.mark_alive();
        }
        while let Some(pending) = self.says.pop_front() {
            let unchecked = self.unchecked.contains(&pending.say.room);
            if self.down || unchecked {
                if pending.tried {
                    self.says.push_front(pending);
                    self.schedule_retry();
                    return;
                }
                self.refuse(pending.say);
                continue;
            }
            if !self.append(pending.say, pending.tried) {
                return;
            }
        }
    }

    /// Appends one say. Returns `false` when it must wait (an append lost in flight: it is
    /// queued to be retried, `tried`).
    fn append(&mut self, say: Say, tried: bool) -> bool {
        let appended = self
            .bus
            .append(&say.room, &say.frame, &say.token, self.retain);
        self.answered(&appended);
        let result = match appended {
            // A retry that finds its token used found its own first try, which landed: the
            // follower delivers it to everyone, the sayer too. Only a say sent again by its
            // client (a `cid` after a reconnect) gets the original back on its own.
            Ok(appended) if tried => Ok(Appended {
                fresh: true,
                ..appended
            }),
            Ok(appended) => Ok(appended),
            // Only Redis running the script answers whether a say that may have landed did:
            // a login refused or no connection says nothing of it.
            Err(e) if e.may_have_applied() || (tried && e.kind != BusErrorKind::Refused) => {
                // It may have landed: ask again with its token until Redis answers.
                self.says.push_front(PendingSay { say, tried: true });
                self.schedule_retry();
                return false;
            }
            Err(_) => return self.refuse(say),
        };
        self.says_in_flight.fetch_sub(1, Ordering::AcqRel);
        if result.is_ok_and(|appended| appended.fresh) {
            // The usual case: the follower brings the echo, and the hub has nothing to do
            // (not waking it for this halves its wake-ups per message).
            return true;
        }
        self.answer_say(say, result);
        true
    }

    /// A say that was not appended and never will be: its client hears `unavailable`, with
    /// its text. Returns `true` (the next say need not wait).
    fn refuse(&mut self, say: Say) -> bool {
        self.says_in_flight.fetch_sub(1, Ordering::AcqRel);
        self.answer_say(say, Err(()));
        true
    }

    fn answer_say(&mut self, say: Say, result: Result<Appended, ()>) {
        (self.deliver)(BusEvent::Said {
            room: say.room,
            client: say.client,
            result,
            text: say.text,
            cid: say.cid,
        });
    }

    fn schedule_retry(&mut self) {
        if self.retry_at.is_none() {
            self.retry_at = Some(Instant::now() + self.backoff);
            self.backoff = (self.backoff * 2).min(BACKOFF_LAST);
        }
    }

    /// Retries the waiting says in order (stopping at the first that must wait again), then
    /// the waiting leaves.
    fn retry(&mut self) {
        self.retry_at = None;
        self.send_says();
        self.retry_leaves();
        if self.says.is_empty() && self.leaves.is_empty() {
            self.backoff = BACKOFF_FIRST;
        }
    }

    fn retry_leaves(&mut self) {
        let mut waiting = Vec::new();
        for (room, member) in std::mem::take(&mut self.leaves) {
            let left = self
                .bus
                .leave(&room, std::slice::from_ref(&member), false, PRESENCE_MAXLEN);
            self.answered(&left);
            if left.is_err() {
                waiting.push((room, member));
            }
        }
        if !waiting.is_empty() {
            self.leaves = waiting;
            self.schedule_retry();
        }
    }

    /// Marks this process alive in Redis; returns whether Redis answered. The first answer
    /// after an outage runs the check of the rooms ([`BusThread::answered`]).
    fn mark_alive(&mut self) -> bool {
        let beat = self.bus.set_alive(&self.process, ALIVE_FOR);
        self.answered(&beat);
        beat.is_ok()
    }

    /// Marks this process alive, and clears the rooms of processes that are not: each
    /// registered process's heartbeat is read in one `MGET`, and a dead one's rooms (listed
    /// under its name when it joined them, whether or not this process follows them) lose its
    /// members, at most [`REAP_PER_BEAT`] rooms per heartbeat so a says queue never waits long
    /// behind it. The work per heartbeat grows with processes, not with rooms.
    fn heartbeat(&mut self) {
        let was_down = self.down;
        if !self.mark_alive() {
            return;
        }
        // At the end of an outage `mark_alive` has just checked the rooms.
        if !was_down && !self.unchecked.is_empty() {
            self.check_unchecked();
        }
        let Ok(processes) = self.bus.processes() else {
            return;
        };
        let Ok(alive) = self.bus.alive(&processes) else {
            return;
        };
        let mut budget = REAP_PER_BEAT;
        for (process, alive) in processes.iter().zip(alive) {
            if alive || *process == self.process || budget == 0 {
                continue;
            }
            let Ok(rooms) = self.bus.rooms_of(process, budget) else {
                return;
            };
            if rooms.is_empty() {
                let _ = self.bus.forget_process(process);
                continue;
            }
            budget = budget.saturating_sub(rooms.len());
            let dead = std::slice::from_ref(process);
            for room in rooms {
                if self.bus.leave(&room, dead, true, PRESENCE_MAXLEN).is_ok() {
                    let _ = self.bus.unnote_room(process, &room);
                }
            }
        }
    }

    /// After an outage: a followed room whose epoch is not the one read (Redis lost it) is
    /// lost for this process; the hub closes its clients so they join it afresh.
    ///
    /// A room whose log ends before the last message this process read has gone back in time
    /// (Redis restarted from an older snapshot, or an `appendfsync everysec` file missing its
    /// last second): its next ids would be given out a second time, to other messages. Its
    /// epoch is renewed, so every process and every page starts the room over.
    fn check_epochs(&mut self) {
        self.unchecked = self.followed.keys().cloned().collect();
        self.check_unchecked();
    }

    /// Checks the rooms [`BusThread::check_epochs`] has not read yet. The first that cannot be
    /// read ends it: the next heartbeat goes on (not the next command: a room that stays
    /// unreadable must not cost each say a round trip per room).
    fn check_unchecked(&mut self) {
        let rooms: Vec<String> = self.unchecked.iter().cloned().collect();
        for room in rooms {
            let Some(known) = self.followed.get(&room).cloned() else {
                self.unchecked.remove(&room);
                continue;
            };
            match self.changed_during_outage(&room, &known) {
                Ok(false) => {}
                Ok(true) => {
                    warn!("a room's data in Redis changed during an outage: its clients reconnect");
                    self.followed.remove(&room);
                    let _ = self
                        .changes
                        .send(FollowChange::Unfollow { room: room.clone() });
                    // Says on their way to it are handed back before its clients are closed:
                    // the room they were said in starts over.
                    let (lost, kept) = std::mem::take(&mut self.says)
                        .into_iter()
                        .partition(|pending| pending.say.room == room);
                    self.says = kept;
                    for pending in lost {
                        self.refuse(pending.say);
                    }
                    (self.deliver)(BusEvent::RoomLost { room: room.clone() });
                }
                Err(e) => {
                    warn!("checking the rooms after an outage failed, checked again in {HEARTBEAT:?}: {e}");
                    return;
                }
            }
            self.unchecked.remove(&room);
        }
    }

    /// Whether `room` changed in Redis while this process could not see it: its epoch is no
    /// longer `known`, or its log ends before what this process read (then its epoch is renewed
    /// here, once for every process).
    fn changed_during_outage(&mut self, room: &str, known: &str) -> Result<bool, BusError> {
        let state = self.bus.room_state(room)?;
        if state.epoch.as_deref() != Some(known) {
            return Ok(true);
        }
        if self.bus.log_end(room)? >= read_position(&self.positions, room) {
            return Ok(false);
        }
        self.bus.renew_epoch(room, known, &self.epochs.make())?;
        Ok(true)
    }

    /// A clean stop: this process's members leave every room it follows, it is no longer
    /// alive, and the follower ends.
    fn stop(&mut self) {
        let process = [self.process.clone()];
        let rooms: Vec<String> = self.followed.keys().cloned().collect();
        // Redis out of reach: the first failure ends it (each try may take the connect
        // timeout); the survivors reap this process's members once its heartbeat expires.
        for room in rooms {
            if self
                .bus
                .leave(&room, &process, true, PRESENCE_MAXLEN)
                .is_err()
            {
                break;
            }
        }
        let _ = self.bus.set_alive(&self.process, Duration::ZERO);
        let _ = self.bus.forget_process(&self.process);
        let _ = self.changes.send(FollowChange::Stop);
        let _ = self.bus.poke(&self.process);
    }
}

/// The follower thread: waits for entries of the followed rooms and hands them to the hub,
/// taking changes of the set between waits (a poke ends a wait early).
fn follow(
    mut follower: Follower,
    changes: Receiver<FollowChange>,
    deliver: Arc<dyn Fn(BusEvent) -> bool + Send + Sync>,
    health: Arc<BusHealth>,
    bus: Sender<BusCommand>,
    positions: Positions,
) {
    let mut backoff = BACKOFF_FIRST;
    let mut broken = false;
    let set = |room: &str, id: Option<u64>| {
        let mut positions = positions.lock().unwrap_or_else(|p| p.into_inner());
        match id {
            Some(id) => positions.insert(room.to_owned(), id),
            None => positions.remove(room),
        };
    };
    let apply = |follower: &mut Follower, change: FollowChange| match change {
        FollowChange::Follow {
            room,
            log_at,
            presence_at,
        } => {
            follower.follow_with_presence(&room, log_at, presence_at);
            set(&room, Some(log_at.0));
            true
        }
        FollowChange::Unfollow { room } => {
            follower.unfollow(&room);
            set(&room, None);
            true
        }
        FollowChange::Stop => false,
    };
    loop {
        for change in changes.try_iter() {
            if !apply(&mut follower, change) {
                return;
            }
        }
        match follower.wait(FOLLOW_BLOCK, FOLLOW_COUNT) {
            Ok(followed) => {
                backoff = BACKOFF_FIRST;
                broken = false;
                health.up();
                if followed.entries.is_empty() && followed.presence.is_empty() {
                    continue;
                }
                for entry in &followed.entries {
                    set(&entry.room, Some(entry.id));
                }
                let event = BusEvent::Followed {
                    messages: followed.entries,
                    presence: followed.presence,
                };
                if !deliver(event) {
                    return; // The hub has ended.
                }
            }
            Err(e) => {
                // The bus thread hears it before `/healthz` does, so a say sent after
                // `/healthz` says `down` meets a dropped connection.
                if !std::mem::replace(&mut broken, true) {
                    let _ = bus.send(BusCommand::ConnectionBroke);
                }
                health.down(&e.to_string());
                // Wait before reconnecting, unless told something meanwhile.
                match changes.recv_timeout(backoff) {
                    Ok(change) => {
                        if !apply(&mut follower, change) {
                            return;
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
                backoff = (backoff * 2).min(BACKOFF_LAST);
            }
        }
    }
}
