"""The Lua scripts of :class:`~comet.backends.redis.RedisHub`'s streams.

Every writer of a channel's stream appends through :data:`PUBLISH_FN` (the
publish script, and presence's joins and leaves in
:mod:`comet.backends.redis_presence`), so each entry's predecessor field
``p`` is exact. :data:`PUBLISH` is also the contract for publishers in
other languages (``docs/publishing.md`` shows it; a test checks they agree).
"""
from __future__ import annotations

__all__ = ["LIB", "PUBLISH_FN", "PUBLISH", "PUBLISH_CLUSTER", "PUBLISH_MANY", "PUBLISH_MANY_CLUSTER", "PUBLISH_BATCH",
           "LOAD", "FORGET"]

# Shared by the scripts: stream ids compared exactly (as digit strings), the
# server's time in ms, and the floor of a channel that has no stream: the id
# right after the newest a forgotten channel of its bucket had, and with
# max_idle every id older than max_idle (a stream that expired idle had
# nothing newer).
LIB = """
local function after(a, b)
  local am, as = string.match(a, '(%d+)-(%d+)')
  local bm, bs = string.match(b, '(%d+)-(%d+)')
  if #am ~= #bm then return #am > #bm end
  if am ~= bm then return am > bm end
  if #as ~= #bs then return #as > #bs end
  return as > bs
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function fresh_floor(forgotten, bucket, idle, margin)
  local floor = redis.call('HGET', forgotten, bucket) or '0-0'
  if idle > 0 then
    local expired = string.format('%d', now_ms() - margin) .. '-18446744073709551615'
    if after(expired, floor) then floor = expired end
  end
  return floor
end
"""

# Appending one event to a channel's stream, as every writer does it (the
# publish script, and presence's join and leave): reading the newest id and
# adding happen atomically, so "p" is exact. *fields* are the entry's
# field/value pairs; *bell* rings the stream's shard channel (Cluster);
# *newest*, if given, is the stream's newest id, which this same script has
# just added (a batch's scripts: one XREVRANGE costs more than the XADD).
PUBLISH_FN = """
local function publish(stream, forgotten, maxlen, approx, max_age, idle, bucket, bell, fields, newest)
  local prev, id = newest, '*'
  if not prev then
    local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
    if #last > 0 then prev = last[1][1] else
      prev = fresh_floor(forgotten, bucket, idle, idle)
      -- A new stream's ids start at the clock: one forgotten in this very
      -- millisecond had ids as high, so start right after its floor instead.
      local ms, seq = string.match(prev, '(%d+)-(%d+)')
      if tonumber(ms) >= now_ms() then id = ms .. '-' .. string.format('%d', tonumber(seq) + 1) end
    end
  end
  id = redis.call('XADD', stream, 'MAXLEN', approx, maxlen, id, 'p', prev, unpack(fields))
  if max_age > 0 then
    redis.call('XTRIM', stream, 'MINID', string.format('%d', now_ms() - max_age) .. '-0')
  end
  if idle > 0 then redis.call('PEXPIRE', stream, idle) end
  if bell then redis.call('SPUBLISH', stream, id) end
  return id
end
"""

# KEYS[1] stream, KEYS[2] forgotten channels' floors by bucket; ARGV:
# maxlen, "~" or "=", field/value pairs, then max_age ms, max_idle ms, bucket.
PUBLISH = LIB + PUBLISH_FN + """
local n = #ARGV
return publish(KEYS[1], KEYS[2], ARGV[1], ARGV[2], tonumber(ARGV[n - 2]), tonumber(ARGV[n - 1]), ARGV[n], BELL,
               {unpack(ARGV, 3, n - 3)})
"""

# Several events to one stream in one call (publish_many; on a cluster
# each rings the bell, as PUBLISH_CLUSTER does): each appended as PUBLISH appends it, in order, in
# one script (atomic, as MULTI/EXEC was, at a fraction of its cost per
# event). KEYS as PUBLISH; ARGV: maxlen, "~" or "=", max_age ms, max_idle
# ms, bucket, then for each event the number of its field/value items and
# those items. Returns the ids.
PUBLISH_MANY = LIB + PUBLISH_FN + """
local maxlen, approx, max_age, idle, bucket = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local ids, i = {}, 6
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  ids[#ids + 1] = publish(KEYS[1], KEYS[2], maxlen, approx, max_age, idle, bucket, BELL, {unpack(ARGV, i + 1, i + n)},
                         ids[#ids])
  i = i + n + 1
end
return ids
"""

