//! The room hub: ONE thread that owns every room: members, names, history and ids.
//!
//! Readers ([`crate::client`]) send it [`HubCommand`]s over one bounded crossbeam channel; it
//! answers by encoding each event once as a WebSocket frame ([`Frame`]) and offering it to
//! every member's [`Connection`]. At the end of a burst it flushes each connection it touched:
//! one non-blocking `sendmsg` per client for the whole burst, and no thread woken (see
//! [`crate::connection`]). Because one thread does all of it, ids are handed out in order and
//! every member of a room sees the same sequence.
//!
//! Invariant: **the hub never blocks on a client, never touches the disk and never waits for
//! the store.** Its writes never block (`MSG_DONTWAIT`); what a socket does not take waits for
//! that client's backlog writer. A member whose queue is full is a slow consumer: it is told to
//! close (1008) and the room hears it `left`.
//!
//! With a history store ([`crate::store`]), each message goes to the store after its broadcast,
//! and a room not in memory is asked of the store: its commands wait in a per-room queue until
//! [`HubCommand::RoomLoaded`] comes back, then run in the order they came, while every other
//! room carries on.
//!
//! **Memory budget** (`--memory-budget`): the history held in memory, rooms with members and
//! the idle rooms kept for people coming back, is counted in bytes ([`Room::memory_bytes`]:
//! frames, names, per-message and per-room overhead). Past the budget the hub frees down to
//! seven eighths of it (so the work comes once per eighth of the budget, never per message):
//! first it forgets idle rooms, the longest idle first (with a store they are read from disk
//! again when someone comes back); then it trims the oldest messages of the rooms with members,
//! the biggest first, down to one common size ("water-filling"). A trimmed room's `welcome`
//! replays fewer than `--history` messages; a client that resumes with `since` still gets every
//! message it missed (within `--history`): when memory dropped some, its join waits for the
//! store to read them ([`StoreCommand::ReadSince`]). With `--data none` trimmed messages are
//! gone.
//!
//! With `--redis` the rooms are shared with other processes, and Redis hands out the ids and
//! names: `shared_rooms.rs` is that half of the hub (the bus thread, [`crate::cluster`], stands
//! between it and Redis; it never waits on the network either).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::{debug, error, warn};
use tungstenite::Utf8Bytes;

use crate::bus::StreamPos;
use crate::cluster::{BusCommand, BusEvent, BusLink};
use crate::config::CrashForTests;
use crate::connection::{CloseCode, Connection, Offer};
use crate::protocol;
use crate::room::{self, ClientId, EpochSource, Room, StoredMessage};
use crate::shared::Shared;
use crate::store::{self, Append, LoadedRoom, StoreCommand, StoreLink};
use crate::wire::Frame;

mod shared_rooms;

/// Empty rooms are remembered (with their history and epoch) so people coming back find the
/// conversation; beyond this many, the longest-idle empty room is forgotten to bound memory.
pub const MAX_IDLE_ROOMS: usize = 1000;

/// A client whose resume needs the store is asked for again at most this many times when memory
/// was trimmed once more while the store read (then it gets what memory holds).
const RESUME_TRIES: u8 = 3;

/// Commands handled at most before the touched connections are flushed, when more keep
/// coming. Each command's fan-out takes microseconds, so this bounds the delay a busy hub adds
/// to well under a millisecond.
const FLUSH_EVERY: usize = 64;

/// Commands from client readers (and from [`crate::ServerHandle::shutdown`]) to the hub.
pub enum HubCommand {
    /// A client sent a valid `hello`.
    Join(Join),
    /// A client sent a valid `say`; `text` is already trimmed and checked. `cid` is the
    /// client's own id for it, if it gave one.
    Say {
        client: ClientId,
        text: String,
        cid: Option<String>,
    },
    /// A client asked for the page of history before id `before` (at most `limit` messages).
    History {
        client: ClientId,
        before: u64,
        limit: usize,
    },
    /// A client is typing (already throttled by its reader).
    Typing { client: ClientId },
    /// A client's reader has ended.
    Leave { client: ClientId },
    /// The store's answer to [`StoreCommand::Load`].
    RoomLoaded { room: String, loaded: LoadedRoom },
    /// The store thread has ended (sent when its thread ends, however it ends): no `Load` will
    /// be answered any more.
    StoreStopped,
    /// From the bus and follower threads (`--redis`).
    Bus(BusEvent),
    /// End the hub.
    Shutdown,
}

