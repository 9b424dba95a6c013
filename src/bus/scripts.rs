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

/// A connection joins a room: its person's name is decided here, once for every process.
///
/// KEYS: 1 the room's `people` hash, 2 its `presence` stream.
/// ARGV: 1 the member (`<process>/<client>`), 2 its session (`''`: none), 3 about how many
/// entries the presence stream keeps, then pairs of (name, look-alike key): the wanted name,
/// then `name (2)`, `name (3)`, … in order.
/// Returns `{name, new}`; `new` is `'1'` when a new person appeared. A session already in the
/// room joins its person; the first candidate whose look-alike key is free is taken. A member
/// already in (a retried join) gets its name back and nothing is announced again.
/// Announces `e=j` on the presence stream.
pub const JOIN: &str = r#"
local member, session = ARGV[1], ARGV[2]
local prior = redis.call('HGET', KEYS[1], 'm:' .. member)
if prior then
  return {redis.call('HGET', KEYS[1], 'n:' .. prior) or '', '0'}
end
local function enter(looks, name, new)
  redis.call('HSET', KEYS[1], 'm:' .. member, looks)
  redis.call('HINCRBY', KEYS[1], 'c:' .. looks, 1)
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*',
    'e', 'j', 'm', member, 'n', name, 'x', new)
  return {name, new}
end
if session ~= '' then
  local looks = redis.call('HGET', KEYS[1], 'S:' .. session)
  local name = looks and redis.call('HGET', KEYS[1], 'n:' .. looks)
  if name then
    return enter(looks, name, '0')
  end
end
for i = 4, #ARGV - 1, 2 do
  local name, looks = ARGV[i], ARGV[i + 1]
  if redis.call('HEXISTS', KEYS[1], 'n:' .. looks) == 0 then
    redis.call('HSET', KEYS[1], 'n:' .. looks, name)
    if session ~= '' then
      redis.call('HSET', KEYS[1], 'S:' .. session, looks, 's:' .. looks, session)
    end
    return enter(looks, name, '1')
  end
end
return redis.error_reply('NONAME every candidate name is taken')
"#;

/// Connections leave a room: named ones (ARGV 2 `m`), or every connection of the named
/// processes (ARGV 2 `p`, each process given as the `<process>/` its members start with).
///
/// KEYS: 1 the room's `people` hash, 2 its `presence` stream.
/// ARGV: 1 about how many entries the presence stream keeps, 2 `m` or `p`, then the members
/// or process prefixes. Returns how many connections left. Each one that was in the room is
/// announced once (`e=l`, `x` `'1'` when its person is gone), so a leave repeated by several
/// processes (a dead process's members, reaped by every survivor) is announced once.
pub const LEAVE: &str = r#"
local count = 0
local function leave(member)
  local looks = redis.call('HGET', KEYS[1], 'm:' .. member)
  if not looks then
    return
  end
  redis.call('HDEL', KEYS[1], 'm:' .. member)
  local name = redis.call('HGET', KEYS[1], 'n:' .. looks) or ''
  local gone = '0'
  if redis.call('HINCRBY', KEYS[1], 'c:' .. looks, -1) <= 0 then
    local session = redis.call('HGET', KEYS[1], 's:' .. looks)
    redis.call('HDEL', KEYS[1], 'n:' .. looks, 'c:' .. looks, 's:' .. looks)
    if session then
      redis.call('HDEL', KEYS[1], 'S:' .. session)
    end
    gone = '1'
  end
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*',
    'e', 'l', 'm', member, 'n', name, 'x', gone)
  count = count + 1
end
if ARGV[2] == 'm' then
  for i = 3, #ARGV do
    leave(ARGV[i])
  end
else
  for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
    if string.sub(field, 1, 2) == 'm:' then
      local member = string.sub(field, 3)
      for i = 3, #ARGV do
        if string.sub(member, 1, #ARGV[i]) == ARGV[i] then
          leave(member)
          break
        end
      end
    end
  end
end
return count
"#;

/// A room as a process starts to follow it, read in one atomic step: its epoch (set to the
/// candidate if it had none), who is in it, where its presence stream ends, where its log
/// ends, and its newest messages. Following both streams after those two positions then
/// misses nothing and repeats nothing.
///
/// KEYS: 1 `epoch`, 2 `people`, 3 `presence`, 4 `log`. ARGV: 1 the candidate epoch, 2 how many
/// messages to read. Returns `{epoch, people (HGETALL, flat), presence end, log end,
/// {id, frame, id, frame, …} newest first}`; an empty stream ends at `0-0`.
pub const LOAD: &str = r#"
redis.call('SET', KEYS[1], ARGV[1], 'NX')
local epoch = redis.call('GET', KEYS[1])
local people = redis.call('HGETALL', KEYS[2])
local function last(key)
  local newest = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
  if #newest == 0 then
    return '0-0'
  end
  return newest[1][1]
end
local messages = {}
local count = tonumber(ARGV[2])
if count > 0 then
  for _, entry in ipairs(redis.call('XREVRANGE', KEYS[4], '+', '-', 'COUNT', count)) do
    local fields = entry[2]
    for i = 1, #fields - 1, 2 do
      if fields[i] == 'f' then
        table.insert(messages, entry[1])
        table.insert(messages, fields[i + 1])
      end
    end
  end
end
return {epoch, people, last(KEYS[3]), last(KEYS[4]), messages}
"#;

/// Gives a room a new epoch, but only if it still has `old`: of several processes that find
/// the room's log rolled back, the first renews it and the others find it renewed. Who is in
/// the room is an old picture too (people who have left, connections that no longer exist):
/// it is emptied, without announcing anything, since every process closes the room's clients
/// and they join again.
///
/// KEYS: 1 the room's `epoch`, 2 its `people`. ARGV: 1 the epoch the caller knew, 2 the new
/// one. Returns the epoch in force.
pub const RENEW_EPOCH: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  redis.call('DEL', KEYS[2])
end
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
