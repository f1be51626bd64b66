-- Set a tenant's Redis mirror from the ledger (`dpp budget rebuild`), in one step.
-- The caller holds the tenant's fence (PostgreSQL advisory lock) from its ledger
-- read to this write, and every submission holds it from its hold to its ledger
-- commit: no hold is made while this runs, and a hold the ledger does not show is
-- an orphan of a submission that died.
-- KEYS[1] budget:{tenant}:balance_usd_micros   KEYS[2] holds:{tenant}
-- KEYS[1+2i] reserve:{tenant}:{run_i}   KEYS[2+2i] settle_receipt:{tenant}:{run_i}
--   for i = 1..ARGV[3]: every run the ledger still holds money for
-- KEYS[3+2n..] reserve:{tenant}:{x} of the holds set's members the ledger does not know
-- ARGV[1] ledger available (micros)  ARGV[2] now (unix ms)  ARGV[3] n
-- ARGV[2+2i] run_i id   ARGV[3+2i] run_i reserved amount (micros)
-- ARGV[4+2n..] the orphans' run ids, in the order of their KEYS
-- A run the ledger holds may already be settled in Redis (finalize settles Redis
-- first, then commits the ledger): its receipt says so, whether its hold was found
-- or lost (settle.lua always writes one). Putting the hold back would resurrect
-- money Redis already gave, so such a run keeps no hold and its release counts as
-- available, as it will in the ledger.
-- Returns the balance set.
local available = tonumber(ARGV[1])
local n = tonumber(ARGV[3])
for j = 3 + 2 * n, #KEYS do
  redis.call('DEL', KEYS[j])
  redis.call('SREM', KEYS[2], ARGV[4 + 2 * n + (j - 3 - 2 * n)])
end
for i = 1, n do
  local reserve, receipt = KEYS[1 + 2 * i], KEYS[2 + 2 * i]
  local run_id, amount = ARGV[2 + 2 * i], ARGV[3 + 2 * i]
  local released = redis.call('HGET', receipt, 'release')
  if released then
    available = available + tonumber(released)
    redis.call('DEL', reserve)
    redis.call('SREM', KEYS[2], run_id)
  else
    redis.call('HSET', reserve, 'amount', amount)
    redis.call('HSETNX', reserve, 'reserved_at', ARGV[2])
    redis.call('SADD', KEYS[2], run_id)
  end
end
redis.call('SET', KEYS[1], available)
return available
