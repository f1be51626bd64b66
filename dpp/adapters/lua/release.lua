-- Give a whole reservation back when no run was ever recorded for it
-- (the run row insert failed, or another request won the idempotency key).
-- KEYS[1] budget:{tenant}:balance_usd_micros
-- KEYS[2] reserve:{tenant}:{run}
-- KEYS[3] holds:{tenant}
-- ARGV[1] run id
-- Returns the amount released (0 when there was nothing to release).
local amount = redis.call('HGET', KEYS[2], 'amount')
if not amount then
  return 0
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('INCRBY', KEYS[1], amount)
end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
return tonumber(amount)
