-- Let go of the link if this connection still holds it (see ocpp.py).
-- KEYS[1] the link; ARGV[1] connection id. -> 1 if removed, else 0.
if redis.call('HGET', KEYS[1], 'conn') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
