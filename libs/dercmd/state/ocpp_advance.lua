-- Set a command record's ``state`` to ARGV[2] only if it is ARGV[1]: an answer that comes
-- after the charge point's transaction message must not move the command back (see ocpp.py).
-- KEYS[1] the command record. -> 1 if it moved, else 0.
if redis.call('HGET', KEYS[1], 'state') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'state', ARGV[2])
  return 1
end
return 0
