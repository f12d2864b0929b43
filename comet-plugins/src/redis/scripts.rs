//! The Lua scripts that make each cluster step one atomic Redis call.
//!
//! Keys (all under the configured prefix `P`):
//!
//! - `P head:<conv>`: the conversation's newest chatId (`INCR`);
//! - `P h:<conv>`: its history, a stream capped at the history bound, entry
//!   id `<chatId>-0`, fields `f` (sender) and `m` (bytes);
//! - `P in:<mid>`: the offline inbox, a sorted set scored by the entry's
//!   seq (`P inseq`), member `seq\nop\nfrom\nto\nchatId\nbytes`;
//! - `P gm:<group>`: the group's members; `P ug:<mid>`: the groups of a mid;
//! - `P lr:<mid>`: hash group → the chatId through which `mid` has had the
//!   group's messages, read while it is offline everywhere (catch-up);
//! - `P pr:<mid>`: the nodes holding a session of `mid` (presence);
//!   `P nm:<node>`: the mids a node registered; `P node:<node>`: the node's
//!   heartbeat, a key that expires unless refreshed; `P nodes`: hash node →
//!   `sessions\nms`, its session count and the Redis time (milliseconds)
//!   of its last heartbeat (fields of nodes whose heartbeat expired are
//!   dropped when the list is read); `P own:<node>`: the claim of the
//!   process running as that node, a token it picked at start (a second
//!   process that takes the id over makes the first one step down).
//!
//! Channels, every payload a one-letter kind, then `\n`-separated fields:
//!
//! - `P ch:<node>`, the node's own feed:
//!   - `D\nchatId\nop\nfrom\nto\nexcept\nmid,mid,..\nbytes`: a 1:1 message
//!     for those mids' sessions on the node (`except`: the sending
//!     connection, 0: none);
//!   - `I\nmid` / `O\nmid`: the login / logout script of `mid` ran for this
//!     node: group messages published after it reach (no longer reach)
//!     `mid`'s sessions here;
//!   - `S\ngroup\nmid,mid,..`: the group's members when the node asked for
//!     them (`LOAD_GROUP`);
//! - `P all`, every node's group feed:
//!   - `G\nchatId\nfrom\ngroup\nnode\nexcept\nbytes`: a group message,
//!     sent through `node` by connection `except`;
//!   - `J\ngroup\nmid` / `L\ngroup\nmid`: `mid` joined / left the group
//!     (published only when membership really changed).
//!
//! Both channels are read on one connection, so a node sees them in the
//! order the scripts ran.
//!
//! `<conv>` is `d:<low>:<high>` for a 1:1 conversation, `g:<group>` for a
//! group.

/// `live(prefix, node)`: the node's heartbeat is fresh and its feed has a
/// subscriber. `ours(prefix, node, token)`: no other process has claimed
/// the node id (`own:<node>` is this token, or unset: the heartbeat claims
/// it again). `now_ms()`: Redis's clock, in milliseconds (the nodes'
/// clocks never matter). `push_inbox(prefix, mid, bound, tail)`: appends an entry to the mid's
/// inbox under the next seq and drops the oldest past the bound.
const TRIM: &str = r"
local function live(p, n)
  if redis.call('EXISTS', p .. 'node:' .. n) == 0 then return false end
  local subs = redis.call('PUBSUB', 'NUMSUB', p .. 'ch:' .. n)
  return tonumber(subs[2]) > 0
end
local function ours(p, n, token)
  local own = redis.call('GET', p .. 'own:' .. n)
  return (not own) or own == token
end
local function now_ms()
  local t = redis.call('TIME')
  return t[1] * 1000 + math.floor(t[2] / 1000)
end
local function push_inbox(p, m, imax, entry_tail)
  local seq = redis.call('INCR', p .. 'inseq')
  local ik = p .. 'in:' .. m
  redis.call('ZADD', ik, seq, seq .. '\n' .. entry_tail)
  if redis.call('ZCARD', ik) > imax then
    redis.call('ZREMRANGEBYRANK', ik, 0, -(imax + 1))
  end
