"""The Lua script ``RedisStreamBus.publish`` runs, atomically on the server, and the keys it uses.

One publish, in one round trip::

    lag = unread + pending (XINFO GROUPS)            lag >= max_lag           -> {0, lag}       (BusFull)
    held = bytes of the stream's entries (counter)   recounted (XRANGE) when the counter's entry
                                                     count differs from XLEN: the stream was changed
                                                     behind the bus's back (deleted, trimmed, new)
    while XLEN + 1 > maxlen or held + size > max_bytes: the oldest applied entry goes (XDEL),
        held -= its size; applied = at or below the group's last-delivered-id and not pending
        (pending ids come from XPENDING, 64 at a time, and are stepped over, their entries unread)
    held + size > max_bytes                          -> {2, held}      (BusFull: unapplied entries fill it)
    XADD; counter = {bytes: held + size, entries: XLEN}  -> {1, id}

An entry's size is the bytes of its field names and values (``service.bus.base.entry_size``),
taken from the entry itself when it is dropped: XRANGE returns the whole entry anyway, so no size
field is stored. The script trims by itself instead of ``XADD MAXLEN ~``, so every entry leaving
the stream is subtracted. Only applied entries are dropped, never an unread or pending one; those
number ``lag < max_lag <= maxlen / 2``, so ``maxlen`` always holds, and ``max_bytes`` refuses when
they alone fill it. Dropping entries below the last-delivered id keeps the group's lag exact (Redis 7). The bytes counted are the entries' own; Redis adds its overhead per entry, and a
small dropped entry sharing a node with a pending one is freed with that node.
"""

from __future__ import annotations

__all__ = [
    "BYTES_FULL",
    "CLAIM_SHARD_LUA",
    "FENCED_ACK_LUA",
    "LAG_FULL",
    "PUBLISHED",
    "PUBLISH_LUA",
    "ROUND_LUA",
    "TOO_LARGE",
    "bytes_key",
]

#: First element of the script's answer.
LAG_FULL, PUBLISHED, BYTES_FULL, TOO_LARGE = 0, 1, 2, 3


def bytes_key(stream: str) -> str:
    """The stream's byte counter (a hash: ``bytes``, ``entries``), in the stream's Redis Cluster slot.

    A stream named with a hash tag (``{ndot}:events``) gets ``<stream>:bytes``, which has the same
    tag. Without one the stream's slot is the hash of its whole name, so the counter carries that
    name as its tag: ``ndot:events:{ndot:events}:bytes``. Either way the key starts with the
    stream name, like every other key of the bus.
    """
    start = stream.find("{")
    if start >= 0 and stream.find("}", start + 1) > start + 1:  # a non-empty tag decides the slot
        return f"{stream}:bytes"
    return f"{stream}:{{{stream}}}:bytes"


# KEYS[1] = stream, KEYS[2] = bytes_key(stream); ARGV = group, max_lag, maxlen, max_bytes, name1, value1, ...
PUBLISH_LUA = """
local stream, counter, group = KEYS[1], KEYS[2], ARGV[1]
local max_lag, maxlen, max_bytes = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local FIRST = 5

local function size_of(values, first)
  local n = 0
  for i = first, #values do n = n + #values[i] end
  return n
end

local size = size_of(ARGV, FIRST)
if size > max_bytes then return {3, size} end
if redis.call('EXISTS', stream) == 0 then
  redis.call('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
end
local length = redis.call('XLEN', stream)
local lag, last_delivered, pending = nil, '0-0', 0
for _, row in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
  local info = {}
  for i = 1, #row, 2 do info[row[i]] = row[i + 1] end
  if info['name'] == group then
    local unread = info['lag']
    if not unread then unread = length end -- lag unknown: XLEN bounds it from above
    pending = info['pending']
    lag = unread + pending
    last_delivered = info['last-delivered-id']
  end
end
if lag == nil then
  redis.call('XGROUP', 'CREATE', stream, group, '0')
  lag = length
end
if lag >= max_lag then return {0, lag} end

local held = tonumber(redis.call('HGET', counter, 'bytes'))
if held == nil or tonumber(redis.call('HGET', counter, 'entries')) ~= length then
  held = 0
  local cursor = '-'
  while true do
    local batch = redis.call('XRANGE', stream, cursor, '+', 'COUNT', 16)
    for _, entry in ipairs(batch) do held = held + size_of(entry[2], 1) end
    if #batch < 16 then break end
    cursor = '(' .. batch[#batch][1]
  end
end

local function over(count, bytes) return count + 1 > maxlen or bytes + size > max_bytes end
if over(length, held) then
  local cursor, doomed = '-', {}
  local waiting, w, more_pending = {}, 1, pending > 0 -- pending ids at or after the cursor
  local function next_pending()
    if waiting[w] == nil and more_pending then
      local rows = redis.call('XPENDING', stream, group, cursor, '+', 64)
      waiting, w, more_pending = {}, 1, #rows == 64
      for i, row in ipairs(rows) do waiting[i] = row[1] end
    end
    return waiting[w]
  end
  local function drop()
    if #doomed > 0 then
      redis.call('XDEL', stream, unpack(doomed))
      length = length - #doomed
      doomed = {}
    end
  end
  while over(length - #doomed, held) do
    local stop = next_pending()
    local upto = last_delivered -- after it: unread
    if stop then upto = '(' .. stop end
    local entry = redis.call('XRANGE', stream, cursor, upto, 'COUNT', 1)[1]
    if entry then
      doomed[#doomed + 1] = entry[1]
      held = held - size_of(entry[2], 1)
      cursor = '(' .. entry[1]
      if #doomed == 512 then drop() end
    elseif stop then -- step over the pending entry, without reading it
      cursor = '(' .. stop
      w = w + 1
    else
      break
    end
  end
  drop()
end
if held + size > max_bytes then
  redis.call('HSET', counter, 'bytes', held, 'entries', length)
  return {2, held}
end
local id = redis.call('XADD', stream, '*', unpack(ARGV, FIRST))
redis.call('HSET', counter, 'bytes', held + size, 'entries', length + 1)
return {1, id}
"""


