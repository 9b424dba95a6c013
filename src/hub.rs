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

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::{error, warn};
use tungstenite::Utf8Bytes;

use crate::config::CrashForTests;
use crate::connection::{Connection, Offer};
use crate::protocol;
use crate::room::{ClientId, EpochSource, Room, StoredMessage};
use crate::shared::Shared;
use crate::store::{self, Append, LoadedRoom, StoreCommand, StoreLink};
use crate::wire::Frame;

/// Empty rooms are remembered (with their history and epoch) so people coming back find the
/// conversation; beyond this many, the longest-idle empty room is forgotten to bound memory.
pub const MAX_IDLE_ROOMS: usize = 1000;

/// Commands handled at most before the touched connections are flushed, when more keep
/// coming. Each command's fan-out takes microseconds, so this bounds the delay a busy hub adds
/// to well under a millisecond.
const FLUSH_EVERY: usize = 64;

/// Commands from client readers (and from [`crate::ServerHandle::shutdown`]) to the hub.
pub enum HubCommand {
    /// A client sent a valid `hello`.
    Join {
        client: ClientId,
        room: String,
        name: String,
        session: Option<String>,
        since: Option<u64>,
        epoch: Option<String>,
        link: MemberLink,
    },
    /// A client sent a valid `say`; `text` is already trimmed and checked.
    Say { client: ClientId, text: String },
    /// A client is typing (already throttled by its reader).
    Typing { client: ClientId },
    /// A client's reader has ended.
    Leave { client: ClientId },
    /// The store's answer to [`StoreCommand::Load`].
    RoomLoaded { room: String, loaded: LoadedRoom },
    /// The store thread has ended (sent when its thread ends, however it ends): no `Load` will
    /// be answered any more.
    StoreStopped,
    /// End the hub.
    Shutdown,
}

/// How the hub reaches one member: the client's connection.
pub type MemberLink = Arc<Connection>;

/// Runs the hub until [`HubCommand::Shutdown`] or until every sender is gone. With `store`,
/// history is kept on disk by the store thread; without, in memory only.
pub fn run(
    commands: Receiver<HubCommand>,
    store: Option<StoreLink>,
    history_limit: usize,
    shared: Arc<Shared>,
) {
    let mut hub = Hub::new(history_limit, store, shared);
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
    shared: Arc<Shared>,
}

