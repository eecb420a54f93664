-- One backend's token bucket and shared pause (see rates.py).
-- KEYS[1] the backend's bucket. ARGV[1] "take" | "pause", ARGV[2] rate per s, ARGV[3] burst,
-- ARGV[4] (pause) ms. -> ms to wait before calling (0: call now).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local paused = tonumber(redis.call('HGET', KEYS[1], 'paused_until')) or 0
if ARGV[1] == 'pause' then
  local untill = math.max(paused, now + tonumber(ARGV[4]))
  redis.call('HSET', KEYS[1], 'paused_until', untill)
  redis.call('PEXPIRE', KEYS[1], math.max(60000, untill - now + 1000))
  return 0
end
if now < paused then return paused - now end
local rate = tonumber(ARGV[2])
if rate <= 0 then return 0 end
local burst = tonumber(ARGV[3])
local tokens = tonumber(redis.call('HGET', KEYS[1], 'tokens')) or burst
local at = tonumber(redis.call('HGET', KEYS[1], 'at')) or now
tokens = math.min(burst, tokens + (now - at) * rate / 1000)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = math.ceil((1 - tokens) * 1000 / rate) end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', now)
redis.call('PEXPIRE', KEYS[1], 60000)
return wait
