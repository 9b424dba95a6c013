//! The hub's half of rooms shared through Redis (`--redis`): what changes when a room's
//! ids, names and members are decided in Redis instead of here.
//!
//! The hub ([`super`]) still owns every room a client of this process is in, and fans out as
//! always; but it hands out no ids and decides no names. A say goes to the bus thread
//! ([`crate::cluster`]) and comes back, with its id, from the follower, like everyone else's;
//! a join and a leave come back as presence events, applied in the room's presence order, so
//! every process holds the same people. A room with no client here is forgotten at once (a
//! room not followed would miss messages): the next join reads it again.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use log::warn;
use tungstenite::Utf8Bytes;

use super::{
    now_ms, refuse_unreachable, Hub, HubCommand, Join, MemberLink, PendingJoin, Welcome,
    CLOSE_RESTART, NAME_CANDIDATES,
};
use crate::bus::{self, Entry, Presence, Snapshot};
use crate::cluster::{BusCommand, BusEvent, Say};
use crate::protocol::{self, ErrorCode, Refusal};
use crate::room::{self, ClientId, Room, Sender, StoredMessage};
use crate::store::LoadedRoom;
use crate::wire::Frame;

impl Hub {
    pub(super) fn bus_event(&mut self, event: BusEvent) {
        match event {
            BusEvent::Loaded { room, snapshot } => self.shared_room_loaded(room, snapshot),
            BusEvent::LoadFailed { room } => self.load_failed(room),
            BusEvent::SinceRead {
                room,
                client,
                history,
            } => self.since_read(client, room, history),
            BusEvent::JoinFailed { room: _, client } => {
                if let Some(pending) = self.shared_rooms.joining.remove(&client) {
                    refuse_unreachable(&pending.join.link);
                    self.forget_shared_room_if_unused(&pending.join.room);
                }
            }
            BusEvent::Said {
                room,
                client,
                result,
                text,
                cid: _,
            } => self.said(client, &room, result.map(|a| (a.id, a.fresh)), &text),
            BusEvent::Followed { messages, presence } => {
                for entry in messages {
                    self.deliver(entry);
                }
                for event in presence {
                    self.presence(event);
                }
            }
            BusEvent::RoomLost { room } => self.room_lost(&room),
        }
    }

    /// Redis has read a room: it enters memory with its history and its people, and the
    /// joins that waited for it are sent on.
    fn shared_room_loaded(&mut self, room_name: String, snapshot: Snapshot) {
        let history = snapshot.history.into_iter().map(stored).collect();
        let mut room = Room::restore(
            room_name.clone(),
            0,
            snapshot.epoch,
            self.history_limit,
            snapshot.log_at.0,
            history,
        );
        for (member, name) in &snapshot.people {
            // A member of this process here is one whose join failed and whose leave has not
            // landed yet: someone in the room all the same, whom this process does not serve.
            let id = self.remote_id(member);
            room.add_connection(id, None, name, None);
        }
        self.shared_rooms
            .presence_at
            .insert(room_name, snapshot.presence_at);
        self.install_room(room);
    }

    /// Redis could not be read: the clients waiting for the room are told to come back later.
    pub(super) fn load_failed(&mut self, room_name: String) {
        for command in self.loading.remove(&room_name).unwrap_or_default() {
            if let HubCommand::Join(join) = command {
                self.waiting_for_room.remove(&join.client);
                refuse_unreachable(&join.link);
            }
        }
    }

    /// What Redis read for a resuming client, as the store would have answered it.
    pub(super) fn since_read(&mut self, client: ClientId, room: String, history: Vec<Entry>) {
        if let Some(mut pending) = self.shared_rooms.joining.remove(&client) {
            // A join that came back while memory no longer held all it missed.
            if let Some((name, _)) = pending.decided.take() {
                pending.stored = history.into_iter().map(stored).collect();
                self.finish_join(pending, name, false);
                return;
            }
            self.shared_rooms.joining.insert(client, pending);
        }
        let last_id = history.last().map_or(0, |e| e.id);
        let loaded = LoadedRoom {
            handle: 0,
            epoch: String::new(),
            last_id,
            history: history.into_iter().map(stored).collect(),
            resume_of: Some(client),
        };
        self.resume_read(client, &room, loaded);
    }

    /// The id a room knows a connection by: this process's own client id, or one made up for
    /// a connection of another process.
    fn remote_id(&mut self, member: &str) -> ClientId {
        let shared = &mut self.shared_rooms;
        *shared
            .remote_ids
            .entry(member.to_owned())
            .or_insert_with(|| {
                shared.next_remote -= 1;
                shared.next_remote + 1
            })
    }

