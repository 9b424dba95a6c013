//! The Lua scripts the bus runs in Redis, and how a `message` frame is split around its id
//! for them (pure).
//!
//! [`super::Bus`] runs them through `redis::Script`, which sends `EVALSHA` and falls back to
//! `EVAL` (loading the script) when Redis answers `NOSCRIPT`, e.g. after a restart. Every key a
//! script touches comes in `KEYS` (all of one room, so of one Cluster slot) and every room
//! name, token and frame in `ARGV`: the script text is constant, never built from data.

use tungstenite::Utf8Bytes;

use crate::protocol;

/// Appends one message to a room, atomically, once per token.
///
/// KEYS: 1 the room's `seq`, 2 its `log`, 3 the token's record.
/// ARGV: 1 the frame before the id, 2 the frame after it, 3 the token, 4 about how many
/// entries the stream keeps (`MAXLEN ~`), 5 how long the token's record lives, in seconds.
/// Returns `{id, fresh}`: `fresh` is 1 when this call appended, 0 when the token had already
/// been appended (the id is then that first append's).
///
/// The id is formatted with `%d`: Lua's own number-to-string (`%.14g`) would write large ids
/// in exponent form. XADD with an explicit id is refused if the stream already holds that id
/// or a larger one: that happens only when `seq` was lost while the stream was kept (an
/// operator's DEL, an eviction). The script then moves `seq` past the stream's last entry and
/// adds there, so ids go on from the stream, never backwards and never twice.
pub const APPEND: &str = r#"
local prior = redis.call('GET', KEYS[3])
if prior then
  return {tonumber(prior), 0}
end
local function add(id)
  local text = string.format('%d', id)
  return text, redis.pcall('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], text .. '-0',
    'f', ARGV[1] .. text .. ARGV[2], 't', ARGV[3])
end
local id = redis.call('INCR', KEYS[1])
local text, added = add(id)
if type(added) == 'table' and added.err then
  local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
  if #last == 0 then
    return redis.error_reply(added.err)
  end
  id = tonumber(string.match(last[1][1], '^(%d+)')) + 1
  redis.call('SET', KEYS[1], string.format('%d', id))
  text, added = add(id)
  if type(added) == 'table' and added.err then
    return redis.error_reply(added.err)
  end
end
redis.call('SET', KEYS[3], text, 'EX', ARGV[5])
return {id, 1}
"#;

/// Sets a room's epoch unless it has one, and returns the one in force.
///
/// KEYS: 1 the room's `epoch`. ARGV: 1 the epoch to set if none is.
pub const EPOCH: &str = r#"
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
"#;

/// How every `message` frame starts, up to its id: `protocol::encode_message` writes `type`
/// then `id` first (checked by [`split_message`] on every call, and by the tests).
const HEAD: &str = r#"{"type":"message","id":"#;

/// A `message` frame cut around its id, for [`APPEND`], which puts the id between the two
/// parts: `head + id + tail` is byte for byte `protocol::encode_message` for that id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitFrame {
    pub head: &'static str,
    pub tail: String,
}

impl SplitFrame {
    /// The frame as it reads with `id` (what the script stores).
    pub fn with_id(&self, id: u64) -> String {
        format!("{}{id}{}", self.head, self.tail)
    }
}

/// The `message` frame for these fields, cut around its id: the caller does not know the id
/// yet, Redis picks it.
pub fn split_message(room: &str, name: &str, text: &str, ts: u64, cid: Option<&str>) -> SplitFrame {
    let frame: Utf8Bytes = protocol::encode_message(0, room, name, text, ts, cid);
    let frame = frame.as_str();
    let rest = frame
        .strip_prefix(HEAD)
        .and_then(|rest| rest.strip_prefix('0'))
        .expect("protocol::encode_message writes type then id first");
    SplitFrame {
        head: HEAD,
        tail: rest.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_frames_rebuild_the_protocol_frame() {
        for (id, cid) in [(1, None), (42, Some("c-1")), (u64::MAX, Some("\"}{"))] {
            let split = split_message("room2", "alice \"a\"", "hi {0} \u{2028}", 17, cid);
            let whole =
                protocol::encode_message(id, "room2", "alice \"a\"", "hi {0} \u{2028}", 17, cid);
            assert_eq!(split.with_id(id), whole.as_str());
        }
    }
}