# The group commit's batch on a single Redis (or Sentinel's master): several
# publishes, to any streams, in one script call, each as PUBLISH runs it and
# each with its own result: its id, or its error (a stream key of the wrong
# type fails that publish alone, as when each was a call of its own). One
# call instead of one per publish: Redis pays a script's setup once, and the
# client packs and reads one command. KEYS: each publish's stream and
# forgotten hash (two per publish); ARGV: for each, the number of its
# arguments, then PUBLISH's ARGV. Returns the ids and errors, in order.
PUBLISH_BATCH = LIB + PUBLISH_FN + """
local ids, newest, i = {}, {}, 1
for k = 1, #KEYS, 2 do
  local a, z = i + 1, i + tonumber(ARGV[i])
  local stream = KEYS[k]
  local ok, id = pcall(publish, stream, KEYS[k + 1], ARGV[a], ARGV[a + 1], tonumber(ARGV[z - 2]),
                       tonumber(ARGV[z - 1]), ARGV[z], false, {unpack(ARGV, a + 2, z - 3)}, newest[stream])
  if ok then
    newest[stream] = id
  else
    newest[stream] = nil
    if type(id) ~= 'table' then id = redis.error_reply(tostring(id)) end
  end
  ids[#ids + 1] = id
  i = z + 1
end
return ids
"""

# A process starts mirroring a channel. KEYS as PUBLISH; ARGV: how many
# events, max_age ms, max_idle ms, bucket, and '1' for a latest-value
# channel. Returns {entries (newest first), floor, compacted}: the floor
# (only when no entry qualifies) is a cursor that every later event
# follows, with no gap unless events it should have seen are gone. A
# latest-value channel's entries are the last ARGV[1] and, before them, the
# newest of each key not among those (compacted = 1 when any was left out):
# the newest value of every key the stream has, as a process that followed
# it from the start knows them, in one read that sends at most keys + ARGV[1].
LOAD = LIB + """
local max_age, idle = tonumber(ARGV[2]), tonumber(ARGV[3])
local min = '-'
if max_age > 0 then min = string.format('%d', now_ms() - max_age) .. '-0' end
local entries = {}
if ARGV[5] == '1' then
  local all = redis.call('XREVRANGE', KEYS[1], '+', min)
  local window = tonumber(ARGV[1])
  if #all > window then
    local out, seen, dropped = {}, {}, 0
    for i = 1, #all do
      local fields, key, name = all[i][2], nil, nil
      for f = 1, #fields, 2 do
        if fields[f] == 'y' then key = fields[f + 1] elseif fields[f] == 'e' then name = fields[f + 1] end
      end
      key = key or name or false  -- (false: no key, no name; names are never empty)
      if i <= window or seen[key] == nil then
        table.insert(out, all[i])
        seen[key] = true
      else
        dropped = dropped + 1
      end
    end
    return {out, false, dropped > 0 and 1 or 0}
  end
  if #all > 0 then return {all, false, 0} end
else
  entries = redis.call('XREVRANGE', KEYS[1], '+', min, 'COUNT', ARGV[1])
  if #entries > 0 then return {entries, false, 0} end
end
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #newest > 0 then return {entries, newest[1][1], 0} end
return {entries, fresh_floor(KEYS[2], ARGV[4], idle, 1), 0}
"""

# KEYS[1] stream, KEYS[2] as PUBLISH, KEYS[3..5] the channel's presence
# (members, counts, leave deadlines: see redis_presence), KEYS[6] (single
# Redis) the stream of forgets every process reads; ARGV: bucket, channel,
# the forgetting process's mirror tail ('' if none), how many entries after
# it to return. Returns nil if there was no stream, else {the newest id it
# had, the entries after the tail}: the forgetting process's subscribers
# take exactly what was published before the forget. The bucket's floor
# becomes the id right after that newest one: a cursor at the old channel's
# last event is before the new channel's floor, so it gets a gap (as with
# the memory hub).
FORGET = LIB + """
redis.call('DEL', KEYS[3], KEYS[4], KEYS[5])
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #newest == 0 then return false end
local last = newest[1][1]
local rest = {}
if ARGV[3] ~= '' then rest = redis.call('XRANGE', KEYS[1], '(' .. ARGV[3], '+', 'COUNT', ARGV[4]) end
local ms, seq = string.match(last, '(%d+)-(%d+)')
local floor = ms .. '-' .. string.format('%d', tonumber(seq) + 1)
local known = redis.call('HGET', KEYS[2], ARGV[1])
if not known or after(floor, known) then redis.call('HSET', KEYS[2], ARGV[1], floor) end
redis.call('DEL', KEYS[1])
if #KEYS > 5 then redis.call('XADD', KEYS[6], 'MAXLEN', '~', 1000, '*', 'c', ARGV[2], 'l', last) end
return {last, rest}
"""

# On Redis Cluster the publish script also rings the stream's bell: SPUBLISH
# on the stream key, a shard channel of the same slot (see redis_cluster).
PUBLISH_CLUSTER = PUBLISH.replace("BELL", "true")
PUBLISH = PUBLISH.replace("BELL", "false")
PUBLISH_MANY_CLUSTER = PUBLISH_MANY.replace("BELL", "true")
PUBLISH_MANY = PUBLISH_MANY.replace("BELL", "false")
