-- Slot rules 1-3 and the cooldown of BRIEF section 3, for one command, atomically.
--
-- KEYS[1]  slots hash of the entity     (dercmd:{entity}:slots)
-- KEYS[2]  decision key of the command  (dercmd:{entity}:decision:<command id>)
-- ARGV[1]  command id
-- ARGV[2]  now, ms since the epoch, or "" for Redis's own clock (one clock for every
--          replica, whatever the skew between their hosts; tests pass a fixed time)
-- ARGV[3]  startAt, ms
-- ARGV[4]  endAt, ms, or "" for a command that stays active until replaced
-- ARGV[5]  cooldown, ms (0 disables)
-- ARGV[6]  "1" to ignore the cooldown
-- ARGV[7]  how long the decision is remembered, seconds
--
-- Returns the decision as JSON: {outcome, fence, superseded[], cooldownUntil, duplicate}.
-- outcome: "activated" (dispatch now), "scheduled" (stored in the scheduled slot),
-- "cooldown" (refused; cooldownUntil says until when), "expired" (endAt already past).
-- A command seen before returns its first decision with duplicate=true and changes nothing;
-- that includes "aborted", which intake records when it could not announce a command.
-- Every slot change increments the entity's fence; an activation also records it as
-- active_fence, and dispatch refuses orders older than that.

local recorded = redis.call('GET', KEYS[2])
if recorded then
  local d = cjson.decode(recorded)
  d['duplicate'] = true
  return cjson.encode(d)
end

local cmd = ARGV[1]
local now = tonumber(ARGV[2])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local start_at = tonumber(ARGV[3])
local end_at = tonumber(ARGV[4])  -- nil when ""
local cooldown = tonumber(ARGV[5])
local ignore_cooldown = ARGV[6] == '1'

local d = {outcome = '', fence = 0, superseded = {}, cooldownUntil = 0, duplicate = false}
local slot = redis.call('HMGET', KEYS[1], 'fence', 'active', 'scheduled', 'cooldown_until', 'delivered')
d.fence = tonumber(slot[1]) or 0
local cooldown_until = tonumber(slot[4]) or 0

if end_at and end_at <= now then
  -- rule 1: a window that has already ended is ignored
  d.outcome = 'expired'
elseif start_at <= now then
  -- rule 2: due now; the cooldown applies when a command is about to be dispatched
  if (not ignore_cooldown) and cooldown_until > now then
    d.outcome = 'cooldown'
    d.cooldownUntil = cooldown_until
  else
    d.outcome = 'activated'
    -- The active command is Canceled only if dispatch has not claimed it yet ("delivered" is
    -- set atomically by dispatch's claim): once claimed, its delivery result is its one
    -- terminal status. A scheduled command is never delivered before it is active.
    if slot[2] and slot[2] ~= slot[5] then table.insert(d.superseded, slot[2]) end
    if slot[3] then table.insert(d.superseded, slot[3]) end
    d.fence = redis.call('HINCRBY', KEYS[1], 'fence', 1)
    redis.call('HSET', KEYS[1], 'active', cmd, 'active_end', ARGV[4], 'active_fence', d.fence)
    redis.call('HDEL', KEYS[1], 'scheduled', 'scheduled_start', 'delivered')
    if cooldown > 0 then
      d.cooldownUntil = now + cooldown
      redis.call('HSET', KEYS[1], 'cooldown_until', d.cooldownUntil)
    end
  end
else
  -- rule 3: in the future; overwrites the scheduled slot. The fence moves, active_fence
  -- does not: the active command's dispatch order stays valid.
  d.outcome = 'scheduled'
  if slot[3] then table.insert(d.superseded, slot[3]) end
  d.fence = redis.call('HINCRBY', KEYS[1], 'fence', 1)
  redis.call('HSET', KEYS[1], 'scheduled', cmd, 'scheduled_start', start_at)
end

-- cjson encodes an empty table as {}; callers treat a missing or empty value alike.
redis.call('SET', KEYS[2], cjson.encode(d), 'EX', tonumber(ARGV[7]))
return cjson.encode(d)