/// Milliseconds since 1970, the `ts` of every event.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Hub {
    fn new(history_limit: usize, store: Option<StoreLink>, shared: Arc<Shared>) -> Self {
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
            shared,
        }
    }

    fn handle(&mut self, command: HubCommand) {
        // A client whose room is still being read waits with it, so its commands keep their
        // order behind its Join.
        let waiting_client = match &command {
            HubCommand::Say { client, .. }
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
        // A Join for a room not in memory waits for the store to read it.
        if let HubCommand::Join { client, room, .. } = &command {
            if self.store.is_some() && !self.rooms.contains_key(room) {
                let client = *client;
                self.wait_for_room(client, command);
                return;
            }
        }
        match command {
            HubCommand::Join {
                client,
                room,
                name,
                session,
                since,
                epoch,
                link,
            } => self.join(client, room, &name, session, since, epoch, link),
            HubCommand::Say { client, text } => self.say(client, &text),
            HubCommand::Typing { client } => self.typing(client),
            HubCommand::Leave { client } => self.leave(client),
            HubCommand::RoomLoaded { room, loaded } => self.room_loaded(room, loaded),
            HubCommand::StoreStopped => self.store_stopped(),
            HubCommand::Shutdown => {}
        }
    }

    /// Queues a Join for a room not in memory, asking the store for it if nobody has yet.
    fn wait_for_room(&mut self, client: ClientId, join: HubCommand) {
        let HubCommand::Join { room, .. } = &join else {
            return;
        };
        let room = room.clone();
        self.waiting_for_room.insert(client, room.clone());
        if let Some(queue) = self.loading.get_mut(&room) {
            queue.push(join);
            return;
        }
        self.loading.insert(room.clone(), vec![join]);
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
            };
            self.room_loaded(room, loaded);
        }
    }

    /// The store has read a room: it enters memory and its waiting commands run in order.
    fn room_loaded(&mut self, room_name: String, loaded: LoadedRoom) {
        let room = Room::restore(
            room_name.clone(),
            loaded.handle,
            loaded.epoch,
            self.history_limit,
            loaded.last_id,
            loaded.history,
        );
        self.rooms.insert(room_name.clone(), room);
        let waiting = self.loading.remove(&room_name).unwrap_or_default();
        for command in &waiting {
            if let HubCommand::Join { client, .. } = command {
                self.waiting_for_room.remove(client);
            }
        }
        // The first waiting command is a Join, and a client's Leave runs after its Join: so
        // the room is either in use or, if everyone has gone already, idle like any other.
        for command in waiting {
            self.handle(command);
        }
    }

    #[allow(clippy::too_many_arguments)] // the fields of one Join command
    fn join(
        &mut self,
        client: ClientId,
        room_name: String,
        wanted: &str,
        session: Option<String>,
        since: Option<u64>,
        epoch: Option<String>,
        link: MemberLink,
    ) {
        if let Some(CrashForTests::HubOnJoin(doomed)) = &self.shared.config.crash_for_tests {
            assert!(
                doomed != &room_name,
                "crash_for_tests: the hub panics on a join"
            );
        }
        if let Some(seq) = self.idle_since.remove(&room_name) {
            self.idle_rooms.remove(&seq);
        }
        let (epochs, limit) = (&mut self.epochs, self.history_limit);
        let room = self
            .rooms
            .entry(room_name.clone())
            .or_insert_with(|| Room::new(room_name.clone(), epochs.make(), limit));
        if room.is_empty() {
            self.shared.active_rooms.fetch_add(1, Ordering::Relaxed);
        }
        let connection = Arc::clone(&link);
        let joined = room.join(client, link, wanted, session.as_deref());
        let users = room.users();
        let welcome = protocol::encode_welcome(
            room.name(),
            &joined.name,
            room.epoch(),
            &users,
            room.history_for(since, epoch.as_deref())
                .map(|m| m.frame.as_str()),
        );
        self.room_of.insert(client, room_name.clone());
        // A fresh queue has room for the welcome; if not, the client is gone already.
        if connection.offer(Frame::text(welcome)) == (Offer::Queued { flush: true }) {
            self.to_flush.push(connection);
        }
        if joined.new_person {
            let frame = protocol::encode_joined(&joined.name, now_ms());
            self.broadcast(&room_name, frame, Some(client));
        }
    }

    fn say(&mut self, client: ClientId, text: &str) {
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
        let id = room.next_id();
        let frame = protocol::encode_message(id, room.name(), &name, text, now_ms());
        room.remember(StoredMessage {
            id,
            frame: frame.clone(),
        });
        let kept = Append {
            room: room.store_handle(),
            id,
            frame: frame.clone(),
        };
        self.broadcast(&room_name, frame, None);
        self.keep(kept);
    }

    /// Hands a broadcast message to the store, unless its backlog is full (a disk failing for
    /// long): then the message lives in memory only, and is counted as dropped.
    fn keep(&mut self, message: Append) {
        let Some(store) = &self.store else {
            return;
        };
        let health = &self.shared.store_health;
        if health.unwritten.load(Ordering::Relaxed) >= store::MAX_UNWRITTEN {
            health.dropped.fetch_add(1, Ordering::Relaxed);
            if !self.store_full {
                error!(
                    "{} messages wait for the disk: new messages are kept in memory only",
                    store::MAX_UNWRITTEN
                );
                self.store_full = true;
            }
            return;
        }
        self.store_full = false;
        health.unwritten.fetch_add(1, Ordering::Relaxed);
        if store.append(message) {
            self.store_batch_since.get_or_insert_with(Instant::now);
        } else {
            health.unwritten.fetch_sub(1, Ordering::Relaxed);
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
        self.broadcast(&room_name, protocol::encode_typing(&name), Some(client));
    }

    fn leave(&mut self, client: ClientId) {
        let Some(room_name) = self.room_of.remove(&client) else {
            return;
        };
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
        self.idle_counter += 1;
        self.idle_rooms
            .insert(self.idle_counter, room_name.to_owned());
        self.idle_since
            .insert(room_name.to_owned(), self.idle_counter);
        while self.idle_rooms.len() > MAX_IDLE_ROOMS {
            if let Some((_, oldest)) = self.idle_rooms.pop_first() {
                self.idle_since.remove(&oldest);
                self.rooms.remove(&oldest);
                if let Some(store) = &self.store {
                    store.send(StoreCommand::Forget { room: oldest });
                }
            }
        }
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
            for id in slow {
                self.room_of.remove(&id);
                let Some((link, gone)) = room.leave(id) else {
                    continue;
                };
                warn!(
                    "dropping slow consumer {} in room {}: {} frames queued",
                    link.peer,
                    room_name,
                    link.backlog()
                );
                link.evict();
                if let Some(name) = gone {
                    pending.push((Frame::text(protocol::encode_left(&name, now_ms())), None));
                }
            }
            if room.is_empty() {
                self.room_emptied(room_name);
                return;
            }
        }
    }
}
