-- The slot rules of BRIEF section 3 for one entity, atomically: deciding a new command (rules
-- 1-3), a scheduled command coming due (rule 4), an active window ending (rule 5), and ending
-- a command early (a caller's cancel, or a deadline).
--
-- Run by slots.py (Slots.run), whose docstring lists every field of the slots hash and who
-- writes and reads it.
--
-- KEYS[1]  slots hash of the entity        (dercmd:{entity}:slots)
-- KEYS[2]  decision key of the command     (dercmd:{entity}:decision:<command id>)
-- KEYS[3]  end and cancel: decision key of the revert they may dispatch (its own decision,
--          recorded when it becomes active, so that a cancel of the revert is told apart
--          from one of a command not decided yet)
-- ARGV[1]  operation: decide | start | end | cancel
-- ARGV[2]  command id
-- ARGV[3]  now, ms since the epoch, or "" for Redis's own clock (one clock for every
--          replica, whatever the skew between their hosts; tests pass a fixed time)
-- and per operation:
--   decide  ARGV[4] startAt ms, ARGV[5] endAt ms or "" (holds until replaced),
--           ARGV[6] cooldown ms (0 disables), ARGV[7] "1" to ignore the cooldown,
--           ARGV[8] how long the decision is remembered (s; after the command's startAt or endAt,
--           when that is later), ARGV[9] the command's payload
--           (kept with the decision of a scheduled or windowed command: what its dispatch
--           order and its revert are built from)
--   start   ARGV[4] cooldown ms, ARGV[5] when it is due, ms (its startAt, or the end of the
--           cooldown it waited for): the due-index says that time came, or is at most the
--           lead ahead, and the rules then apply as at that time
--   end     ARGV[4] endAt ms, ARGV[5] revert id, ARGV[6] ttl s (of the revert's decision),
--           ARGV[7] "1" when the backend keeps windows natively (no revert at the end)
--   cancel  ARGV[4] reason (canceled | expired), ARGV[5] revert id (a delivered window ended early is
--           reverted on every backend: a native one would hold it until its endAt),
--           ARGV[6] "1" to take it out of the scheduled slot too, ARGV[7] ttl s
--
-- The decision key holds the command's decision as JSON; every operation records what it
-- did there, so that repeating an operation (a redelivered event, a due entry taken again
-- after a crash) returns the recorded result with duplicate=true and changes nothing:
--   {outcome, fence, superseded[]?, cooldownUntil?, duplicate?, cmd?, at?, revert?}
-- outcome of decide: activated | scheduled | cooldown | expired (endAt already past);
--   "aborted"/"canceled" recorded by intake/cancel before arbitration saw the command.
-- start: activated | waiting (cooldown: due again at "at") | expired (endAt passed first) | gone
-- end:   ended (revert set when dercmd dispatches one; the revert becomes the active
--        command so that a newer command supersedes it like any other) | lapsed (the window
--        ended before dispatch claimed it: it was never delivered; revert and revertOf set
--        when the device still holds an earlier window, see vacate) | waiting (ahead of its
--        end and not claimed yet: look again at "at") | gone
-- cancel: canceled | ended (a delivered window: revert) | finished (nothing to end)
-- "gone": the command no longer holds that slot (superseded or canceled since).
--
-- Every slot change increments the entity's fence; a change of the active command also
-- records it as active_fence, and dispatch refuses orders older than that. "delivered" is
-- set atomically by dispatch's claim: a command dispatch has claimed is never Canceled here,
-- its delivery result is its one terminal status.

local op = ARGV[1]
local cmd = ARGV[2]
local now = tonumber(ARGV[3])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function load_decision()
  local raw = redis.call('GET', KEYS[2])
  if raw then return cjson.decode(raw) end
  return nil
end

-- Stored without what is empty (a busy entity holds two decisions: under 1 KB in all).
local function save(d, ttl)
  d['duplicate'] = nil
  if d.superseded and #d.superseded == 0 then d.superseded = nil end
  if d.cooldownUntil == 0 then d.cooldownUntil = nil end
  local raw = cjson.encode(d)
  if ttl then
    redis.call('SET', KEYS[2], raw, 'EX', ttl)
  else
    redis.call('SET', KEYS[2], raw, 'KEEPTTL')
  end
  return raw
end

local function replay(d)
  d['duplicate'] = true
  return cjson.encode(d)
end

local slot = redis.call('HMGET', KEYS[1], 'fence', 'active', 'scheduled', 'cooldown_until', 'delivered', 'active_end')
local active, scheduled, delivered = slot[2], slot[3], slot[5]
local cooldown_until = tonumber(slot[4]) or 0

-- Make cmd the active command (rules 2 and 4): the active command is superseded unless
-- dispatch has claimed it; a scheduled command other than cmd is superseded.
local function activate(d, end_at, cooldown)
  d.superseded = {}
  if active and active ~= delivered and active ~= cmd then table.insert(d.superseded, active) end
  if scheduled and scheduled ~= cmd then table.insert(d.superseded, scheduled) end
  d.fence = redis.call('HINCRBY', KEYS[1], 'fence', 1)
  redis.call('HSET', KEYS[1], 'active', cmd, 'active_end', end_at, 'active_fence', d.fence)
  redis.call('HDEL', KEYS[1], 'scheduled', 'scheduled_start', 'delivered')
  if cooldown > 0 then
    d.cooldownUntil = now + cooldown
    redis.call('HSET', KEYS[1], 'cooldown_until', d.cooldownUntil)
  end
  d.outcome = 'activated'
end

-- The active window ends (rule 5), on time or early: the revert, when dercmd dispatches one,
-- becomes the active command (a newer command supersedes it unless dispatch claimed it).
local function end_active(d, revert, ttl, of)
  d.fence = redis.call('HINCRBY', KEYS[1], 'fence', 1)
  if revert ~= '' then
    redis.call('HSET', KEYS[1], 'active', revert, 'active_end', '', 'active_fence', d.fence)
    redis.call('SET', KEYS[3], cjson.encode({outcome = 'activated', fence = d.fence, revertOf = of or cmd}), 'EX', ttl)
    d.revert = revert
    if of then d.revertOf = of end
  else
    redis.call('HDEL', KEYS[1], 'active', 'active_end')
    redis.call('HSET', KEYS[1], 'active_fence', d.fence)
  end
  redis.call('HDEL', KEYS[1], 'delivered')
end

-- The active command leaves the slot undelivered (its window lapsed, or it was canceled):
-- the device still holds what dispatch last delivered ("held", kept by the claim for a
-- window only). A window there gets a revert now, so that the device returns to its default
-- (rule 5) although its own end found another command active.
local function vacate(d, revert, ttl)
  local held = redis.call('HGET', KEYS[1], 'held')
  if held and held ~= cmd and d.revertOf ~= held then  -- (a revert of it leaving: no new one)
    end_active(d, revert, ttl, held)
  else
    end_active(d, '')
  end
end

if op == 'decide' then
  local recorded = load_decision()
  if recorded then return replay(recorded) end
  local start_at = tonumber(ARGV[4])
  local end_at = tonumber(ARGV[5])  -- nil when ""
  local cooldown = tonumber(ARGV[6])
  local d = {outcome = '', fence = tonumber(slot[1]) or 0, superseded = {}, cooldownUntil = 0}
  if ARGV[9] ~= '' then d.cmd = ARGV[9] end
  if end_at and end_at <= now then
    d.outcome = 'expired'  -- rule 1: a window that has already ended is ignored
  elseif start_at <= now then
    -- rule 2: due now; the cooldown applies when a command is about to be dispatched
    if ARGV[7] ~= '1' and cooldown_until > now then
      d.outcome = 'cooldown'
      d.cooldownUntil = cooldown_until
    else
      activate(d, ARGV[5], cooldown)
    end
  else
    -- rule 3: in the future; overwrites the scheduled slot. active_fence does not move:
    -- the active command's dispatch order stays valid.
    d.outcome = 'scheduled'
    if scheduled then table.insert(d.superseded, scheduled) end
    d.fence = redis.call('HINCRBY', KEYS[1], 'fence', 1)
    redis.call('HSET', KEYS[1], 'scheduled', cmd, 'scheduled_start', start_at)
  end
  -- Kept for as long after the command's last due time (its start, or its window's end) as
  -- after a decision: the due-index acts on it then.
  local keep = tonumber(ARGV[8])
  local last = end_at or start_at
  if last > now then keep = keep + math.ceil((last - now) / 1000) end
  return save(d, keep)
