-- Lease the actions due for a poll; drop those past their give-up time (see ev_pending.py).
-- KEYS[1] the poll set, KEYS[2] the give-up hash; ARGV[1] most members, ARGV[2] lease ms.
-- Returns the members leased.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local taken = {}
for _, member in ipairs(due) do
  local give_up = tonumber(redis.call('HGET', KEYS[2], member))
  if give_up == nil or give_up <= now then
    redis.call('ZREM', KEYS[1], member)
    redis.call('HDEL', KEYS[2], member)
  else
    redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), member)
    taken[#taken + 1] = member
  end
end
return taken