    /// This process's client behind a member name, if it is one of ours.
    fn own_client(&self, member: &str) -> Option<ClientId> {
        let bus = self.bus.as_ref()?;
        let (process, client) = member.split_once('/')?;
        (process == bus.process()).then(|| client.parse().ok())?
    }

    /// A message read from a room's log: kept and fanned out, once (a message read again
    /// after its room was read anew is passed over by its id).
    fn deliver(&mut self, entry: Entry) {
        let Some(room) = self.rooms.get_mut(&entry.room) else {
            return;
        };
        if entry.id <= room.last_id() {
            return;
        }
        let message = stored(entry);
        let frame = message.frame.clone();
        let before = room.history_bytes();
        room.remember_delivered(message);
        self.memory_used = self.memory_used + room.history_bytes() - before;
        self.shared.metrics.messages.fetch_add(1, Ordering::Relaxed);
        let room_name = room.name().to_owned();
        self.broadcast(&room_name, frame, None);
        self.fit_memory_budget();
    }

    /// A join or leave, in the room's presence order: every process applies the same ones.
    fn presence(&mut self, event: Presence) {
        let Some(at) = self.shared_rooms.presence_at.get_mut(&event.room) else {
            return;
        };
        if event.at <= *at {
            return; // Read with the room already.
        }
        *at = event.at;
        let own = self.own_client(&event.member);
        if event.typing {
            let frame = protocol::encode_typing(&event.name);
            self.broadcast(&event.room, frame, own);
            return;
        }
        if event.joined {
            if let Some(pending) = own.and_then(|c| self.shared_rooms.joining.remove(&c)) {
                self.complete_join(pending, event);
                return;
            }
            let id = match own {
                Some(client) => client,
                None => self.remote_id(&event.member),
            };
            let Some(room) = self.rooms.get_mut(&event.room) else {
                return;
            };
            if room.add_connection(id, None, &event.name, None) {
                let frame = protocol::encode_joined(&event.name, now_ms());
                self.broadcast(&event.room, frame, None);
            }
            return;
        }
        let id = match own {
            Some(client) => client,
            None => match self.shared_rooms.remote_ids.remove(&event.member) {
                Some(id) => id,
                None => return,
            },
        };
        let Some(room) = self.rooms.get_mut(&event.room) else {
            return;
        };
        if own.is_some() && room.has_member(id) {
            // Our own client, still here, removed by another process: it took this process
            // for dead (Redis was out of reach for a while). The client joins again.
            if let Some(link) = room.detach(id) {
                link.close_with(CLOSE_RESTART, "the chat service restarted: join again");
            }
            if room.is_empty() {
                self.shared.active_rooms.fetch_sub(1, Ordering::Relaxed);
            }
            self.room_of.remove(&id);
        }
        let Some(room) = self.rooms.get_mut(&event.room) else {
            return;
        };
        if let Some(name) = room.remove_connection(id) {
            let frame = protocol::encode_left(&name, now_ms());
            self.broadcast(&event.room, frame, None);
        }
        self.forget_shared_room_if_unused(&event.room);
    }

    /// A client joins a shared room: its name is decided in Redis, and its welcome waits for
    /// the join to come back in the room's presence order ([`Hub::presence`]).
    pub(super) fn join_shared(&mut self, join: Join, stored: Vec<StoredMessage>) {
        let Some(bus) = &self.bus else {
            return;
        };
        let candidates = (1..=NAME_CANDIDATES)
            .map(|n| match n {
                1 => join.name.clone(),
                n => format!("{} ({n})", join.name),
            })
            .map(|name| {
                let looks = room::look_alike_key(&name);
                (name, looks)
            })
            .collect();
        let command = BusCommand::Join {
            room: join.room.clone(),
            client: join.client,
            session: join.session.clone(),
            candidates,
        };
        if !bus.send(command) {
            refuse_unreachable(&join.link);
            return;
        }
        let pending = PendingJoin {
            join,
            stored,
            later: Vec::new(),
            decided: None,
        };
        self.shared_rooms
            .joining
            .insert(pending.join.client, pending);
    }

