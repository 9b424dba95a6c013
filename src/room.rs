//! Room names, and the state of one room: its people, their connections, its history and ids.
//!
//! Pure: no channels, no sockets, and no clock but one read of it, when an [`EpochSource`] is
//! made (its epochs start with the time, so they differ across restarts). The hub
//! ([`crate::hub`]) owns every [`Room`] and passes the time of each event in; HTTP
//! ([`crate::http`]) and the WebSocket handshake ([`crate::ws`]) call [`normalize_room_name`].
//!
//! A room counts the bytes its history holds in memory ([`Room::memory_bytes`]), so the hub can
//! keep every room's history within `--memory-budget` and trim the biggest
//! ([`Room::trim_history_to`]).
//!
//! It also remembers the client-chosen ids (`cid`) of the says still in its history, so a say
//! sent again after a reconnect is answered with the original message ([`Room::said_before`]).

use std::collections::{HashMap, VecDeque};
use std::time::{SystemTime, UNIX_EPOCH};

use tungstenite::Utf8Bytes;

/// The room served at `/` and `/ws`.
pub const GENERAL_ROOM: &str = "general";
/// Longest room name.
pub const MAX_ROOM_NAME_LEN: usize = 64;
/// Names that would shadow the server's own paths.
pub const RESERVED_ROOM_NAMES: [&str; 4] = ["static", "api", "ws", "healthz"];

/// Lowercases a room name and checks it: 1–64 of `[a-z0-9_-]`, not reserved. Anything that is
/// not exactly that (dots, slashes, percent signs, spaces) is refused, so a room name can never
/// name a file.
pub fn normalize_room_name(raw: &str) -> Option<String> {
    let name = raw.to_ascii_lowercase();
    let well_formed = !name.is_empty()
        && name.len() <= MAX_ROOM_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    (well_formed && !RESERVED_ROOM_NAMES.contains(&name.as_str())).then_some(name)
}

/// What a name looks like, for telling people apart: without case, without invisible
/// characters, and as its Unicode confusable skeleton (UTS #39), so that `аlice` with a
/// Cyrillic `а`, `alice` with a zero-width space and `ALICE` all look like `alice`.
pub fn look_alike_key(name: &str) -> String {
    let visible: String = name
        .chars()
        .filter(|&c| !crate::protocol::is_invisible(c))
        .collect::<String>()
        .to_lowercase();
    unicode_security::skeleton(&visible)
        .collect::<String>()
        .to_lowercase()
}

/// Makes epochs: `<server start in ns, hex>-<counter>`, unique across restarts and across the
/// re-creations of a room, so an id from an earlier life of a room is never taken for a new one.
#[derive(Debug)]
pub struct EpochSource {
    prefix: String,
    made: u64,
}

impl EpochSource {
    pub fn new() -> Self {
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        EpochSource {
            prefix: format!("{start:x}"),
            made: 0,
        }
    }

    /// What every epoch made by this source starts with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn make(&mut self) -> String {
        self.made += 1;
        format!("{}-{}", self.prefix, self.made)
    }
}

impl Default for EpochSource {
    fn default() -> Self {
        Self::new()
    }
}

/// Identifies one WebSocket connection for the life of the server.
pub type ClientId = u64;

/// One person in a room: one name, one or more connections (tabs) sharing a session.
#[derive(Debug)]
struct Person {
    name: String,
    /// The name without case: what the order of `users` goes by.
    key: String,
    /// What the name looks like ([`look_alike_key`]): no two people share one.
    looks: String,
    session: Option<String>,
    connections: Vec<ClientId>,
}

/// A stored message: its id, and its encoded frame, shared with every welcome that replays it.
#[derive(Clone, Debug)]
pub struct StoredMessage {
    pub id: u64,
    pub frame: Utf8Bytes,
}

/// What one message in a history costs beside its frame's bytes: its slot in the ring
/// (`StoredMessage`, 40 bytes), the shared buffer's header that `Bytes` allocates once the frame
/// is shared (32 with malloc's rounding), and malloc's own header and rounding of the frame's
/// buffer (up to 24). The frame must own exactly its length (see [`exact_frame`]).
pub const MESSAGE_OVERHEAD: usize = 96;

/// What a room costs beside its messages: the `Room` itself, its entries in the hub's maps
/// (rooms, idle order) and their slack, and the ring's spare capacity while it is small. Its
/// name and epoch are counted on top (each held twice, or near enough).
pub const ROOM_OVERHEAD: usize = 512;

