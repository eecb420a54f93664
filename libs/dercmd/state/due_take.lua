-- Lease the due-index entries of one bucket that have come due (see due.py).
-- KEYS[1] a bucket; ARGV[1] now ms or "" (Redis's clock); ARGV[2] most entries; ARGV[3] lease ms;
-- ARGV[4] lead ms (entries due up to this far ahead count as due).
-- Returns [member, score, member, score, ...] of the entries due, now leased.
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now + tonumber(ARGV[4]), 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[2]))
for i = 1, #due, 2 do
  redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[3]), due[i])
end
return due