    /// A client's join has come back from Redis: it is in the room, with the name Redis gave.
    ///
    /// The welcome replays what the client missed after its `since`; if memory has dropped
    /// some of it meanwhile (the memory budget), the client is in the room for everyone now,
    /// but its welcome (and its link) waits for Redis to read them ([`Hub::since_read`]).
    fn complete_join(&mut self, mut pending: PendingJoin, event: Presence) {
        let join = &pending.join;
        let missing = self.missing_from_memory(&join.room, join.since, join.epoch.as_deref());
        if let (Some(after), Some(bus)) = (missing.filter(|_| pending.stored.is_empty()), &self.bus)
        {
            let (room, client) = (join.room.clone(), join.client);
            let read = BusCommand::ReadSince {
                room: room.clone(),
                after,
                client,
            };
            if bus.send(read) {
                let Some(shared_room) = self.rooms.get_mut(&room) else {
                    return;
                };
                let session = pending.join.session.as_deref();
                shared_room.add_connection(client, None, &event.name, session);
                if event.person {
                    let frame = protocol::encode_joined(&event.name, now_ms());
                    self.broadcast(&room, frame, Some(client));
                }
                pending.decided = Some((event.name, event.person));
                self.shared_rooms.joining.insert(client, pending);
                return;
            }
        }
        self.finish_join(pending, event.name, event.person);
    }

    /// A joined client gets its link in the room and its welcome, then its waiting commands
    /// run.
    fn finish_join(&mut self, pending: PendingJoin, name: String, new_person: bool) {
        let PendingJoin {
            join,
            stored,
            later,
            decided: _,
        } = pending;
        let Some(room) = self.rooms.get_mut(&join.room) else {
            return;
        };
        if room.is_empty() {
            self.shared.active_rooms.fetch_add(1, Ordering::Relaxed);
        }
        let link = Arc::clone(&join.link);
        room.add_connection(join.client, Some(link), &name, join.session.as_deref());
        let welcome = Welcome {
            since: join.since,
            epoch: join.epoch,
            stored,
            name,
            new_person,
        };
        self.welcome(join.client, &join.room, join.link, welcome);
        for command in later {
            self.handle(command);
        }
    }

    /// A say in a shared room: to Redis, with a token that makes it land once (a resend of
    /// the same `cid` by the same sender carries the same token).
    pub(super) fn say_shared(
        &mut self,
        client: ClientId,
        room_name: String,
        name: String,
        text: &str,
        cid: Option<&str>,
        sender: Option<Sender>,
    ) {
        let Some(bus) = &self.bus else {
            return;
        };
        let token = match (sender, cid) {
            (Some((kind, id)), Some(cid)) => format!("{kind}:{id}:{cid}"),
            _ => {
                self.shared_rooms.says += 1;
                format!("say:{}:{}", bus.process(), self.shared_rooms.says)
            }
        };
        let frame = bus::split_message(&room_name, &name, text, now_ms(), cid);
        let say = Say {
            room: room_name.clone(),
            client,
            frame,
            token,
            text: text.to_owned(),
            cid: cid.map(str::to_owned),
        };
        if !bus.send_say(say) {
            self.refuse_unavailable(client, &room_name, text);
        }
    }

    /// What became of a say's append: `Err` → the client hears `unavailable`; a token seen
    /// before → the original message, to this client only (everyone had it already).
    fn said(
        &mut self,
        client: ClientId,
        room_name: &str,
        result: Result<(u64, bool), ()>,
        text: &str,
    ) {
        match result {
            Err(()) => self.refuse_unavailable(client, room_name, text),
            Ok((_, true)) => {}
            Ok((id, false)) => {
                let original = self.rooms.get(room_name).and_then(|room| {
                    let mut older = room.history_before(id + 1);
                    older
                        .next_back()
                        .filter(|m| m.id == id)
                        .map(|m| m.frame.clone())
                });
                if let Some(frame) = original {
                    self.send_to(client, room_name, Frame::text(frame));
                }
            }
        }
    }

    fn refuse_unavailable(&mut self, client: ClientId, room_name: &str, text: &str) {
        let metrics = &self.shared.metrics;
        metrics.says_unavailable.fetch_add(1, Ordering::Relaxed);
        let refusal = Refusal::new(
            ErrorCode::Unavailable,
            "the chat service cannot be reached: your message was not sent",
        )
        .of_text(text);
        self.send_to(
            client,
            room_name,
            Frame::text(protocol::encode_error(&refusal)),
        );
    }

