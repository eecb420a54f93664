-- A command's transaction message came: it succeeded (see ocpp.py).
-- KEYS[1] the command record; ARGV[1] the transaction id. -> {token, resultUrl}, or nil
-- when there is no record.
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HSET', KEYS[1], 'state', 'succeeded', 'txId', ARGV[1])
return {redis.call('HGET', KEYS[1], 'token'), redis.call('HGET', KEYS[1], 'resultUrl')}
