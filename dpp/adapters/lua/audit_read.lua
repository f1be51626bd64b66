-- What the audit needs of one tenant's mirror, read at one instant.
-- KEYS[1] budget:{tenant}:balance_usd_micros   KEYS[2] holds:{tenant}
-- KEYS[1+2i] reserve:{tenant}:{run_i}   KEYS[2+2i] settle_receipt:{tenant}:{run_i}
--   for every candidate run (the holds set's members and the runs the ledger holds)
-- Returns {balance or -1, #members, member..., then per candidate i:
--          hold amount or -1, hold reserved_at or -1, receipt release or -1}.
local out = {tonumber(redis.call('GET', KEYS[1]) or -1)}
local members = redis.call('SMEMBERS', KEYS[2])
out[#out + 1] = #members
for _, m in ipairs(members) do out[#out + 1] = m end
for i = 1, (#KEYS - 2) / 2 do
  local hold = redis.call('HMGET', KEYS[1 + 2 * i], 'amount', 'reserved_at')
  out[#out + 1] = tonumber(hold[1] or -1)
  out[#out + 1] = tonumber(hold[2] or -1)
  out[#out + 1] = tonumber(redis.call('HGET', KEYS[2 + 2 * i], 'release') or -1)
end
return out