    /// A page of older history that memory does not hold: read from Redis on the bus thread,
    /// which answers the client itself.
    pub(super) fn history_shared(
        &mut self,
        client: ClientId,
        room_name: String,
        before: u64,
        limit: usize,
    ) {
        let Some(bus) = &self.bus else {
            return;
        };
        let link = self.rooms.get(&room_name).and_then(|room| {
            room.members()
                .find(|(id, _)| *id == client)
                .map(|(_, link)| Arc::clone(link))
        });
        let Some(link) = link else {
            return;
        };
        let reply = Box::new(move |page: Option<(Vec<Entry>, bool)>| {
            let frame = match page {
                Some((page, more)) => {
                    protocol::encode_history(page.iter().map(|e| e.frame.as_str()), more)
                }
                None => protocol::encode_error(&Refusal::new(
                    ErrorCode::Unavailable,
                    "the chat service cannot be reached: try again in a moment",
                )),
            };
            let _ = link.send(Frame::text(frame));
        });
        let command = BusCommand::ReadBefore {
            room: room_name,
            before,
            limit,
            reply,
        };
        if let Err(BusCommand::ReadBefore { reply, .. }) = bus.send_or_return(command) {
            reply(None);
        }
    }

    /// A client of a shared room has gone: it stops getting frames now, and its person
    /// leaves when Redis's leave comes back. The leave is sent even for a join still on its
    /// way (it may land).
    pub(super) fn leave_shared(&mut self, client: ClientId, room_name: &str) {
        if let Some(room) = self.rooms.get_mut(room_name) {
            if room.detach(client).is_some() && room.is_empty() {
                self.shared.active_rooms.fetch_sub(1, Ordering::Relaxed);
            }
        }
        if let Some(bus) = &self.bus {
            bus.send(BusCommand::Leave {
                room: room_name.to_owned(),
                client,
            });
        }
        self.forget_shared_room_if_unused(room_name);
    }

    /// Forgets a shared room no client of this process is in or joining: the bus stops
    /// following it, and the next join reads it again.
    pub(super) fn forget_shared_room_if_unused(&mut self, room_name: &str) {
        let in_use = self
            .rooms
            .get(room_name)
            .is_some_and(|room| !room.is_empty())
            || self.loading.contains_key(room_name)
            || self
                .shared_rooms
                .joining
                .values()
                .any(|p| p.join.room == room_name);
        if in_use {
            return;
        }
        let Some(room) = self.rooms.remove(room_name) else {
            return;
        };
        self.drop_shared_room(room);
        if let Some(bus) = &self.bus {
            bus.send(BusCommand::Forget {
                room: room_name.to_owned(),
            });
        }
        self.publish_memory();
    }

    /// Lets go of what the hub kept for a shared room it no longer holds: its memory, its
    /// presence position, the ids of other processes' connections in it.
    fn drop_shared_room(&mut self, room: Room<MemberLink>) {
        self.memory_used -= room.memory_bytes();
        self.shared_rooms.presence_at.remove(room.name());
        let ids: std::collections::HashSet<ClientId> = room.connections().collect();
        self.shared_rooms
            .remote_ids
            .retain(|_, id| !ids.contains(id));
    }

    /// Redis lost the room's data (its epoch changed): its clients here are closed with 1012
    /// and join again, under the room's new epoch.
    fn room_lost(&mut self, room_name: &str) {
        let Some(room) = self.rooms.get_mut(room_name) else {
            return;
        };
        let members: Vec<ClientId> = room.members().map(|(id, _)| id).collect();
        for client in &members {
            if let Some(link) = room.detach(*client) {
                link.close_with(CLOSE_RESTART, "the chat service restarted: join again");
            }
        }
        let waiting: Vec<ClientId> = self
            .shared_rooms
            .joining
            .iter()
            .filter(|(_, p)| p.join.room == room_name)
            .map(|(client, _)| *client)
            .collect();
        for client in waiting {
            if let Some(pending) = self.shared_rooms.joining.remove(&client) {
                pending
                    .join
                    .link
                    .close_with(CLOSE_RESTART, "the chat service restarted: join again");
            }
        }
        for client in &members {
            self.room_of.remove(client);
        }
        if !members.is_empty() {
            self.shared.active_rooms.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(room) = self.rooms.remove(room_name) {
            self.drop_shared_room(room);
        }
        self.publish_memory();
        warn!(
            "a shared room's data was lost in Redis; its {} clients here join again",
            members.len()
        );
    }
}

/// A message as history keeps it: its frame with exactly its bytes.
fn stored(entry: Entry) -> StoredMessage {
    StoredMessage {
        id: entry.id,
        frame: room::exact_frame(&Utf8Bytes::from(entry.frame)),
    }
}
