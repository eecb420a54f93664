-- A POST's idempotency record (see idempotency.py). KEYS[1] the record (a hash).
-- ARGV[1] the op, ARGV[2] the request's fingerprint, ARGV[3] the attempt's owner id.
-- "begin"   ARGV[4] lease ms -> {"new"} (recorded as in progress, owned by ARGV[3]),
--           {"mismatch"} (the key holds another request), {"in_progress"},
--           or {"done", status, body, headers}: the answer to replay.
-- "finish"  ARGV[4] ttl ms, ARGV[5] status, ARGV[6] body, ARGV[7] headers (JSON) -> 1, or 0
--           when the record is no longer this attempt's (its lease ran out).
-- "release" -> 1 when this attempt's record was removed (it answered an error: nothing kept).
local op = ARGV[1]
if op == 'begin' then
  local rec = redis.call('HMGET', KEYS[1], 'fp', 'status', 'body', 'headers')
  if not rec[1] then
    redis.call('HSET', KEYS[1], 'fp', ARGV[2], 'owner', ARGV[3])
    redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]))
    return {'new'}
  end
  if rec[1] ~= ARGV[2] then return {'mismatch'} end
  if not rec[2] then return {'in_progress'} end
  return {'done', rec[2], rec[3], rec[4] or '{}'}
end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[3] or redis.call('HEXISTS', KEYS[1], 'status') == 1 then
  return 0
end
if op == 'finish' then
  redis.call('HSET', KEYS[1], 'status', ARGV[5], 'body', ARGV[6], 'headers', ARGV[7])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]))
  return 1
end
if op == 'release' then
  redis.call('DEL', KEYS[1])
  return 1
end
return redis.error_reply('unknown op ' .. tostring(op))
