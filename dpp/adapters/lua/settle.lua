-- Settle a run's reservation: charge part of it, give the rest back (SPEC §2).
-- KEYS[1] budget:{tenant}:balance_usd_micros
-- KEYS[2] reserve:{tenant}:{run}
-- KEYS[3] settle_receipt:{tenant}:{run}
-- KEYS[4] holds:{tenant}
-- ARGV[1] charge wanted (micros)  ARGV[2] now (unix ms)  ARGV[3] receipt TTL (s)  ARGV[4] run id
-- Idempotent: a second settle returns the first receipt and moves nothing.
-- Returns {code, charge, release, settled_at}:
--   1 settled now   2 replay of an earlier settlement
--  -1 no reservation and no receipt: Redis lost it; the ledger stays the truth
local receipt = redis.call('HMGET', KEYS[3], 'charge', 'release', 'settled_at')
if receipt[1] then
  return {2, tonumber(receipt[1]), tonumber(receipt[2]), tonumber(receipt[3])}
end
local amount = redis.call('HGET', KEYS[2], 'amount')
if not amount then
  return {-1, 0, 0, 0}
end
amount = tonumber(amount)
local charge = math.min(tonumber(ARGV[1]), amount)
local release = amount - charge
-- A missing balance key means Redis was wiped: rebuild sets it from the ledger,
-- so creating it here from the release alone would invent a wrong balance.
if release > 0 and redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('INCRBY', KEYS[1], release)
end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[4], ARGV[4])
redis.call('HSET', KEYS[3], 'charge', charge, 'release', release, 'settled_at', ARGV[2])
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[3]))
return {1, charge, release, tonumber(ARGV[2])}