# Fencing tokens (docs/scale-out.md): every worker group takes a token higher than any before it
# (INCR of ``<stream>:epoch``) and writes it into the owner key of each shard it owns; a shard's acks
# run only while its owner key still holds the acking group's token, atomically on the server.

# KEYS[1] = owner key of a shard; ARGV[1] = the group's token. -> 0 (owned now), or the newer token
CLAIM_SHARD_LUA = """
local owner = tonumber(redis.call('GET', KEYS[1]) or '0')
if owner > tonumber(ARGV[1]) then return owner end
redis.call('SET', KEYS[1], ARGV[1])
return 0
"""

# KEYS[1] = shard stream, KEYS[2] = its owner key; ARGV[1] = group, ARGV[2] = token, ARGV[3..] = ids
FENCED_ACK_LUA = """
local owner = redis.call('GET', KEYS[2])
if owner ~= ARGV[2] then
  return redis.error_reply('FENCED shard owned by token ' .. tostring(owner) .. ', not ' .. ARGV[2])
end
return redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 3))
"""

# A worker round (``redis_round.send_round``) in one round trip, no other command run in between:
#   KEYS = value keys (nv), reply keys (nr), then per shard acked: its stream [and its owner key, fenced]
#   ARGV = group, token ('' unfenced), reply_ttl_ms, nv, nr,
#          per value: ttl ('' none, 'del' delete, else ms), value;  per reply: payload;
#          per shard acked: how many ids, the ids
# Fenced: every acked shard's owner key must hold the token, checked before anything is written (a
# round of a group that lost its shards writes nothing). The writes run in order and the acks last:
# a refused write (OOM, a replica, ...) ends the script before any entry is acked. XACK of a group
# that is gone (Redis restarted without it: nothing is pending any more) acks nothing, no error.
ROUND_LUA = """
local group, token, reply_ttl = ARGV[1], ARGV[2], ARGV[3]
local nv, nr = tonumber(ARGV[4]), tonumber(ARGV[5])
local per_shard = 1
if token ~= '' then
  per_shard = 2
  for k = nv + nr + 1, #KEYS, 2 do
    local owner = redis.call('GET', KEYS[k + 1])
    if owner ~= token then
      return redis.error_reply('FENCED shard owned by token ' .. tostring(owner) .. ', not ' .. token)
    end
  end
end
local a = 6
for i = 1, nv do
  local ttl, value = ARGV[a], ARGV[a + 1]
  a = a + 2
  if ttl == 'del' then
    redis.call('DEL', KEYS[i])
  elseif ttl == '' then
    redis.call('SET', KEYS[i], value)
  else
    redis.call('SET', KEYS[i], value, 'PX', ttl)
  end
end
for i = 1, nr do
  local key = KEYS[nv + i]
  redis.call('RPUSH', key, ARGV[a])
  redis.call('PEXPIRE', key, reply_ttl)
  a = a + 1
end
for k = nv + nr + 1, #KEYS, per_shard do
  local count = tonumber(ARGV[a])
  a = a + 1
  for first = a, a + count - 1, 1000 do -- (unpack's stack is bounded)
    redis.call('XACK', KEYS[k], group, unpack(ARGV, first, math.min(first + 999, a + count - 1)))
  end
  a = a + count
end
return nv + nr
"""
