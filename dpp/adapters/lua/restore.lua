-- Set a tenant's Redis mirror from the ledger (`dpp budget rebuild`), in one step.
-- KEYS[1] budget:{tenant}:balance_usd_micros   KEYS[2] holds:{tenant}
-- KEYS[1+2i] reserve:{tenant}:{run_i}   KEYS[2+2i] settle_receipt:{tenant}:{run_i}
--   for every run the ledger still holds money for (money_state RESERVED)
-- ARGV[1] ledger available (micros)  ARGV[2] now (unix ms)
-- ARGV[1+2i] run_i id   ARGV[2+2i] run_i reserved amount (micros)
-- A run the ledger holds may already be settled in Redis (finalize settles Redis
-- first, then commits the ledger): its hold is gone and its release is back in the
-- balance. Putting the hold back would resurrect money Redis already gave, and the
-- later settle (a receipt replay) would never give it again. So such a run keeps
-- no hold, and its release counts as available, as it will in the ledger.
-- Returns the balance set.
local available = tonumber(ARGV[1])
redis.call('DEL', KEYS[2])
for i = 1, (#KEYS - 2) / 2 do
  local reserve, receipt = KEYS[1 + 2 * i], KEYS[2 + 2 * i]
  local released = redis.call('HGET', receipt, 'release')
  if released then
    available = available + tonumber(released)
    redis.call('DEL', reserve)
  else
    redis.call('HSET', reserve, 'amount', ARGV[2 + 2 * i], 'reserved_at', ARGV[2])
    redis.call('SADD', KEYS[2], ARGV[1 + 2 * i])
  end
end
redis.call('SET', KEYS[1], available)
return available