/// What one remembered `cid` costs beside its strings (held twice: in the map and in the
/// order): two tuples of strings, a map slot and the map's slack, malloc's headers.
pub const CID_OVERHEAD: usize = 160;

/// Who said something, for matching a `cid`: the session (all of a person's tabs), or the
/// connection when the client has no session.
pub type Sender = (String, String);

/// A frame whose buffer holds exactly its bytes: `serde_json` grows its output by doubling, so a
/// freshly encoded 16 KB frame can sit in a 32 KiB buffer. History keeps this copy, so what it
/// counts is what it holds.
pub fn exact_frame(frame: &Utf8Bytes) -> Utf8Bytes {
    Utf8Bytes::from(frame.as_str())
}

/// The bytes one message costs in a history.
pub fn message_cost(message: &StoredMessage) -> usize {
    message.frame.len() + MESSAGE_OVERHEAD
}

/// The map key of a sender: kind and id in one string, so sessions and connections never meet.
fn sender_key((kind, id): &Sender) -> String {
    format!("{kind}:{id}")
}

/// What one remembered `cid` costs in memory.
fn cid_cost((sender, cid): &(String, String)) -> usize {
    2 * (sender.len() + cid.len()) + CID_OVERHEAD
}

/// What [`Room::join`] decided.
#[derive(Debug, PartialEq, Eq)]
pub struct Joined {
    /// The person's name in this room (made unique, or the session's existing name).
    pub name: String,
    /// True when this connection made a new person appear (others get `joined`).
    pub new_person: bool,
}

/// The state of one room. `M` is whatever the hub needs to reach a member (its outbound link);
/// the room only stores it.
#[derive(Debug)]
pub struct Room<M> {
    name: String,
    epoch: String,
    last_id: u64,
    history: VecDeque<StoredMessage>,
    history_limit: usize,
    /// What `history` costs ([`message_cost`] of each message), with the `cid`s remembered
    /// for its messages ([`cid_cost`]).
    history_bytes: usize,
    /// The newest id dropped from memory to fit the memory budget (0: none): a `since` older
    /// than it may need the store for what memory no longer holds.
    trimmed_through: u64,
    people: Vec<Person>,
    members: Vec<(ClientId, M)>,
    /// What the history store calls this room (0 when history is in memory only).
    store_handle: u64,
    /// The `cid`s of the says still in `history`, by sender: the message id each became.
    cids: HashMap<(String, String), u64>,
    /// The same entries by message id, oldest first, to forget them with their message.
    cid_order: VecDeque<(u64, (String, String))>,
}

impl<M> Room<M> {
    pub fn new(name: String, epoch: String, history_limit: usize) -> Self {
        Room {
            name,
            epoch,
            last_id: 0,
            history: VecDeque::with_capacity(history_limit.min(16)),
            history_limit,
            history_bytes: 0,
            trimmed_through: 0,
            people: Vec::new(),
            members: Vec::new(),
            store_handle: 0,
            cids: HashMap::new(),
            cid_order: VecDeque::new(),
        }
    }