/// A client's `hello`, as the hub needs it.
pub struct Join {
    pub client: ClientId,
    pub room: String,
    /// The name it asked for (made unique in the room if taken).
    pub name: String,
    pub session: Option<String>,
    pub since: Option<u64>,
    pub epoch: Option<String>,
    pub link: MemberLink,
}

/// How the hub reaches one member: the client's connection.
pub type MemberLink = Arc<Connection>;

/// Runs the hub until [`HubCommand::Shutdown`] or until every sender is gone. With `store`,
/// history is kept on disk by the store thread; without, in memory only.
pub fn run(
    commands: Receiver<HubCommand>,
    store: Option<StoreLink>,
    bus: Option<BusLink>,
    history_limit: usize,
    shared: Arc<Shared>,
) {
    let mut hub = Hub::new(history_limit, store, bus, shared);
    if let Some(store) = &hub.store {
        store.send(StoreCommand::DiskBudget(hub.shared.config.max_disk));
    }
    hub.publish_memory();
    let mut since_flush = 0;
    loop {
        // With appends waiting for the store, wait no longer than their commit time.
        let command = match hub.store_batch_due() {
            Some(due) => match commands.recv_deadline(due) {
                Ok(command) => command,
                Err(RecvTimeoutError::Timeout) => {
                    hub.ask_store_to_commit();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            },
            None => match commands.recv() {
                Ok(command) => command,
                Err(_) => break,
            },
        };
        // Connections are closed by shutdown itself (it knows those without a room too). The
        // flag is checked too, so a Shutdown queued behind a storm of commands does not wait
        // for them all.
        if matches!(command, HubCommand::Shutdown) || hub.shared.stopping.load(Ordering::Acquire) {
            break;
        }
        hub.handle(command);
        // Connections are flushed once the hub has nothing more to hand out (or every so many
        // commands, so a never-empty queue cannot hold frames back): one system call per
        // client per burst. The store, too, is woken only here, when its batch is due.
        since_flush += 1;
        if commands.is_empty() || since_flush >= FLUSH_EVERY {
            hub.flush_connections();
            if hub
                .store_batch_due()
                .is_some_and(|due| Instant::now() >= due)
            {
                hub.ask_store_to_commit();
            }
            since_flush = 0;
        }
    }
    hub.flush_connections();
    if let Some(store) = &hub.store {
        store.send(StoreCommand::Shutdown);
    }
    if let Some(bus) = &hub.bus {
        bus.send(BusCommand::Shutdown);
    }
}

struct Hub {
    rooms: HashMap<String, Room<MemberLink>>,
    /// Which room each joined client is in.
    room_of: HashMap<ClientId, String>,
    /// Empty rooms by the order they emptied, oldest first: the eviction queue.
    idle_rooms: BTreeMap<u64, String>,
    idle_since: HashMap<String, u64>,
    idle_counter: u64,
    /// Connections that were given frames in this burst and owe a flush at its end.
    to_flush: Vec<Arc<Connection>>,
    history_limit: usize,
    /// Epochs of rooms made in memory (without a store; the store makes its own).
    epochs: EpochSource,
    /// The store thread, when history is kept on disk.
    store: Option<StoreLink>,
    /// Rooms asked of the store, with the commands that wait for them, in arrival order.
    loading: HashMap<String, Vec<HubCommand>>,
    /// Clients whose `Join` waits in `loading`, and for which room.
    waiting_for_room: HashMap<ClientId, String>,
    /// Set while the store's backlog is full, so that is logged once, not per message.
    store_full: bool,
    /// When the oldest append not yet asked to be committed was handed to the store.
    store_batch_since: Option<Instant>,
    /// Clients whose join waits for the store to read the history memory dropped, with their
    /// commands (the Join first), in arrival order.
    resuming: HashMap<ClientId, Resume>,
    /// Bytes of history in memory, every room's [`Room::memory_bytes`], against `budget`.
    memory_used: usize,
    /// `--memory-budget`.
    budget: usize,
    /// Set once rooms with members have been trimmed, so that is logged once.
    trimmed_live: bool,
    /// The bus thread, when rooms are shared through Redis (`--redis`); then `store` is `None`.
    bus: Option<BusLink>,
    /// With a bus: what the hub knows of the rooms' presence beyond its own clients.
    shared_rooms: SharedRooms,
    shared: Arc<Shared>,
}

/// What the hub keeps for rooms shared through Redis, beside the rooms themselves.
#[derive(Default)]
struct SharedRooms {
    /// Connections of other processes (`<process>/<client>`) as the ids the rooms know them
    /// by: counted down from the top of the id space, far from this process's own.
    remote_ids: HashMap<String, ClientId>,
    next_remote: ClientId,
    /// Each loaded room's position in its presence stream: what was read with the room is not
    /// applied again.
    presence_at: HashMap<String, StreamPos>,
    /// Clients whose join waits for its presence event, with their later commands.
    joining: HashMap<ClientId, PendingJoin>,
    /// Says handed to the bus, for their tokens.
    says: u64,
}

/// A join sent to Redis, waiting to be read back in the room's presence order.
struct PendingJoin {
    join: Join,
    stored: Vec<StoredMessage>,
    later: Vec<HubCommand>,
    /// Set once the join has come back (its name, and whether a new person appeared) while
    /// its welcome still waits for Redis to read what memory dropped after its `since`.
    decided: Option<(String, bool)>,
}

/// Names tried for a person in a shared room: the wanted one, then `name (2)` … `name (32)`,
/// each with its look-alike key (Redis compares keys; it knows no Unicode).
const NAME_CANDIDATES: usize = 32;

/// What a welcome needs beside the room: the client's resume point, what the store read for
/// it, and the name the room gave it.
struct Welcome {
    since: Option<u64>,
    epoch: Option<String>,
    stored: Vec<StoredMessage>,
    name: String,
    new_person: bool,
}

/// Closes a client that cannot join because Redis cannot be reached: 1013, "try again
/// later", which the page does after its usual pause.
fn refuse_unreachable(link: &MemberLink) {
    link.close_with(
        CLOSE_TRY_AGAIN,
        "the chat service is unreachable: try again later",
    );
}

/// Close codes for clients of shared rooms: try again later (Redis unreachable), and
/// service restart (the room's data in Redis was lost: join again for its new epoch).
const CLOSE_TRY_AGAIN: CloseCode = 1013;
const CLOSE_RESTART: CloseCode = 1012;

/// A join waiting for [`StoreCommand::ReadSince`].
struct Resume {
    /// The Join, then the client's later commands.
    commands: Vec<HubCommand>,
    /// The id after which the client wants history.
    after: u64,
    tries: u8,
}

/// Milliseconds since 1970, the `ts` of every event.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Hub {
    fn new(
        history_limit: usize,
        store: Option<StoreLink>,
        bus: Option<BusLink>,
        shared: Arc<Shared>,
    ) -> Self {
        Hub {
            rooms: HashMap::new(),
            room_of: HashMap::new(),
            idle_rooms: BTreeMap::new(),
            idle_since: HashMap::new(),
            idle_counter: 0,
            to_flush: Vec::new(),
            history_limit,
            epochs: EpochSource::new(),
            store,
            loading: HashMap::new(),
            waiting_for_room: HashMap::new(),
            store_full: false,
            store_batch_since: None,
            resuming: HashMap::new(),
            memory_used: 0,
            budget: shared.config.memory_budget,
            trimmed_live: false,
            bus,
            shared_rooms: SharedRooms {
                next_remote: ClientId::MAX,
                ..SharedRooms::default()
            },
            shared,
        }
    }

    /// Whether rooms not in memory are read from somewhere (the store, or Redis).
    fn has_loader(&self) -> bool {
        self.store.is_some() || self.bus.is_some()
    }

    fn handle(&mut self, command: HubCommand) {
        // A client whose room is still being read waits with it, so its commands keep their
        // order behind its Join.
        let waiting_client = match &command {
            HubCommand::Say { client, .. }
            | HubCommand::History { client, .. }
            | HubCommand::Typing { client }
            | HubCommand::Leave { client } => Some(*client),
            _ => None,
        };
        if let Some(room) = waiting_client.and_then(|c| self.waiting_for_room.get(&c)) {
            if let Some(queue) = self.loading.get_mut(room) {
                queue.push(command);
            }
            return;
        }
        if let Some(resume) = waiting_client.and_then(|c| self.resuming.get_mut(&c)) {
            resume.commands.push(command);
            return;
        }
        if let Some(client) = waiting_client {
            if let HubCommand::Leave { .. } = command {
                if let Some(pending) = self.shared_rooms.joining.remove(&client) {
                    self.leave_shared(client, &pending.join.room);
                    return;
                }
            } else if let Some(pending) = self.shared_rooms.joining.get_mut(&client) {
                pending.later.push(command);
                return;
            }
        }
        // A Join for a room not in memory waits for the store (or Redis) to read it.
        if let HubCommand::Join(join) = &command {
            if self.has_loader() && !self.rooms.contains_key(&join.room) {
                let client = join.client;
                self.wait_for_room(client, command);
                return;
            }
            // A Join resuming after messages memory dropped waits for the store to read them.
            let missing = self.missing_from_memory(&join.room, join.since, join.epoch.as_deref());
            if let Some(after) = missing {
                let (client, room) = (join.client, join.room.clone());
                self.ask_since(client, room, after, vec![command], 0);
                return;
            }
        }
        match command {
            HubCommand::Join(join) => self.join(join, Vec::new()),
            HubCommand::Say { client, text, cid } => self.say(client, &text, cid.as_deref()),
            HubCommand::History {
                client,
                before,
                limit,
            } => self.history(client, before, limit),
            HubCommand::Typing { client } => self.typing(client),
            HubCommand::Leave { client } => self.leave(client),
            HubCommand::RoomLoaded { room, loaded } => self.room_loaded(room, loaded),
            HubCommand::StoreStopped => self.store_stopped(),
            HubCommand::Bus(event) => self.bus_event(event),
            HubCommand::Shutdown => {}
        }
    }

    /// Queues a Join for a room not in memory, asking the store for it if nobody has yet.
    fn wait_for_room(&mut self, client: ClientId, join: HubCommand) {
        let HubCommand::Join(Join { room, .. }) = &join else {
            return;
        };
        let room = room.clone();
        self.waiting_for_room.insert(client, room.clone());
        if let Some(queue) = self.loading.get_mut(&room) {
            queue.push(join);
            return;
        }
        self.loading.insert(room.clone(), vec![join]);
        if let Some(bus) = &self.bus {
            if !bus.send(BusCommand::Load { room: room.clone() }) {
                self.load_failed(room);
            }
            return;
        }
        // The store's channel is unbounded: this never waits.
        let asked = self
            .store
            .as_ref()
            .is_some_and(|store| store.send(StoreCommand::Load { room }));
        if !asked {
            self.store_stopped();
        }
    }

    /// The store thread is gone (it can only have died: it ends after the hub otherwise).
    /// Rooms go on in memory, and every room waiting for a load starts without its history,
    /// under a new epoch so no page trusts ids it cannot check.
    fn store_stopped(&mut self) {
        if self.store.take().is_none() {
            return;
        }
        error!("the history store has stopped; rooms go on in memory only");
        self.store_batch_since = None;
        let waiting: Vec<String> = self.loading.keys().cloned().collect();
        for room in waiting {
            let loaded = LoadedRoom {
                handle: 0,
                epoch: self.epochs.make(),
                last_id: 0,
                history: Vec::new(),
                resume_of: None,
            };
            self.room_loaded(room, loaded);
        }
        // Resumes waiting for a read go on with what memory holds.
        let resuming: Vec<Resume> = self.resuming.drain().map(|(_, r)| r).collect();
        for resume in resuming {
            for command in resume.commands {
                self.handle(command);
            }
        }
    }

    /// When a client resuming after id `since` (of `epoch`) in a room held in memory would miss
    /// messages that memory dropped to fit its budget and the store may still have: the id
    /// after which it wants them.
    fn missing_from_memory(
        &self,
        room_name: &str,
        since: Option<u64>,
        epoch: Option<&str>,
    ) -> Option<u64> {
        if !self.has_loader() {
            return None;
        }
        let room = self.rooms.get(room_name)?;
        let after = room.resume_point(since, epoch);
        let missing = after > 0
            && room.trimmed_through() > after
            && room.count_after(after) < self.history_limit;
        missing.then_some(after)
    }

    /// Asks the store for a room's history after `after`, for `client`, whose commands wait.
    fn ask_since(
        &mut self,
        client: ClientId,
        room: String,
        after: u64,
        commands: Vec<HubCommand>,
        tries: u8,
    ) {
        self.resuming.insert(
            client,
            Resume {
                commands,
                after,
                tries,
            },
        );
        if let Some(bus) = &self.bus {
            if !bus.send(BusCommand::ReadSince {
                room: room.clone(),
                after,
                client,
            }) {
                self.since_read(client, room, Vec::new());
            }
            return;
        }
        let asked = self.store.as_ref().is_some_and(|store| {
            store.send(StoreCommand::ReadSince {
                room,
                after,
                client,
            })
        });
        if !asked {
            self.store_stopped();
        }
    }

    /// The store has read what a resuming client missed: it joins with that history, unless
    /// memory dropped more meanwhile (then the store is asked again), or the room has left
    /// memory (then the join starts over).
    fn resume_read(&mut self, client: ClientId, room_name: &str, loaded: LoadedRoom) {
        let Some(resume) = self.resuming.remove(&client) else {
            return;
        };
        let mut commands = resume.commands.into_iter();
        let Some(join) = commands.next() else {
            return;
        };
        let gap = self
            .rooms
            .get(room_name)
            .map(|room| room.trimmed_through() > loaded.last_id.max(resume.after));
        match (join, gap) {
            (join, Some(true)) if resume.tries + 1 < RESUME_TRIES => {
                let mut waiting = vec![join];
                waiting.extend(commands);
                let tries = resume.tries + 1;
                self.ask_since(client, room_name.to_owned(), resume.after, waiting, tries);
            }
            (HubCommand::Join(join), Some(_)) => {
                self.join(join, loaded.history);
                for command in commands {
                    self.handle(command);
                }
            }
            (join, _) => {
                self.handle(join);
                for command in commands {
                    self.handle(command);
                }
            }
        }
    }

    /// The store has read a room: it enters memory and its waiting commands run in order.
    fn room_loaded(&mut self, room_name: String, loaded: LoadedRoom) {
        if let Some(client) = loaded.resume_of {
            self.resume_read(client, &room_name, loaded);
            return;
        }
        let history = loaded
            .history
            .into_iter()
            .map(|m| StoredMessage {
                id: m.id,
                frame: room::exact_frame(&m.frame),
            })
            .collect();
        let room = Room::restore(
            room_name.clone(),
            loaded.handle,
            loaded.epoch,
            self.history_limit,
            loaded.last_id,
            history,
        );
        self.install_room(room);
    }

    /// A room read from the store or Redis enters memory, and the commands that waited for it
    /// run in order.
    fn install_room(&mut self, room: Room<MemberLink>) {
        let room_name = room.name().to_owned();
        self.memory_used += room.memory_bytes();
        if let Some(old) = self.rooms.insert(room_name.clone(), room) {
            self.memory_used -= old.memory_bytes();
        }
        let waiting = self.loading.remove(&room_name).unwrap_or_default();
        for command in &waiting {
            if let HubCommand::Join(join) = command {
                self.waiting_for_room.remove(&join.client);
            }
        }
        // The first waiting command is a Join, and a client's Leave runs after its Join: so
        // the room is either in use or, if everyone has gone already, idle like any other.
        for command in waiting {
            self.handle(command);
        }
        self.fit_memory_budget();
    }

    /// A client joins. `stored` is what the store read for it after its `since`, when memory
    /// had dropped some of it (else empty).
    fn join(&mut self, join: Join, stored: Vec<StoredMessage>) {
        if let Some(CrashForTests::HubOnJoin(doomed)) = &self.shared.config.crash_for_tests {
            assert!(
                doomed != &join.room,
                "crash_for_tests: the hub panics on a join"
            );
        }
        if let Some(seq) = self.idle_since.remove(&join.room) {
            self.idle_rooms.remove(&seq);
        }
        if self.bus.is_some() {
            self.join_shared(join, stored);
            return;
        }
        let Join {
            client,
            room: room_name,
            name: wanted,
            session,
            since,
            epoch,
            link,
        } = join;
        let (epochs, limit) = (&mut self.epochs, self.history_limit);
        let memory_used = &mut self.memory_used;
        let room = self.rooms.entry(room_name.clone()).or_insert_with(|| {
            let room = Room::new(room_name.clone(), epochs.make(), limit);
            *memory_used += room.memory_bytes();
            room
        });
        if room.is_empty() {
            self.shared.active_rooms.fetch_add(1, Ordering::Relaxed);
        }
        let connection = Arc::clone(&link);
        let joined = room.join(client, link, &wanted, session.as_deref());
        let welcome = Welcome {
            since,
            epoch,
            stored,
            name: joined.name,
            new_person: joined.new_person,
        };
        self.welcome(client, &room_name, connection, welcome);
    }

    /// Sends a joined client its welcome (the history after its `since`, and who is in the
    /// room), and tells the room if a new person appeared.
    fn welcome(&mut self, client: ClientId, room_name: &str, connection: MemberLink, w: Welcome) {
        let limit = self.history_limit;
        let Some(room) = self.rooms.get(room_name) else {
            return;
        };
        let (since, epoch, stored) = (w.since, w.epoch, w.stored);
        let joined = room::Joined {
            name: w.name,
            new_person: w.new_person,
        };
        let users = room.users();
        // What the store read (ids up to `read_through`), then what memory holds after it.
        let after = room.resume_point(since, epoch.as_deref());
        let read_through = stored.last().map_or(after, |m| m.id.max(after));
        let mut history: Vec<&str> = stored
            .iter()
            .filter(|m| m.id > after)
            .chain(room.history_after(read_through))
            .map(|m| m.frame.as_str())
            .collect();
        history.drain(..history.len().saturating_sub(limit));
        let welcome = protocol::encode_welcome(
            room.name(),
            &joined.name,
            room.epoch(),
            &users,
            history.into_iter(),
        );
        self.room_of.insert(client, room_name.to_owned());
        // A fresh queue has room for the welcome; if not, the client is gone already.
        if connection.offer(Frame::text(welcome)) == (Offer::Queued { flush: true }) {
            self.to_flush.push(connection);
        }
        if joined.new_person {
            let frame = protocol::encode_joined(&joined.name, now_ms());
            self.broadcast(room_name, frame, Some(client));
        }
        self.fit_memory_budget();
    }

    fn say(&mut self, client: ClientId, text: &str, cid: Option<&str>) {
        let Some(room_name) = self.room_of.get(&client) else {
            return; // Already dropped (e.g. as a slow consumer); its last words go nowhere.
        };
        let room_name = room_name.clone();
        let Some(room) = self.rooms.get_mut(&room_name) else {
            return;
        };
        let Some(name) = room.name_of(client).map(str::to_owned) else {
            return;
        };
        let sender = cid.and_then(|_| room.sender_of(client));
        if let (Some(sender), Some(cid)) = (&sender, cid) {
            // Sent again (after a reconnect, say): the original, to this client only.
            if let Some(original) = room.said_before(sender, cid) {
                let frame = Frame::text(original.frame.clone());
                self.send_to(client, &room_name, frame);
                return;
            }
        }
        if self.bus.is_some() {
            self.say_shared(client, room_name, name, text, cid, sender);
            return;
        }
        let Some(room) = self.rooms.get_mut(&room_name) else {
            return;
        };
        let id = room.next_id();
        // The copy history keeps owns exactly its bytes; everyone shares it.
        let frame = room::exact_frame(&protocol::encode_message(
            id,
            room.name(),
            &name,
            text,
            now_ms(),
            cid,
        ));
        let before = room.history_bytes();
        room.remember_said(
            StoredMessage {
                id,
                frame: frame.clone(),
            },
            sender.as_ref().zip(cid),
        );
        self.memory_used = self.memory_used + room.history_bytes() - before;
        self.shared.metrics.messages.fetch_add(1, Ordering::Relaxed);
        let kept = Append {
            room: room.store_handle(),
            id,
            frame: frame.clone(),
        };
        self.broadcast(&room_name, frame, None);
        self.keep(kept);
        self.fit_memory_budget();
    }

    /// Offers one frame to one member of a room, to be flushed at the end of the burst.
    fn send_to(&mut self, client: ClientId, room_name: &str, frame: Frame) {
        let link = self.rooms.get(room_name).and_then(|room| {
            room.members()
                .find(|(id, _)| *id == client)
                .map(|(_, link)| Arc::clone(link))
        });
        if let Some(link) = link {
            if let Offer::Queued { flush: true } = link.offer(frame) {
                self.to_flush.push(link);
            }
        }
    }

    /// A page of older history for one client: from memory when memory holds it and one
    /// message more (so `more` is sure), else read by the store thread, which answers the
    /// client itself (the hub never waits for the disk). Without a store, memory is all there
    /// is.
    fn history(&mut self, client: ClientId, before: u64, limit: usize) {
        let Some(room_name) = self.room_of.get(&client).cloned() else {
            return;
        };
        let Some(room) = self.rooms.get(&room_name) else {
            return;
        };
        let older: Vec<&StoredMessage> =
            room.history_before(before).rev().take(limit + 1).collect();
        let in_memory = older.len() > limit;
        if !in_memory && self.bus.is_some() {
            self.history_shared(client, room_name, before, limit);
            return;
        }
        if in_memory || self.store.is_none() {
            let page = older.iter().take(limit).rev().map(|m| m.frame.as_str());
            let frame = Frame::text(protocol::encode_history(page, in_memory));
            self.send_to(client, &room_name, frame);
            return;
        }
        let link = room
            .members()
            .find(|(id, _)| *id == client)
            .map(|(_, link)| Arc::clone(link));
        let Some(link) = link else {
            return;
        };
        let reply: store::HistoryReply = Box::new(move |page, more| {
            let frames = page.iter().map(|m| m.frame.as_str());
            let _ = link.send(Frame::text(protocol::encode_history(frames, more)));
        });
        let asked = self.store.as_ref().is_some_and(|store| {
            store.send(StoreCommand::ReadBefore {
                room: room_name,
                before,
                limit,
                reply,
            })
        });
        if !asked {
            self.store_stopped();
            self.history(client, before, limit);
        }
    }

    /// Hands a broadcast message to the store, unless its backlog is full (a disk failing for
    /// long): then the message lives in memory only, and is counted as dropped.
    fn keep(&mut self, message: Append) {
        let Some(store) = &self.store else {
            return;
        };
        let health = &self.shared.store_health;
        let bytes = message.frame.len() as u64;
        // Messages waiting for a failing disk are memory too: at most MAX_UNWRITTEN of them,
        // and at most half the memory budget in bytes (16 KB frames would otherwise hold 1.6 GB).
        let bytes_limit = (self.budget / 2) as u64;
        let full = health.unwritten.load(Ordering::Relaxed) >= store::MAX_UNWRITTEN
            || health.unwritten_bytes.load(Ordering::Relaxed) + bytes > bytes_limit;
        if full {
            health.dropped.fetch_add(1, Ordering::Relaxed);
            if !self.store_full {
                error!(
                    "{} messages ({} bytes) wait for the disk: new messages are kept in memory \
                     only",
                    health.unwritten.load(Ordering::Relaxed),
                    health.unwritten_bytes.load(Ordering::Relaxed)
                );
                self.store_full = true;
            }
            return;
        }
        self.store_full = false;
        health.unwritten.fetch_add(1, Ordering::Relaxed);
        health.unwritten_bytes.fetch_add(bytes, Ordering::Relaxed);
        if store.append(message) {
            self.store_batch_since.get_or_insert_with(Instant::now);
        } else {
            health.unwritten.fetch_sub(1, Ordering::Relaxed);
            health.unwritten_bytes.fetch_sub(bytes, Ordering::Relaxed);
            health.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// When the store must be asked to commit what it has been handed, if anything.
    fn store_batch_due(&self) -> Option<Instant> {
        self.store_batch_since
            .map(|since| since + store::ASK_TO_COMMIT_AFTER)
    }

    fn ask_store_to_commit(&mut self) {
        if let (Some(store), Some(_)) = (&self.store, self.store_batch_since.take()) {
            store.send(StoreCommand::Commit);
        }
    }

    fn typing(&mut self, client: ClientId) {
        let Some(room_name) = self.room_of.get(&client).cloned() else {
            return;
        };
        let Some(name) = self
            .rooms
            .get(&room_name)
            .and_then(|r| r.name_of(client))
            .map(str::to_owned)
        else {
            return;
        };
        if let Some(bus) = &self.bus {
            // Every process's members hear it when it comes back, this one's too.
            let room = room_name;
            bus.send(BusCommand::Typing { room, client, name });
            return;
        }
        self.broadcast(&room_name, protocol::encode_typing(&name), Some(client));
    }

    fn leave(&mut self, client: ClientId) {
        let Some(room_name) = self.room_of.remove(&client) else {
            return;
        };
        if self.bus.is_some() {
            self.leave_shared(client, &room_name);
            return;
        }
        let Some(room) = self.rooms.get_mut(&room_name) else {
            return;
        };
        let Some((_link, gone)) = room.leave(client) else {
            return;
        };
        if room.is_empty() {
            self.room_emptied(&room_name);
        } else if let Some(name) = gone {
            self.broadcast(&room_name, protocol::encode_left(&name, now_ms()), None);
        }
    }

    fn room_emptied(&mut self, room_name: &str) {
        self.shared.active_rooms.fetch_sub(1, Ordering::Relaxed);
        if self.bus.is_some() {
            self.forget_shared_room_if_unused(room_name);
            return;
        }
        self.idle_counter += 1;
        self.idle_rooms
            .insert(self.idle_counter, room_name.to_owned());
        self.idle_since
            .insert(room_name.to_owned(), self.idle_counter);
        while self.idle_rooms.len() > MAX_IDLE_ROOMS {
            if let Some((_, oldest)) = self.idle_rooms.pop_first() {
                self.forget_idle_room(oldest);
            }
        }
        self.publish_memory();
    }

    /// Drops an idle room (already out of `idle_rooms`) from memory; the store forgets it too.
    fn forget_idle_room(&mut self, name: String) {
        self.idle_since.remove(&name);
        if let Some(room) = self.rooms.remove(&name) {
            self.memory_used -= room.memory_bytes();
        }
        if let Some(store) = &self.store {
            store.send(StoreCommand::Forget { room: name });
        }
    }

    /// Past the memory budget, frees history down to seven eighths of it: idle rooms first,
    /// the longest idle first; then the oldest messages of the biggest rooms with members.
    fn fit_memory_budget(&mut self) {
        if self.memory_used > self.budget {
            let target = self.budget - self.budget / 8;
            while self.memory_used > target {
                let Some((_, oldest)) = self.idle_rooms.pop_first() else {
                    break;
                };
                self.forget_idle_room(oldest);
            }
            if self.memory_used > target {
                self.trim_live_rooms(self.memory_used - target);
            }
        }
        self.publish_memory();
    }

    /// Frees at least `need` bytes (if history holds that much) from the rooms with members:
    /// the biggest histories are cut, oldest messages first, to one common size, so small rooms
    /// keep theirs. O(rooms log rooms), once per eighth of the budget.
    fn trim_live_rooms(&mut self, need: usize) {
        let mut sizes: Vec<(usize, &String)> = self
            .rooms
            .iter()
            .filter(|(_, room)| room.history_bytes() > 0)
            .map(|(name, room)| (room.history_bytes(), name))
            .collect();
        sizes.sort_unstable_by_key(|s| std::cmp::Reverse(s.0));
        // The largest common size `cap` that frees `need` once the `cut` biggest are cut to it.
        let (mut cap, mut cut, mut sum) = (0, sizes.len(), 0);
        for (k, (bytes, _)) in sizes.iter().enumerate() {
            sum += bytes;
            let next = sizes.get(k + 1).map_or(0, |s| s.0);
            if sum - (k + 1) * next >= need {
                (cap, cut) = ((sum - need) / (k + 1), k + 1);
                break;
            }
        }
        let names: Vec<String> = sizes[..cut].iter().map(|(_, n)| (*n).clone()).collect();
        for name in names {
            if let Some(room) = self.rooms.get_mut(&name) {
                self.memory_used -= room.trim_history_to(cap);
            }
        }
        if !self.trimmed_live {
            self.trimmed_live = true;
            warn!(
                "history in memory reached --memory-budget ({} bytes): the biggest rooms' \
                 oldest messages are dropped from memory (their welcome replays fewer)",
                self.budget
            );
        }
    }

    /// Tells `/healthz` and `/metrics` the bytes of history in memory.
    fn publish_memory(&self) {
        self.shared
            .store_health
            .memory_bytes
            .store(self.memory_used as u64, Ordering::Relaxed);
    }

    /// Writes every touched connection's frames of this burst: one non-blocking `sendmsg`
    /// each.
    fn flush_connections(&mut self) {
        for connection in self.to_flush.drain(..) {
            connection.flush();
        }
    }

    /// Encodes an event once as a frame and offers it to every member (except `skip`). Members
    /// whose queue is full are dropped as slow consumers, and the room is told they left; that
    /// notice is itself a broadcast, so the loop runs until no one else is dropped.
    fn broadcast(&mut self, room_name: &str, event: Utf8Bytes, skip: Option<ClientId>) {
        let mut pending = vec![(Frame::text(event), skip)];
        while let Some((frame, skip)) = pending.pop() {
            let Some(room) = self.rooms.get_mut(room_name) else {
                return;
            };
            let mut slow = Vec::new();
            for (id, link) in room.members() {
                if Some(id) == skip {
                    continue;
                }
                match link.offer(frame.clone()) {
                    Offer::Queued { flush: true } => self.to_flush.push(Arc::clone(link)),
                    Offer::Queued { flush: false } => {}
                    Offer::Full => slow.push(id),
                    // Closing or cut; its reader's Leave is on the way.
                    Offer::Gone => {}
                }
            }
            // Only a room this broadcast emptied is reported empty: a shared room can hold
            // no member here while a join of this process is on its way.
            let dropped_some = !slow.is_empty();
            for id in slow {
                self.room_of.remove(&id);
                // In a shared room the person leaves when Redis says so, for every process.
                let left = match &self.bus {
                    Some(bus) => room.detach(id).map(|link| {
                        bus.send(BusCommand::Leave {
                            room: room_name.to_owned(),
                            client: id,
                        });
                        (link, None)
                    }),
                    None => room.leave(id),
                };
                let Some((link, gone)) = left else {
                    continue;
                };
                self.shared
                    .metrics
                    .slow_consumers
                    .fetch_add(1, Ordering::Relaxed);
                // The room only at debug: its name is its key, and warn is kept and shipped.
                warn!(
                    "dropping slow consumer {}: {} frames queued",
                    link.peer,
                    link.backlog()
                );
                debug!("slow consumer {} was in room {room_name}", link.peer);
                link.evict();
                if let Some(name) = gone {
                    pending.push((Frame::text(protocol::encode_left(&name, now_ms())), None));
                }
            }
            if dropped_some && room.is_empty() {
                self.room_emptied(room_name);
                return;
            }
        }
    }
}
