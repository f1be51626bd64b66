-- Credit a top-up that the ledger has already committed.
-- KEYS[1] budget:{tenant}:balance_usd_micros
-- ARGV[1] amount (micros)
-- Returns the new balance, or -1 when the key is missing (a new tenant, or Redis
-- wiped): the caller rebuilds the whole mirror from the ledger then, live holds
-- included. Setting only the balance here left the holds out, and their settles
-- could not give their releases back.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.call('INCRBY', KEYS[1], ARGV[1])
end
return -1
