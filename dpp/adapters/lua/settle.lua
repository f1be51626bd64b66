-- Settle a run's reservation: charge part of it, give the rest back (SPEC §2).
-- KEYS[1] budget:{tenant}:balance_usd_micros
-- KEYS[2] reserve:{tenant}:{run}
-- KEYS[3] settle_receipt:{tenant}:{run}
-- KEYS[4] holds:{tenant}
-- ARGV[1] charge wanted (micros)  ARGV[2] now (unix ms)  ARGV[3] receipt TTL (s)  ARGV[4] run id
-- ARGV[5] the ledger's reservation for the run (micros), used when Redis lost the hold
-- Idempotent: a second settle returns the first receipt and moves nothing.
-- Returns {code, charge, release, settled_at}:
--   1 settled now   2 replay of an earlier settlement
--  -1 settled now, but Redis had lost the hold (wiped): the receipt is written
--     all the same, so a rebuild before the ledger COMMIT counts the release as
--     available instead of resurrecting a hold nobody would settle again.
local receipt = redis.call('HMGET', KEYS[3], 'charge', 'release', 'settled_at')
if receipt[1] then
  return {2, tonumber(receipt[1]), tonumber(receipt[2]), tonumber(receipt[3])}
end
local code = 1
local amount = redis.call('HGET', KEYS[2], 'amount')
if not amount then
  code = -1
  amount = ARGV[5]
end
amount = tonumber(amount)
local charge = math.min(tonumber(ARGV[1]), amount)
local release = amount - charge
-- A missing balance key means Redis was wiped: the restore sets it from the
-- ledger (and this receipt), so creating it here from the release alone would
-- invent a wrong balance. A present balance was set by a restore that counted
-- this run as held (it restores every hold the ledger has), so the release is due.
if release > 0 and redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('INCRBY', KEYS[1], release)
end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[4], ARGV[4])
redis.call('HSET', KEYS[3], 'charge', charge, 'release', release, 'settled_at', ARGV[2])
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[3]))
return {code, charge, release, tonumber(ARGV[2])}