end
";

/// One send. ARGV: prefix, op, from, to, bytes, conv, hist_max, inbox_max,
/// route (1: check an op 20 sender's membership and route; 2: route
/// without the check, a trusted system send; 0: store only, as
/// `MessageStore::append`), node, except, echo_here (1: the sending node
/// holds a session of the sender other than `except`). Returns the chatId,
/// or -1 when an op 20 sender is not a member (nothing written).
///
/// A group message is published once, on `P all`: every node delivers it
/// to its own sessions of the group's members (its membership cache), so
/// the script's cost does not grow with the group. A 1:1 message goes to
/// the nodes in the presence of its recipient and sender, or the inbox;
/// the sender's copy skips the sending node when the sending connection is
/// the sender's only session there (echo_here 0), which saves a 1:1 send
/// from a one-device user a `PUBLISH` and its node a feed message.
///
/// The chatId is formatted once (`%d`): Lua 5.1 turns a number into a
/// string with `%.14g`, whose float formatting showed in Redis's profile
/// of the 1:1 pairs (about 2% of Redis's samples, three times per send).
const SEND_BODY: &str = r"
local p, op, from, to, msg, conv = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local hmax, imax = tonumber(ARGV[7]), tonumber(ARGV[8])
local route, node, except, echo_here = ARGV[9], ARGV[10], ARGV[11], ARGV[12]
local targets
if route == '0' then
  targets = {}
elseif op == '20' then
  if route == '1' and redis.call('SISMEMBER', p .. 'gm:' .. to, from) == 0 then return -1 end
elseif from == to then
  targets = {from}
else
  targets = {to, from}
end
local chat = redis.call('INCR', p .. 'head:' .. conv)
local cs = string.format('%d', chat)
if hmax > 0 then
  redis.call('XADD', p .. 'h:' .. conv, 'MAXLEN', hmax, cs .. '-0', 'f', from, 'm', msg)
else
  redis.call('DEL', p .. 'h:' .. conv)
end
if route == '0' then return chat end
if op == '20' then
  redis.call('PUBLISH', p .. 'all', 'G\n' .. cs .. '\n' .. from .. '\n' .. to .. '\n' .. node .. '\n' .. except .. '\n' .. msg)
  return chat
