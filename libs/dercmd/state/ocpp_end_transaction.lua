-- The transaction ended: forget it if it is still the running one (see ocpp.py).
-- KEYS[1] the running transaction; ARGV[1] its id. -> 1 if removed, else 0.
if redis.call('HGET', KEYS[1], 'id') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