    /// A room as the history store gave it: the store's handle for it, its epoch, the last
    /// id it handed out, and its newest messages (oldest first).
    pub fn restore(
        name: String,
        store_handle: u64,
        epoch: String,
        history_limit: usize,
        last_id: u64,
        history: Vec<StoredMessage>,
    ) -> Self {
        let mut room = Room::new(name, epoch, history_limit);
        room.store_handle = store_handle;
        room.last_id = last_id;
        for message in history {
            room.remember(message);
        }
        room
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn store_handle(&self) -> u64 {
        self.store_handle
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// Bytes this room's history holds in memory: its messages ([`message_cost`]) and their
    /// `cid`s.
    pub fn history_bytes(&self) -> usize {
        self.history_bytes
    }

    /// Bytes this room costs in memory: its history, its name and epoch, and
    /// [`ROOM_OVERHEAD`]. People and connections are not history and are not counted.
    pub fn memory_bytes(&self) -> usize {
        ROOM_OVERHEAD + 2 * self.name.len() + self.epoch.len() + self.history_bytes
    }

    /// The newest id dropped to fit the memory budget, 0 if none was.
    pub fn trimmed_through(&self) -> u64 {
        self.trimmed_through
    }

    /// Drops the oldest messages until the history costs at most `max_bytes`; returns the
    /// bytes freed. The room's ids and epoch are untouched: only the replay gets shorter.
    pub fn trim_history_to(&mut self, max_bytes: usize) -> usize {
        let before = self.history_bytes;
        while self.history_bytes > max_bytes {
            let Some(oldest) = self.history.pop_front() else {
                break;
            };
            self.history_bytes -= message_cost(&oldest);
            self.trimmed_through = self.trimmed_through.max(oldest.id);
            self.forget_cids_through(oldest.id);
        }
        // A ring trimmed far below its size gives its spare slots back.
        if self.history.capacity() > 16 && self.history.len() < self.history.capacity() / 4 {
            self.history.shrink_to(self.history.len() * 2);
        }
        before - self.history_bytes
    }

    /// How many messages in memory come after `after`.
    pub fn count_after(&self, after: u64) -> usize {
        self.history.len() - self.history.partition_point(|m| m.id <= after)
    }

    /// The id after which a joining client wants history: its `since` when it speaks of this
    /// room's epoch (or names no epoch), else 0 (everything).
    pub fn resume_point(&self, since: Option<u64>, epoch: Option<&str>) -> u64 {
        match (since, epoch) {
            (Some(since), Some(epoch)) if epoch == self.epoch => since,
            // A `since` without an epoch is taken at its word: the client saw that id here.
            (Some(since), None) => since,
            _ => 0,
        }
    }

    /// No connection is in the room.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The members' links, for fan-out.
    pub fn members(&self) -> impl Iterator<Item = (ClientId, &M)> {
        self.members.iter().map(|(id, m)| (*id, m))
    }

    /// Everyone in the room, sorted by name (without case), as the page lists them.
    pub fn users(&self) -> Vec<&str> {
        self.people.iter().map(|p| p.name.as_str()).collect()
    }

    /// The name of the person behind a connection.
    pub fn name_of(&self, client: ClientId) -> Option<&str> {
        self.people
            .iter()
            .find(|p| p.connections.contains(&client))
            .map(|p| p.name.as_str())
    }

    /// Adds a connection. A connection with a session already in the room joins that person;
    /// otherwise a new person appears, with `wanted` made unique (`alice (2)`) if needed.
    /// Names are compared without case, so "Alice" and "alice" cannot both be present.
    pub fn join(
        &mut self,
        client: ClientId,
        link: M,
        wanted: &str,
        session: Option<&str>,
    ) -> Joined {
        self.members.push((client, link));
        if let Some(session) = session {
            if let Some(person) = self
                .people
                .iter_mut()
                .find(|p| p.session.as_deref() == Some(session))
            {
                person.connections.push(client);
                return Joined {
                    name: person.name.clone(),
                    new_person: false,
                };
            }
        }
        let (name, key, looks) = self.unique_name(wanted);
        // People stay sorted by key, so `users` needs no sort on every join.
        let at = self.people.partition_point(|p| p.key < key);
        self.people.insert(
            at,
            Person {
                name: name.clone(),
                key,
                looks,
                session: session.map(str::to_owned),
                connections: vec![client],
            },
        );
        Joined {
            name,
            new_person: true,
        }
    }

    /// `wanted`, or `wanted (2)`, `wanted (3)`, … whichever does not look like a name in
    /// use; with its sort key and its look-alike key.
    fn unique_name(&self, wanted: &str) -> (String, String, String) {
        let taken = |looks: &str| self.people.iter().any(|p| p.looks == looks);
        let named = |name: String| {
            let looks = look_alike_key(&name);
            (name.to_lowercase(), looks, name)
        };
        let (key, looks, name) = named(wanted.to_owned());
        if !taken(&looks) {
            return (name, key, looks);
        }
        (2..)
            .map(|n| named(format!("{wanted} ({n})")))
            .find(|(_, looks, _)| !taken(looks))
            .map(|(key, looks, name)| (name, key, looks))
            .expect("some suffix is free")
    }

    /// Removes a connection and returns its link. The name comes back too when this was the
    /// person's last connection (others get `left`).
    pub fn leave(&mut self, client: ClientId) -> Option<(M, Option<String>)> {
        let index = self.members.iter().position(|(id, _)| *id == client)?;
        let (_, link) = self.members.swap_remove(index);
        let person_index = self
            .people
            .iter()
            .position(|p| p.connections.contains(&client))?;
        let person = &mut self.people[person_index];
        person.connections.retain(|c| *c != client);
        let gone = person
            .connections
            .is_empty()
            .then(|| self.people.remove(person_index).name);
        Some((link, gone))
    }

    /// Adds a connection to the person named `name`, a name already decided elsewhere (a
    /// room shared through Redis: the bus made it unique across processes). `link` is `None`
    /// for a connection held by another process: it is someone in the room, not someone this
    /// process sends to. Returns whether a new person appeared; adding a connection twice
    /// changes nothing.
    pub fn add_connection(
        &mut self,
        client: ClientId,
        link: Option<M>,
        name: &str,
        session: Option<&str>,
    ) -> bool {
        if let Some(link) = link {
            if !self.members.iter().any(|(id, _)| *id == client) {
                self.members.push((client, link));
            }
        }
        if let Some(person) = self.people.iter_mut().find(|p| p.name == name) {
            if !person.connections.contains(&client) {
                person.connections.push(client);
            }
            // A person first seen through another process's connection has no session
            // here: its own connection brings it (what its `cid`s are matched by).
            if person.session.is_none() {
                person.session = session.map(str::to_owned);
            }
            return false;
        }
        let key = name.to_lowercase();
        let at = self.people.partition_point(|p| p.key < key);
        self.people.insert(
            at,
            Person {
                name: name.to_owned(),
                key,
                looks: look_alike_key(name),
                session: session.map(str::to_owned),
                connections: vec![client],
            },
        );
        true
    }

    /// Stops sending to a connection (its link comes back), leaving its person in the room
    /// until [`Room::remove_connection`]: in a shared room the leave is announced when every
    /// process reads it.
    pub fn detach(&mut self, client: ClientId) -> Option<M> {
        let index = self.members.iter().position(|(id, _)| *id == client)?;
        Some(self.members.swap_remove(index).1)
    }

    /// Removes a connection, its link if it has one here, and returns its person's name when
    /// that was the person's last connection. Removing one that is not here changes nothing.
    pub fn remove_connection(&mut self, client: ClientId) -> Option<String> {
        self.detach(client);
        let index = self
            .people
            .iter()
            .position(|p| p.connections.contains(&client))?;
        let person = &mut self.people[index];
        person.connections.retain(|c| *c != client);
        person
            .connections
            .is_empty()
            .then(|| self.people.remove(index).name)
    }

    /// Every connection of every person in the room.
    pub fn connections(&self) -> impl Iterator<Item = ClientId> + '_ {
        self.people
            .iter()
            .flat_map(|p| p.connections.iter().copied())
    }

    /// Whether this process sends to `client` here.
    pub fn has_member(&self, client: ClientId) -> bool {
        self.members.iter().any(|(id, _)| *id == client)
    }

    /// Keeps a message whose id was given elsewhere (by Redis), so later ids follow it.
    pub fn remember_delivered(&mut self, message: StoredMessage) {
        self.last_id = self.last_id.max(message.id);
        self.remember(message);
    }

    /// The last id this room has handed out or delivered.
    pub fn last_id(&self) -> u64 {
        self.last_id
    }

    /// Takes the next id. Ids start at 1 and only grow.
    pub fn next_id(&mut self) -> u64 {
        self.last_id += 1;
        self.last_id
    }

    /// Keeps a message for later welcomes, forgetting the oldest beyond the limit.
    pub fn remember(&mut self, message: StoredMessage) {
        if self.history_limit == 0 {
            return;
        }
        if self.history.len() == self.history_limit {
            if let Some(oldest) = self.history.pop_front() {
                self.history_bytes -= message_cost(&oldest);
                self.forget_cids_through(oldest.id);
            }
        }
        self.history_bytes += message_cost(&message);
        self.history.push_back(message);
    }

    /// Who a connection speaks for when it sends a `cid`: its session, else itself.
    pub fn sender_of(&self, client: ClientId) -> Option<Sender> {
        let person = self
            .people
            .iter()
            .find(|p| p.connections.contains(&client))?;
        Some(match &person.session {
            Some(session) => ("session".to_owned(), session.clone()),
            None => ("connection".to_owned(), client.to_string()),
        })
    }

    /// The message a say with this `cid` from this sender became, if it is still in memory.
    pub fn said_before(&self, sender: &Sender, cid: &str) -> Option<&StoredMessage> {
        let id = *self.cids.get(&(sender_key(sender), cid.to_owned()))?;
        let at = self.history.partition_point(|m| m.id < id);
        self.history.get(at).filter(|m| m.id == id)
    }

    /// Keeps a message like [`Room::remember`], and the sender's `cid` for it while the
    /// message stays in memory.
    pub fn remember_said(&mut self, message: StoredMessage, cid: Option<(&Sender, &str)>) {
        let id = message.id;
        self.remember(message);
        let Some((sender, cid)) = cid else {
            return;
        };
        if self.history.back().is_none_or(|m| m.id != id) {
            return; // Not kept (`--history 0`): nothing to answer a resend with.
        }
        let key = (sender_key(sender), cid.to_owned());
        self.history_bytes += cid_cost(&key);
        // A cid used again (its first say had left memory) now names the new message; the old
        // entry in the order is dropped with its id, without touching the new one.
        self.cids.insert(key.clone(), id);
        self.cid_order.push_back((id, key));
    }

    /// Forgets the `cid`s of messages with ids up to `id` (they have left memory).
    fn forget_cids_through(&mut self, id: u64) {
        while self.cid_order.front().is_some_and(|(at, _)| *at <= id) {
            let Some((at, key)) = self.cid_order.pop_front() else {
                break;
            };
            self.history_bytes -= cid_cost(&key);
            if self.cids.get(&key) == Some(&at) {
                self.cids.remove(&key);
            }
        }
    }

    /// The history a joining client should get: everything after `since` when the client
    /// speaks of this room's epoch, otherwise all of it.
    pub fn history_for(
        &self,
        since: Option<u64>,
        epoch: Option<&str>,
    ) -> impl Iterator<Item = &StoredMessage> {
        self.history_after(self.resume_point(since, epoch))
    }

    /// The messages in memory with ids below `before`, oldest first.
    pub fn history_before(&self, before: u64) -> impl DoubleEndedIterator<Item = &StoredMessage> {
        let end = self.history.partition_point(|m| m.id < before);
        self.history.range(..end)
    }

    /// The messages in memory with ids above `after`, oldest first.
    pub fn history_after(&self, after: u64) -> impl Iterator<Item = &StoredMessage> {
        // Ids in history grow, but may have gaps (messages the store could not keep).
        let skip = self.history.partition_point(|m| m.id <= after);
        self.history.iter().skip(skip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_names_are_lowercased_and_checked() {
        assert_eq!(normalize_room_name("Room2").as_deref(), Some("room2"));
        assert_eq!(normalize_room_name("a-b_c").as_deref(), Some("a-b_c"));
        assert_eq!(
            normalize_room_name(&"x".repeat(64)).map(|n| n.len()),
            Some(64)
        );
        for bad in [
            "",
            "a.b",
            "..",
            "a/b",
            "%2e%2e",
            "a b",
            "static",
            "WS",
            "healthz",
            "api",
            "é",
            &"x".repeat(65),
        ] {
            assert_eq!(normalize_room_name(bad), None, "{bad:?}");
        }
    }

    fn msg(room: &mut Room<()>) -> u64 {
        let id = room.next_id();
        room.remember(StoredMessage {
            id,
            frame: Utf8Bytes::from(format!("{id}")),
        });
        id
    }

    #[test]
    fn cids_are_remembered_while_their_message_is_in_memory() {
        let mut room: Room<()> = Room::new("r".into(), "e".into(), 3);
        room.join(1, (), "alice", Some("tab-s"));
        let sender = room.sender_of(1).unwrap();
        let said = |room: &mut Room<()>, cid: &str| {
            let id = room.next_id();
            let frame = Utf8Bytes::from(format!("{id}"));
            room.remember_said(StoredMessage { id, frame }, Some((&sender, cid)));
            id
        };
        let first = said(&mut room, "a");
        assert_eq!(room.said_before(&sender, "a").map(|m| m.id), Some(first));
        assert!(room.said_before(&sender, "b").is_none());
        // Another connection of the same session is the same sender; another person is not.
        room.join(2, (), "alice", Some("tab-s"));
        assert_eq!(room.sender_of(2), Some(sender.clone()));
        room.join(3, (), "bob", None);
        assert!(room.said_before(&room.sender_of(3).unwrap(), "a").is_none());
        // Three more messages push the first out of memory, and its cid with it: the bytes
        // counted go back to what the messages alone cost.
        for cid in ["b", "c", "d"] {
            said(&mut room, cid);
        }
        assert!(room.said_before(&sender, "a").is_none());
        assert!(room.said_before(&sender, "b").is_some());
        let messages: usize = room.history.iter().map(message_cost).sum();
        assert!(room.history_bytes() > messages);
        room.trim_history_to(0);
        assert_eq!(room.history_bytes(), 0);
        assert!(room.said_before(&sender, "d").is_none());
    }

    fn ids(room: &Room<()>, since: Option<u64>, epoch: Option<&str>) -> Vec<u64> {
        room.history_for(since, epoch).map(|m| m.id).collect()
    }

    #[test]
    fn history_keeps_the_last_n_and_resumes_after_since() {
        let mut room: Room<()> = Room::new("r".into(), "e1".into(), 3);
        for _ in 0..5 {
            msg(&mut room);
        }
        assert_eq!(ids(&room, None, None), vec![3, 4, 5]);
        assert_eq!(ids(&room, Some(3), Some("e1")), vec![4, 5]);
        assert_eq!(ids(&room, Some(5), Some("e1")), Vec::<u64>::new());
        assert_eq!(ids(&room, Some(1), Some("e1")), vec![3, 4, 5]);
        assert_eq!(ids(&room, Some(4), Some("other")), vec![3, 4, 5]);
        assert_eq!(ids(&room, Some(9), Some("e1")), Vec::<u64>::new());
    }

    #[test]
    fn history_bytes_are_counted_and_trimmed_oldest_first() {
        let mut room: Room<()> = Room::new("r".into(), "e1".into(), 3);
        let empty = room.memory_bytes();
        for _ in 0..5 {
            msg(&mut room);
        }
        // Ids 3, 4 and 5 remain: frames "3", "4", "5", one byte each.
        assert_eq!(room.history_bytes(), 3 * (1 + MESSAGE_OVERHEAD));
        assert_eq!(room.memory_bytes(), empty + room.history_bytes());
        assert_eq!(
            room.trimmed_through(),
            0,
            "the --history limit is not a trim"
        );
        let freed = room.trim_history_to(2 * (1 + MESSAGE_OVERHEAD) - 1);
        assert_eq!(freed, 2 * (1 + MESSAGE_OVERHEAD));
        assert_eq!(ids(&room, None, None), vec![5]);
        assert_eq!(room.trimmed_through(), 4);
        assert_eq!(room.count_after(3), 1);
        assert_eq!(room.trim_history_to(0), 1 + MESSAGE_OVERHEAD);
        assert_eq!((room.history_bytes(), room.memory_bytes()), (0, empty));
        assert_eq!(room.next_id(), 6, "ids go on after a trim");
    }

    #[test]
    fn an_exact_frame_is_the_same_text() {
        let frame = Utf8Bytes::from(String::with_capacity(1000) + "abc");
        assert_eq!(exact_frame(&frame).as_str(), "abc");
    }

    #[test]
    fn names_are_made_unique_and_sessions_share_one() {
        let mut room: Room<()> = Room::new("r".into(), "e".into(), 10);
        assert_eq!(room.join(1, (), "alice", None).name, "alice");
        assert_eq!(room.join(2, (), "Alice", None).name, "Alice (2)");
        assert_eq!(room.join(3, (), "alice", None).name, "alice (3)");
        let tab1 = room.join(4, (), "bob", Some("s"));
        let tab2 = room.join(5, (), "robert", Some("s"));
        assert!(tab1.new_person && !tab2.new_person);
        assert_eq!(tab2.name, "bob");
        assert_eq!(room.users(), vec!["alice", "Alice (2)", "alice (3)", "bob"]);
        // Names that look alike count as the same name.
        for (n, look_alike) in ["\u{430}lice", "alice\u{200B}", "ALICE (2)"]
            .iter()
            .enumerate()
        {
            let joined = room.join(10 + n as u64, (), look_alike, None).name;
            assert_ne!(
                joined, *look_alike,
                "{look_alike:?} looks like a name in use"
            );
            assert!(joined.starts_with(look_alike), "{joined:?}");
        }
        assert_eq!(room.leave(4).unwrap().1, None);
        assert_eq!(room.leave(5).unwrap().1.as_deref(), Some("bob"));
        assert!(room.leave(5).is_none());
    }
}
