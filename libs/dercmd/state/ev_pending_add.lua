-- Wait for these actions (see ev_pending.py).
-- KEYS[1] the poll set, KEYS[2] the give-up hash; ARGV[1] first poll after ms, ARGV[2] give up
-- after ms, then members. Times are Redis's (TIME): hosts may disagree.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 3, #ARGV do
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[i])
  redis.call('HSET', KEYS[2], ARGV[i], now + tonumber(ARGV[2]))
end
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[2], 2 * tonumber(ARGV[2]))
return #ARGV - 2
