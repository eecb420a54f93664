-- One command's delivery state, so that a device receives each command at most once and
-- the status topic says Sent before the result, whichever of the backend's answer and its
-- asynchronous callback arrives first.
--
-- KEYS[1] the entity's slots hash (for its fence), KEYS[2] the command's delivery key.
-- ARGV[1] the operation:
--   claim   ARGV[2]=order fence, ARGV[3]=ttl s  -> "stale" | "claimed" | the existing state
--   sent    (Sent is on the topic)              -> "sent" | the result that came first
--   result  ARGV[2]=outcome                     -> "emit" (Sent is out: publish the result)
--                                                | "deferred" (the sender will publish it)
--                                                | the existing state
--   finish  ARGV[2]=outcome                     -> "done"
-- States: inflight -> sent -> done:<outcome>, or inflight -> result:<outcome> -> done:<outcome>.
local op = ARGV[1]
if op == 'claim' then
  local fence = tonumber(redis.call('HGET', KEYS[1], 'fence')) or 0
  if tonumber(ARGV[2]) < fence then return 'stale' end
  if redis.call('SET', KEYS[2], 'inflight', 'NX', 'EX', tonumber(ARGV[3])) then return 'claimed' end
  return redis.call('GET', KEYS[2])
end
local state = redis.call('GET', KEYS[2])
if not state then return 'missing' end
if op == 'sent' then
  if state == 'inflight' then
    redis.call('SET', KEYS[2], 'sent', 'KEEPTTL')
    return 'sent'
  end
  return state
elseif op == 'result' then
  if state == 'sent' then
    redis.call('SET', KEYS[2], 'done:' .. ARGV[2], 'KEEPTTL')
    return 'emit'
  elseif state == 'inflight' then
    redis.call('SET', KEYS[2], 'result:' .. ARGV[2], 'KEEPTTL')
    return 'deferred'
  end
  return state
elseif op == 'finish' then
  redis.call('SET', KEYS[2], 'done:' .. ARGV[2], 'KEEPTTL')
  return 'done'
end
return redis.error_reply('unknown op ' .. op)
