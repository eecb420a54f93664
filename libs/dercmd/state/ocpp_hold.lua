-- Hold the link for this connection (refresh its expiry) unless another connection holds it
-- (see ocpp.py). KEYS[1] the link; ARGV[1] connection id, ARGV[2] gateway URL, ARGV[3] ttl s.
-- -> 1 if held, 0 if another connection holds it.
local conn = redis.call('HGET', KEYS[1], 'conn')
if conn and conn ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'url', ARGV[2], 'conn', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
