"""The Lua script ``RedisStreamBus.publish`` runs: the lag check and the XADD, atomically on the server."""

from __future__ import annotations

# KEYS[1] = stream; ARGV = group, max_lag, maxlen, field1, value1, ...
# Returns {1, id} when appended, {0, lag} when lag = unread + pending reached max_lag.
PUBLISH_LUA = """
local stream, group = KEYS[1], ARGV[1]
local max_lag = tonumber(ARGV[2])
if redis.call('EXISTS', stream) == 0 then
  redis.call('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
end
local lag = nil
for _, row in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
  local info = {}
  for i = 1, #row, 2 do info[row[i]] = row[i + 1] end
  if info['name'] == group then
    local unread = info['lag']
    if not unread then unread = redis.call('XLEN', stream) end -- lag unknown: XLEN bounds it from above
    lag = unread + info['pending']
  end
end
if lag == nil then
  redis.call('XGROUP', 'CREATE', stream, group, '0')
  lag = redis.call('XLEN', stream)
end
if lag >= max_lag then return {0, lag} end
return {1, redis.call('XADD', stream, 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 4))}
"""
