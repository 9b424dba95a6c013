//! The room hub: ONE thread that owns every room: members, names, history and ids.
//!
//! Readers ([`crate::client`]) send it [`HubCommand`]s over one bounded crossbeam channel; it
//! answers by offering frames to each member's own bounded outbound queue ([`Outbox`]),
//! never waiting on a client. Because one thread does all of it, ids are handed out in order
//! and every member of a room sees the same sequence, with no lock anywhere.
//!
//! Invariant: **the hub never does socket I/O and never blocks on a client.** A member whose
//! queue is full is a slow consumer: it is told to close (1008) and the room hears it `left`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crossbeam_channel::Receiver;
use log::warn;
use tungstenite::Utf8Bytes;

use crate::client::{ClientControl, Outbound, Outbox};
use crate::outbox::{Offer, Waker};
use crate::protocol;
use crate::room::{ClientId, Room, StoredMessage};
use crate::Shared;

/// Empty rooms are remembered (with their history and epoch) so people coming back find the
/// conversation; beyond this many, the longest-idle empty room is forgotten to bound memory.
pub const MAX_IDLE_ROOMS: usize = 1000;

/// Commands handled at most before sleeping writers are woken, when more keep coming. Each
/// command's fan-out takes microseconds, so this bounds the delay a busy hub adds to well under
/// a millisecond.
const WAKE_EVERY: usize = 64;

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
    /// End the hub.
    Shutdown,
}

/// How the hub reaches one member: its outbound queue, and its control block for closing it.
pub struct MemberLink {
    pub outbox: Outbox,
    pub control: Arc<ClientControl>,
}

/// Runs the hub until [`HubCommand::Shutdown`] or until every sender is gone.
pub fn run(commands: Receiver<HubCommand>, history_limit: usize, shared: Arc<Shared>) {
    let mut hub = Hub::new(history_limit, shared);
    let mut since_wake = 0;
    for command in commands.iter() {
        match command {
            HubCommand::Join {
                client,
                room,
                name,
                session,
                since,
                epoch,
                link,
            } => hub.join(client, room, &name, session, since, epoch, link),
            HubCommand::Say { client, text } => hub.say(client, &text),
            HubCommand::Typing { client } => hub.typing(client),
            HubCommand::Leave { client } => hub.leave(client),
            // Connections are closed by shutdown itself (it knows those without a room too).
            HubCommand::Shutdown => break,
        }
        // Writers are woken once the hub has nothing more to hand out (or every so many
        // commands, so a never-empty queue cannot starve them): one wake-up per burst.
        since_wake += 1;
        if commands.is_empty() || since_wake >= WAKE_EVERY {
            hub.wake_writers();
            since_wake = 0;
        }
    }
    hub.wake_writers();
}

struct Hub {
    rooms: HashMap<String, Room<MemberLink>>,
    /// Which room each joined client is in.
    room_of: HashMap<ClientId, String>,
    /// Empty rooms by the order they emptied, oldest first: the eviction queue.
    idle_rooms: BTreeMap<u64, String>,
    idle_since: HashMap<String, u64>,
    idle_counter: u64,
    /// Writers with frames queued since they fell asleep, to wake after the current burst.
    to_wake: Vec<Waker<Outbound>>,
    history_limit: usize,
    /// Epochs are `<server start>-<room counter>`: unique across restarts and re-creations.
    epoch_prefix: String,
    rooms_created: u64,
    shared: Arc<Shared>,
}

/// Milliseconds since 1970, the `ts` of every event.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Hub {
    fn new(history_limit: usize, shared: Arc<Shared>) -> Self {
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Hub {
            rooms: HashMap::new(),
            room_of: HashMap::new(),
            idle_rooms: BTreeMap::new(),
            idle_since: HashMap::new(),
            idle_counter: 0,
            to_wake: Vec::new(),
            history_limit,
            epoch_prefix: format!("{:x}", start),
            rooms_created: 0,
            shared,
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
        if let Some(seq) = self.idle_since.remove(&room_name) {
            self.idle_rooms.remove(&seq);
        }
        let (created, prefix, limit) = (
            &mut self.rooms_created,
            &self.epoch_prefix,
            self.history_limit,
        );
        let room = self.rooms.entry(room_name.clone()).or_insert_with(|| {
            *created += 1;
            Room::new(room_name.clone(), format!("{prefix}-{created}"), limit)
        });
        if room.is_empty() {
            self.shared.active_rooms.fetch_add(1, Ordering::Relaxed);
        }
        let outbox = link.outbox.clone();
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
        if let (_, Some(waker)) = outbox.offer_deferred(Outbound::Text(welcome)) {
            self.to_wake.push(waker);
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
        self.broadcast(&room_name, frame, None);
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
            }
        }
    }

    fn wake_writers(&mut self) {
        for waker in self.to_wake.drain(..) {
            waker.wake();
        }
    }

    /// Puts one shared frame into every member's queue (except `skip`). Members whose queue is
    /// full are dropped as slow consumers, and the room is told they left; that notice is itself
    /// a broadcast, so the loop runs until no one else is dropped.
    fn broadcast(&mut self, room_name: &str, frame: Utf8Bytes, skip: Option<ClientId>) {
        let mut pending = vec![(frame, skip)];
        while let Some((frame, skip)) = pending.pop() {
            let Some(room) = self.rooms.get_mut(room_name) else {
                return;
            };
            let mut slow = Vec::new();
            for (id, link) in room.members() {
                if Some(id) == skip {
                    continue;
                }
                match link.outbox.offer_deferred(Outbound::Text(frame.clone())) {
                    (Offer::Queued, waker) => self.to_wake.extend(waker),
                    (Offer::Full, _) => slow.push(id),
                    // The writer has ended; its reader's Leave is on the way.
                    (Offer::Gone, _) => {}
                }
            }
            for id in slow {
                self.room_of.remove(&id);
                let Some((link, gone)) = room.leave(id) else {
                    continue;
                };
                warn!(
                    "dropping slow consumer {} in room {}: {} frames queued",
                    link.control.peer,
                    room_name,
                    link.outbox.len()
                );
                link.control.evict();
                if let Some(name) = gone {
                    pending.push((protocol::encode_left(&name, now_ms()), None));
                }
            }
            if room.is_empty() {
                self.room_emptied(room_name);
                return;
            }
        }
    }
}
