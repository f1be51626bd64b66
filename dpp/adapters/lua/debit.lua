-- Take a committed negative adjustment out of the mirror (`dpp budget adjust`).
-- KEYS[1] budget:{tenant}:balance_usd_micros
-- ARGV[1] amount (micros, positive)
-- Returns {1, new balance}, or {0, 0} when the key is missing (a new tenant, or
-- Redis wiped): then nothing is written, and the next hold or the audit sweep
-- rebuilds the whole mirror from the ledger, which already has the adjustment.
-- The balance may go below zero for an instant (a hold Redis took just before,
-- whose ledger record the adjustment then refuses, is about to be given back);
-- reserve.lua refuses every hold while it is.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {1, redis.call('DECRBY', KEYS[1], ARGV[1])}
end
return {0, 0}