end

local d = load_decision()
if not d then
  if op ~= 'cancel' then return cjson.encode({outcome = 'gone', fence = 0, superseded = {}, cooldownUntil = 0, duplicate = false}) end
  -- Not decided (its accepted event is late or lost), or a revert (decided by 'end').
  d = {outcome = 'undecided', fence = tonumber(slot[1]) or 0, superseded = {}, cooldownUntil = 0}
end

if op == 'start' then
  now = math.max(now, tonumber(ARGV[5]) or 0)
  if d.outcome ~= 'scheduled' and d.outcome ~= 'waiting' then
    return replay(d)  -- fired before (a due entry taken again), or canceled meanwhile
  end
  if scheduled ~= cmd then
    d.outcome = 'gone'  -- superseded or canceled since; they said so
    return save(d)
  end
  -- the payload: type|value|percentage|start|end|accepted[+expires]|ignore cooldown|assets
  local e, ic = string.match(d.cmd or '', '^[^|]*|[^|]*|[^|]*|[^|]*|([^|]*)|[^|]*|([^|]*)|')
  local end_at = tonumber(e)
  local cooldown = tonumber(ARGV[4])
  if end_at and end_at <= now then
    redis.call('HDEL', KEYS[1], 'scheduled', 'scheduled_start')
    d.fence = redis.call('HINCRBY', KEYS[1], 'fence', 1)
    d.outcome = 'expired'
  elseif ic ~= '1' and cooldown_until > now then
    -- Due inside the cooldown: waits for its end, or is expired when its endAt comes first.
    d.outcome = 'waiting'
    d.at = cooldown_until
    if end_at and end_at < cooldown_until then d.at = end_at end
    return save(d)
  else
    activate(d, e or '', cooldown)
  end
  return save(d)
