-- Credit a top-up that the ledger has already committed.
-- KEYS[1] budget:{tenant}:balance_usd_micros
-- ARGV[1] amount (micros)  ARGV[2] ledger available after the top-up (micros)
-- When the key is missing (new tenant, or Redis wiped) the ledger's figure is
-- the whole truth, so it is set rather than incremented.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.call('INCRBY', KEYS[1], ARGV[1])
end
redis.call('SET', KEYS[1], ARGV[2])
return tonumber(ARGV[2])
