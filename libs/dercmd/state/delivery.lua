-- One command's delivery state, so that a device receives each command at most once, each
-- command gets exactly one terminal status, and the status topic says Sent before the result,
-- whichever of the backend's answer and its asynchronous callback arrives first.
--
-- KEYS[1] the entity's slots hash, KEYS[2] the command's delivery key.
-- ARGV[1] the operation:
--   claim    ARGV[2]=order fence, ARGV[3]=ttl s, ARGV[4]=command id, ARGV[5]="1" for a window
--            -> the existing state if there is one (a redelivery: never deliver twice),
--               else "stale" if a newer command was activated since (fence < active_fence),
--               else "claimed" (and the slot records the command as delivered, so
--               arbitration will not cancel it: its delivery result is its terminal status;
--               and, for a window, as what the device holds ("held"), which arbitration
--               reverts if the slot empties without a newer command reaching the device)
--   advance  ARGV[2]=from, ARGV[3]=to          -> "to" if the state was "from", else the state
--            (inflight -> accepted: the backend took it; accepted -> sent: Sent is on the topic;
--            what comes back otherwise is the result that arrived first)
--   result   ARGV[2]=outcome (a callback), ARGV[3]=ttl s
--                                            -> "emit" (Sent is out, or nothing is recorded: publish the result)
--                                               | "deferred" (the sender publishes it after Sent)
--                                               | the existing state
--   retry    ARGV[2]=command id                -> "retry" if the state was "inflight" (the backend did
--            not take it: it may be claimed again), else the state. The slot forgets that
--            this command reached the device, and what the device holds is what it held before
--            ARGV[3]=order fence: if a newer command took the slot while the call was out
--            (when this one counted as delivered, so arbitration left it alone) ->
--            "superseded": done as Canceled, which dispatch reports
--   abandon  ARGV[2]=order fence, ARGV[3]=outcome, ARGV[4]=ttl s, ARGV[5]=command id: a
--            command not delivered by its deadline, not claimed or in "retry" -> "abandoned"
--            (done with the outcome; the slot counts it as settled by dispatch, so arbitration
--            leaves it alone, and what the device holds is untouched) | "stale" | the state
--   finish   ARGV[2]=outcome (after it is published), ARGV[3]=ttl s -> "done"
--   peek                                       -> the state, changing nothing (a delivery check)
-- States: inflight -> accepted -> sent -> done:<o>; a result during inflight/accepted is kept
-- as result:<o> until the sender has published Sent; inflight -> retry -> (claim) inflight
-- for a command the backend did not take.
local SUPERSEDED = 'done:Canceled|superseded|a newer command took the device while this one was not delivered'
local op = ARGV[1]
local state = redis.call('GET', KEYS[2])
if op == 'claim' or op == 'abandon' then
  if state and state ~= 'retry' then return state end
  local active_fence = tonumber(redis.call('HGET', KEYS[1], 'active_fence')) or 0
  if tonumber(ARGV[2]) < active_fence then return 'stale' end
  if op == 'abandon' then
    redis.call('SET', KEYS[2], 'done:' .. ARGV[3], 'EX', tonumber(ARGV[4]))
    redis.call('HSET', KEYS[1], 'delivered', ARGV[5])
    return 'abandoned'
  end
  redis.call('SET', KEYS[2], 'inflight', 'EX', tonumber(ARGV[3]))
  redis.call('HSET', KEYS[1], 'delivered', ARGV[4])
  local held = redis.call('HGET', KEYS[1], 'held')
  if held and held ~= ARGV[4] then
    redis.call('HSET', KEYS[1], 'held_before', held)  -- restored if this one does not get through
  elseif not held then
    redis.call('HDEL', KEYS[1], 'held_before')
  end
  if ARGV[5] == '1' then
    redis.call('HSET', KEYS[1], 'held', ARGV[4])
  else
    redis.call('HDEL', KEYS[1], 'held')
  end
  return 'claimed'
end
if not state then
  -- Nothing recorded, yet a result or an outcome to record: the backend's word that it has
  -- the command, so the state was lost (Redis restarted empty; its TTL is long past any
  -- delivery). The result is the command's one terminal status: record it and publish it.
  if op == 'result' or op == 'finish' then
    redis.call('SET', KEYS[2], 'done:' .. ARGV[2], 'EX', tonumber(ARGV[3]))
    return op == 'result' and 'emit' or 'done'
  end
  return 'missing'
end
if op == 'peek' then
  return state
elseif op == 'advance' then
  if state == ARGV[2] then
    redis.call('SET', KEYS[2], ARGV[3], 'KEEPTTL')
    return ARGV[3]
  end
  return state
elseif op == 'result' then
  if state == 'retry' then  -- it reached the device after all: the claim that comes resumes from it
    redis.call('SET', KEYS[2], 'result:' .. ARGV[2], 'KEEPTTL')
    return 'deferred'
  end
  if state == 'sent' then
    redis.call('SET', KEYS[2], 'done:' .. ARGV[2], 'KEEPTTL')
    return 'emit'
  elseif state == 'inflight' or state == 'accepted' then
    redis.call('SET', KEYS[2], 'result:' .. ARGV[2], 'KEEPTTL')
    return 'deferred'
  end
  return state
elseif op == 'retry' then
  if state ~= 'inflight' then return state end
  local active_fence = tonumber(redis.call('HGET', KEYS[1], 'active_fence')) or 0
  local superseded = tonumber(ARGV[3]) < active_fence
  redis.call('SET', KEYS[2], superseded and SUPERSEDED or 'retry', 'KEEPTTL')
  local mine = redis.call('HGET', KEYS[1], 'delivered') == ARGV[2]
  if mine then redis.call('HDEL', KEYS[1], 'delivered') end
  local held = redis.call('HGET', KEYS[1], 'held')
  if held == ARGV[2] or (mine and not held) then
    -- the device holds what it held before this command's claim
    local before = redis.call('HGET', KEYS[1], 'held_before')
    if before then redis.call('HSET', KEYS[1], 'held', before) else redis.call('HDEL', KEYS[1], 'held') end
  end
  return superseded and 'superseded' or 'retry'
elseif op == 'finish' then
  redis.call('SET', KEYS[2], 'done:' .. ARGV[2], 'KEEPTTL')
  return 'done'
end
return redis.error_reply('unknown op ' .. op)