end

local function gone()
  return cjson.encode({outcome = 'gone', fence = d.fence, superseded = {}, cooldownUntil = 0, duplicate = false})
end

if op == 'end' then
  if d.early then return gone() end  -- a cancel ended it already (and said so)
  if d.outcome ~= 'activated' then return replay(d) end
  if active ~= cmd or slot[6] ~= ARGV[4] then
    d.outcome = 'gone'
    return save(d)
  end
  if delivered ~= cmd then
    if now < tonumber(ARGV[4]) then
      -- Acted on ahead of its end (the lead) before dispatch claimed it: look again later.
      return cjson.encode({outcome = 'waiting', fence = d.fence, at = tonumber(ARGV[4])})
    end
    -- Its window passed before dispatch claimed it: never delivered, nothing of its own to
    -- revert (but see vacate).
    vacate(d, ARGV[5], tonumber(ARGV[6]))
    d.outcome = 'lapsed'
    return save(d)
  end
  if ARGV[7] == '1' then
    -- A backend that keeps windows natively returns the device to its default by itself.
    end_active(d, '')
    redis.call('HDEL', KEYS[1], 'held')
  else
    end_active(d, ARGV[5], tonumber(ARGV[6]))
  end
  d.outcome = 'ended'
  return save(d)
end

if op == 'cancel' then
  if d.outcome == 'canceled' or d.outcome == 'ended' then return replay(d) end
  local undecided = d.outcome == 'undecided'
  d.reason = ARGV[4]
  if scheduled == cmd and ARGV[6] == '1' then
    redis.call('HDEL', KEYS[1], 'scheduled', 'scheduled_start')
    d.fence = redis.call('HINCRBY', KEYS[1], 'fence', 1)
    d.outcome = 'canceled'
  elseif active == cmd and delivered ~= cmd then
    vacate(d, ARGV[5], tonumber(ARGV[7]))
    d.outcome = 'canceled'
  elseif active == cmd and slot[6] and slot[6] ~= '' and ARGV[4] == 'canceled' then
    end_active(d, ARGV[5], tonumber(ARGV[7]))  -- a delivered window the caller ends now
    d.outcome = 'ended'
    d.early = true
  elseif undecided then
    d.outcome = 'canceled'  -- recorded first: arbitration will never act on it
  else
    return cjson.encode({outcome = 'finished', fence = d.fence, superseded = {}, cooldownUntil = 0, duplicate = false})
  end
  return save(d, tonumber(ARGV[7]))
end

return redis.error_reply('unknown op ' .. op)