end
local tail = op .. '\n' .. from .. '\n' .. to .. '\n' .. cs .. '\n'
local alive, bynode, order, reached = {}, {}, {}, {}
for _, m in ipairs(targets) do
  for _, n in ipairs(redis.call('SMEMBERS', p .. 'pr:' .. m)) do
    -- The sender's copy for the sending node, where the sending
    -- connection is its only session: nobody there to deliver it to.
    if m ~= from or n ~= node or echo_here == '1' then
      local a = alive[n]
      if a == nil then
        a = redis.call('EXISTS', p .. 'node:' .. n) == 1
        alive[n] = a
      end
      if a then
        local l = bynode[n]
        if l == nil then
          l = {}
          bynode[n] = l
          order[#order + 1] = n
        end
        l[#l + 1] = m
      else
        redis.call('SREM', p .. 'pr:' .. m, n)
      end
    end
  end
end
for _, n in ipairs(order) do
  local ex = '0'
  if n == node then ex = except end
  local heard = redis.call('PUBLISH', p .. 'ch:' .. n,
    'D\n' .. cs .. '\n' .. op .. '\n' .. from .. '\n' .. to .. '\n' .. ex .. '\n' .. table.concat(bynode[n], ',') .. '\n' .. msg)
  if heard > 0 then
    for _, m in ipairs(bynode[n]) do reached[m] = true end
  else
    -- Nobody listens on the node's feed: it died (its heartbeat has not
    -- expired yet) or lost its subscription (it closes its sessions).
    -- Count it as gone until it heartbeats or logs a session in again.
    redis.call('DEL', p .. 'node:' .. n)
  end
end
for _, m in ipairs(targets) do
  if not reached[m] and m ~= from then
    push_inbox(p, m, imax, tail .. msg)
  end
end
return chat
";

/// The send script's source.
pub(crate) fn send() -> String {
    format!("{TRIM}{SEND_BODY}")
}

/// A session of a mid arrives on a node. ARGV: prefix, mid, node,
/// node_ttl_ms, catch-up max per group, inbox max. If the mid was online
/// nowhere (no live node in its presence), copies what its groups got since
/// it left (at most the max per group, newest kept, its own messages left
/// out) into its inbox; then records the node in its presence and the
/// groups' heads as read. Tells the node's feed (`I`) that group messages
/// from here on reach the mid's sessions there. Returns how many catch-up
/// entries it copied.
const LOGIN_BODY: &str = r"
local p, m, node = ARGV[1], ARGV[2], ARGV[3]
local ttl, max, imax = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
if not ours(p, node, ARGV[7]) then return -1 end
redis.call('SET', p .. 'node:' .. node, '1', 'PX', ttl)
local online = false
for _, n in ipairs(redis.call('SMEMBERS', p .. 'pr:' .. m)) do
  if live(p, n) then
    online = true
  else
    redis.call('SREM', p .. 'pr:' .. m, n)
  end
end
redis.call('SADD', p .. 'pr:' .. m, node)
redis.call('SADD', p .. 'nm:' .. node, m)
local copied = 0
if not online then
  for _, g in ipairs(redis.call('SMEMBERS', p .. 'ug:' .. m)) do
    local conv = 'g:' .. g
    local head = tonumber(redis.call('GET', p .. 'head:' .. conv) or '0')
    local lr = tonumber(redis.call('HGET', p .. 'lr:' .. m, g) or head)
    if head > lr then
      local start = lr + 1
      if head - lr > max then start = head - max + 1 end
      for _, e in ipairs(redis.call('XRANGE', p .. 'h:' .. conv, start .. '-0', '+')) do
        local f = e[2][2]
        if f ~= m then
          local id = string.match(e[1], '^(%d+)')
          push_inbox(p, m, imax, '20\n' .. f .. '\n' .. g .. '\n' .. id .. '\n' .. e[2][4])
          copied = copied + 1
        end
      end
    end
    redis.call('HSET', p .. 'lr:' .. m, g, head)
  end
end
redis.call('PUBLISH', p .. 'ch:' .. node, 'I\n' .. m)
return copied
";

/// The login script's source.
pub(crate) fn login() -> String {
    format!("{TRIM}{LOGIN_BODY}")
}

/// The last session of a mid on a node has ended. ARGV: prefix, mid, node.
/// Removes the node from the mid's presence; if no live node holds the mid
/// any more, records its groups' heads as read (later messages are caught
/// up at its next login). Tells the node's feed (`O`): a group message
/// published before this script that finds no session of the mid there
/// goes to its inbox (the catch-up position set here is past it), one
/// published after it is not for this node. Returns 1 when the mid went
/// offline everywhere.
const LOGOUT_BODY: &str = r"
local p, m, node = ARGV[1], ARGV[2], ARGV[3]
if not ours(p, node, ARGV[4]) then return -1 end
redis.call('SREM', p .. 'pr:' .. m, node)
redis.call('SREM', p .. 'nm:' .. node, m)
redis.call('PUBLISH', p .. 'ch:' .. node, 'O\n' .. m)
for _, n in ipairs(redis.call('SMEMBERS', p .. 'pr:' .. m)) do
  if live(p, n) then return 0 end
  redis.call('SREM', p .. 'pr:' .. m, n)
end
for _, g in ipairs(redis.call('SMEMBERS', p .. 'ug:' .. m)) do
  redis.call('HSET', p .. 'lr:' .. m, g, redis.call('GET', p .. 'head:g:' .. g) or '0')
end
return 1
";

/// The logout script's source.
pub(crate) fn logout() -> String {
    format!("{TRIM}{LOGOUT_BODY}")
}

/// A node (re)starts: forgets the presence it had registered before.
/// ARGV: prefix, node, token. Returns -1, touching nothing, when another
/// process holds the node id's claim.
const RESET_NODE_BODY: &str = r"
local p, node, token = ARGV[1], ARGV[2], ARGV[3]
if not ours(p, node, token) then return -1 end
for _, m in ipairs(redis.call('SMEMBERS', p .. 'nm:' .. node)) do
  redis.call('SREM', p .. 'pr:' .. m, node)
end
redis.call('DEL', p .. 'nm:' .. node)
return 1
";

/// The presence-reset script's source.
pub(crate) fn reset_node() -> String {
    format!("{TRIM}{RESET_NODE_BODY}")
}

/// A page of history, read atomically. ARGV: prefix, conv, after, limit.
/// Returns `{head, oldest, id1, from1, bytes1, id2, ...}`.
pub(crate) const HISTORY: &str = r"
local p, conv, after, limit = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local head = tonumber(redis.call('GET', p .. 'head:' .. conv) or '0')
local out = {head, 0}
if head == 0 then return out end
local first = redis.call('XRANGE', p .. 'h:' .. conv, '-', '+', 'COUNT', 1)
if #first == 0 then
  out[2] = head + 1
  return out
end
out[2] = tonumber(string.match(first[1][1], '^(%d+)'))
if limit == 0 or after >= head then return out end
local start = after + 1
if start < 1 then start = 1 end
for _, e in ipairs(redis.call('XRANGE', p .. 'h:' .. conv, start .. '-0', '+', 'COUNT', limit)) do
  out[#out + 1] = tonumber(string.match(e[1], '^(%d+)'))
  out[#out + 1] = e[2][2]
  out[#out + 1] = e[2][4]
end
return out
";

/// Keeps a message in an inbox. ARGV: prefix, mid, inbox_max, op, from,
/// to, chatId, bytes.
const PUSH_BODY: &str = r"
local p, m, imax = ARGV[1], ARGV[2], tonumber(ARGV[3])
if imax == 0 then return 0 end
push_inbox(p, m, imax, ARGV[4] .. '\n' .. ARGV[5] .. '\n' .. ARGV[6] .. '\n' .. ARGV[7] .. '\n' .. ARGV[8])
return 1
";

/// The push script's source.
pub(crate) fn push() -> String {
    format!("{TRIM}{PUSH_BODY}")
}

/// Adds a member to a group (idempotent): its catch-up starts at the
/// group's current chatId; every node's membership cache hears of it (`J`)
/// in order with the group's messages. ARGV: prefix, group, mid. Returns 1
/// if the mid was not a member yet, else 0.
pub(crate) const JOIN: &str = r"
local p, g, m = ARGV[1], ARGV[2], ARGV[3]
local added = redis.call('SADD', p .. 'gm:' .. g, m)
if added == 1 then
  redis.call('PUBLISH', p .. 'all', 'J\n' .. g .. '\n' .. m)
end
if redis.call('SADD', p .. 'ug:' .. m, g) == 1 then
  redis.call('HSET', p .. 'lr:' .. m, g, redis.call('GET', p .. 'head:g:' .. g) or '0')
end
return added
";

/// Removes a member from a group; every node's membership cache hears of
/// it (`L`). ARGV: prefix, group, mid. Returns 1 if the mid was a member,
/// else 0.
pub(crate) const LEAVE: &str = r"
local p, g, m = ARGV[1], ARGV[2], ARGV[3]
local removed = redis.call('SREM', p .. 'gm:' .. g, m)
if removed == 1 then
  redis.call('PUBLISH', p .. 'all', 'L\n' .. g .. '\n' .. m)
end
redis.call('SREM', p .. 'ug:' .. m, g)
redis.call('HDEL', p .. 'lr:' .. m, g)
return removed
";

/// The live nodes holding a session of a mid (presence entries of nodes
/// whose heartbeat expired are left out). ARGV: prefix, mid.
pub(crate) const NODES_OF: &str = r"
local p, m = ARGV[1], ARGV[2]
local live = {}
for _, n in ipairs(redis.call('SMEMBERS', p .. 'pr:' .. m)) do
  if redis.call('EXISTS', p .. 'node:' .. n) == 1 then live[#live + 1] = n end
end
return live
";

/// A node's membership cache asks for a group: its members are published
/// on the node's own feed (`S`), where they take their place among the
/// group's messages and membership events. ARGV: prefix, group, node.
pub(crate) const LOAD_GROUP: &str = r"
local p, g, node = ARGV[1], ARGV[2], ARGV[3]
local members = redis.call('SMEMBERS', p .. 'gm:' .. g)
redis.call('PUBLISH', p .. 'ch:' .. node, 'S\n' .. g .. '\n' .. table.concat(members, ','))
return #members
";

/// A node's heartbeat: refreshes its claim and its key, and reports its
/// session count. ARGV: prefix, node, node_ttl_ms, sessions, token.
/// Returns 0, touching nothing, when another process has claimed the node
/// id since (see `CLAIM`); else 1. The time is Redis's, so the nodes'
/// clocks do not matter.
const HEARTBEAT_BODY: &str = r"
local p, n, ttl, sessions, token = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if not ours(p, n, token) then return 0 end
redis.call('SET', p .. 'own:' .. n, token, 'PX', ttl)
redis.call('SET', p .. 'node:' .. n, '1', 'PX', ttl)
redis.call('HSET', p .. 'nodes', n, sessions .. '\n' .. string.format('%d', now_ms()))
return 1
";

/// The heartbeat script's source.
pub(crate) fn heartbeat() -> String {
    format!("{TRIM}{HEARTBEAT_BODY}")
}

/// A process starting as a node claims its id. ARGV: prefix, node, token,
/// node_ttl_ms. Refused (0) while a live node holds the id: someone reads
/// its channel and its heartbeat is fresh (a dead node's subscription may
/// outlive it by minutes after a power or network cut, until TCP
/// keepalive ends it; its heartbeat expires sooner). Otherwise the claim
/// is this process's (1), whoever had it before: a process that held it
/// and still runs (two started at the same instant, or one that stalled
/// past its heartbeat's lifetime) finds out at its next heartbeat and
/// steps down.
pub(crate) const CLAIM: &str = r"
local p, n, token, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local subs = redis.call('PUBSUB', 'NUMSUB', p .. 'ch:' .. n)
if tonumber(subs[2]) > 0 and redis.call('EXISTS', p .. 'node:' .. n) == 1 then return 0 end
redis.call('SET', p .. 'own:' .. n, token, 'PX', ttl)
return 1
";

/// The live nodes (heartbeat key present), each as four entries: id,
/// ready (1: a subscriber reads its channel), sessions, milliseconds since
/// it reported them. Drops the reports of nodes whose heartbeat expired.
/// ARGV: prefix.
const NODES_BODY: &str = r"
local p = ARGV[1]
local now = now_ms()
local all = redis.call('HGETALL', p .. 'nodes')
local out = {}
for i = 1, #all, 2 do
  local n = all[i]
  if redis.call('EXISTS', p .. 'node:' .. n) == 1 then
    local sessions, at = string.match(all[i + 1], '^(%d+)\n(%d+)$')
    local subs = redis.call('PUBSUB', 'NUMSUB', p .. 'ch:' .. n)
    local ready = 0
    if tonumber(subs[2]) > 0 then ready = 1 end
    out[#out + 1] = n
    out[#out + 1] = ready
    out[#out + 1] = tonumber(sessions or '0')
    out[#out + 1] = math.max(0, now - tonumber(at or now))
  else
    redis.call('HDEL', p .. 'nodes', n)
  end
end
return out
";

/// The node list script's source.
pub(crate) fn nodes() -> String {
    format!("{TRIM}{NODES_BODY}")
}
