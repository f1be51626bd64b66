-- Reserve budget for one run, atomically (SPEC §2).
-- KEYS[1] budget:{tenant}:balance_usd_micros
-- KEYS[2] reserve:{tenant}:{run}
-- KEYS[3] settle_receipt:{tenant}:{run}
-- KEYS[4] holds:{tenant}   (the set of the tenant's live holds, by run id)
-- ARGV[1] amount (micros)   ARGV[2] now (unix ms)   ARGV[3] run id
-- Every key shares the {tenant} hash tag, so a cluster runs this on one slot.
-- Returns {code, balance, amount}:
--   1 reserved (or already reserved: the same reservation, nothing moved twice)
--   0 insufficient budget      -2 already settled (a reservation never revives)
--  -3 no balance key: Redis lost the tenant's budget, rebuild it from the ledger
local amount = tonumber(ARGV[1])
if redis.call('EXISTS', KEYS[3]) == 1 then
  return {-2, 0, 0}
end
local existing = redis.call('HGET', KEYS[2], 'amount')
local balance = redis.call('GET', KEYS[1])
if existing then
  return {1, tonumber(balance or 0), tonumber(existing)}
end
if not balance then
  return {-3, 0, 0}
end
balance = tonumber(balance)
if balance < amount then
  return {0, balance, amount}
end
balance = redis.call('DECRBY', KEYS[1], amount)
redis.call('HSET', KEYS[2], 'amount', amount, 'reserved_at', ARGV[2])
redis.call('SADD', KEYS[4], ARGV[3])
return {1, balance, amount}
