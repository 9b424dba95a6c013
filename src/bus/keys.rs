//! The names of the Redis keys the bus uses (pure): one place that knows the key layout.
//!
//! [`super::Bus`] and [`super::Follower`] ask [`Keys`] for every key they touch; nothing else
//! builds a key. A room's keys all carry the room in a hash tag, `chatroom:{room2}:log`, so on
//! a Redis Cluster they share one slot (a Lua script may only touch keys of one slot).
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P:{room}:log` | stream | the room's messages; entry id `<id>-0`, fields `f` (frame), `t` (token) |
//! | `P:{room}:seq` | string | the room's last message id (INCR) |
//! | `P:{room}:epoch` | string | the room's epoch, set once |
//! | `P:{room}:tok:<token>` | string | the id an append token got (expires) |
//! | `P:{room}:people` | hash | who is in the room: `n:<looks>` name, `c:<looks>` connections, `s:<looks>` session, `S:<session>` looks, `m:<member>` looks |
//! | `P:{room}:presence` | stream | joins, leaves and typing notices, in order; fields `e` (`j`/`l`/`t`), `m` member, `n` name, `x` new person / person gone |
//! | `P:ctl:<process>` | stream | pokes that wake one process's follower |
//! | `P:alive:<process>` | string | set while the process lives (expires without its heartbeat) |
//! | `P:rooms:<process>` | set | the rooms where the process has had members since it started |
//! | `P:processes` | set | every process not yet reaped |
//!
//! Room names, tokens and process ids are data: each is written into the key by [`escape`],
//! which keeps `[a-z0-9_-]` (every valid room name, see `room::normalize_room_name`) as it is
//! and writes any other byte as `%XX`. So an escaped part never holds `{`, `}` or `:`: the hash
//! tag is exactly the room, and two different rooms (or tokens) never make the same key.
//! Pattern characters (`*`, `?`, `[`) mean nothing in a key name anyway (the bus never uses
//! `KEYS` or `SCAN`), and they are escaped all the same.

use std::fmt::Write;

/// The prefix when none is given (`--redis-prefix`, a later flag).
pub const DEFAULT_PREFIX: &str = "chatroom";
/// Longest prefix accepted: it is repeated in every key.
pub const MAX_PREFIX_BYTES: usize = 64;

/// Builds the bus's key names under one prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Default for Keys {
    fn default() -> Self {
        Keys {
            prefix: DEFAULT_PREFIX.to_owned(),
        }
    }
}

impl Keys {
    /// A key builder for `prefix`: 1 to 64 bytes of letters, digits and `_ - . :`. Braces would
    /// move the hash tag away from the room, so they (and anything else) are refused.
    pub fn new(prefix: &str) -> Result<Keys, String> {
        let allowed = |c: char| c.is_ascii_alphanumeric() || "_-.:".contains(c);
        if prefix.is_empty() || prefix.len() > MAX_PREFIX_BYTES || !prefix.chars().all(allowed) {
            return Err(format!(
                "bad Redis key prefix {prefix:?}: use 1 to {MAX_PREFIX_BYTES} letters, digits, \
                 '_', '-', '.' or ':'"
            ));
        }
        Ok(Keys {
            prefix: prefix.to_owned(),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `P:{room}:` followed by `what`.
    fn room_key(&self, room: &str, what: &str) -> String {
        let mut key = String::with_capacity(self.prefix.len() + room.len() + what.len() + 4);
        key.push_str(&self.prefix);
        key.push_str(":{");
        escape_into(&mut key, room);
        key.push_str("}:");
        key.push_str(what);
        key
    }

    /// The room's stream of messages.
    pub fn log(&self, room: &str) -> String {
        self.room_key(room, "log")
    }

    /// The room's id counter.
    pub fn seq(&self, room: &str) -> String {
        self.room_key(room, "seq")
    }

    /// The room's epoch.
    pub fn epoch(&self, room: &str) -> String {
        self.room_key(room, "epoch")
    }

    /// Who is in the room, from every process (see the table above).
    pub fn people(&self, room: &str) -> String {
        self.room_key(room, "people")
    }

    /// The room's joins and leaves, in the order every process applies them.
    pub fn presence(&self, room: &str) -> String {
        self.room_key(room, "presence")
    }

    /// The record of one append token in one room.
    pub fn token(&self, room: &str, token: &str) -> String {
        let mut key = self.room_key(room, "tok:");
        escape_into(&mut key, token);
        key
    }

    /// One process's control stream. It has no hash tag: on a Redis Cluster it lives in a slot
    /// of its own (see the module doc of [`super`] on XREAD and slots).
    pub fn control(&self, process: &str) -> String {
        self.process_key("ctl", process)
    }

    /// Set while `process` lives; like the control stream, outside every room's slot.
    pub fn alive(&self, process: &str) -> String {
        self.process_key("alive", process)
    }

    /// The rooms where `process` has (or had) members, so a survivor can clear them all when
    /// it dies, whether or not the survivor follows them.
    pub fn rooms_of(&self, process: &str) -> String {
        self.process_key("rooms", process)
    }

    /// Every process that has registered, alive or not (yet) reaped.
    pub fn processes(&self) -> String {
        let mut key = self.prefix.clone();
        key.push_str(":processes");
        key
    }

    /// `P:<what>:<process>`.
    fn process_key(&self, what: &str, process: &str) -> String {
        let mut key = String::with_capacity(self.prefix.len() + what.len() + process.len() + 2);
        key.push_str(&self.prefix);
        key.push(':');
        key.push_str(what);
        key.push(':');
        escape_into(&mut key, process);
        key
    }
}

/// `text` as a key part: `[a-z0-9_-]` kept, every other byte as `%XX` (upper-case hex).
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    escape_into(&mut out, text);
    out
}

fn escape_into(out: &mut String, text: &str) {
    for &byte in text.as_bytes() {
        if byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'_' || byte == b'-' {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_room_names_stay_readable() {
        let keys = Keys::default();
        assert_eq!(keys.log("room2"), "chatroom:{room2}:log");
        assert_eq!(keys.seq("a_b-c"), "chatroom:{a_b-c}:seq");
        assert_eq!(keys.epoch("general"), "chatroom:{general}:epoch");
        assert_eq!(keys.token("r", "abc"), "chatroom:{r}:tok:abc");
        assert_eq!(keys.control("p1"), "chatroom:ctl:p1");
        assert_eq!(keys.people("r"), "chatroom:{r}:people");
        assert_eq!(keys.presence("r"), "chatroom:{r}:presence");
        assert_eq!(keys.alive("p1"), "chatroom:alive:p1");
        assert_eq!(keys.rooms_of("p1"), "chatroom:rooms:p1");
        assert_eq!(keys.processes(), "chatroom:processes");
    }

    #[test]
    fn any_string_is_data() {
        let keys = Keys::new("app").unwrap();
        assert_eq!(keys.log("a}b{*"), "app:{a%7Db%7B%2A}:log");
        assert_eq!(escape("%"), "%25");
        assert_eq!(escape("A:?[é"), "%41%3A%3F%5B%C3%A9");
        // The hash tag is exactly the escaped room: one `{`, one `}`.
        for room in ["{x}", "}", "{", "a}:log", "*", "x}:tok:y"] {
            let key = keys.log(room);
            assert_eq!(key.matches('{').count(), 1, "{key}");
            assert_eq!(key.matches('}').count(), 1, "{key}");
        }
    }

    #[test]
    fn different_parts_never_make_one_key() {
        let keys = Keys::default();
        // Without escaping, room "a}:tok:x" + token "t" and room "a" + token "x}:tok:t" would
        // collide.
        assert_ne!(keys.token("a}:tok:x", "t"), keys.token("a", "x}:tok:t"));
        assert_ne!(keys.log("a"), keys.log("A"));
        assert_ne!(keys.log("%41"), keys.log("A"));
        let names = [
            "", "a", "A", "%", "%25", "a b", "a%20b", "{a}", "*", "?", "[a]",
        ];
        let mut seen = std::collections::HashSet::new();
        for name in names {
            assert!(seen.insert(keys.log(name)), "{name:?}");
        }
    }

    #[test]
    fn prefixes_are_checked() {
        assert!(Keys::new("chatroom").is_ok());
        assert!(Keys::new("staging:chat.v2").is_ok());
        for bad in ["", "a{b", "a}b", "a b", "a*", &"x".repeat(65)] {
            assert!(Keys::new(bad).is_err(), "{bad:?}");
        }
    }
}
