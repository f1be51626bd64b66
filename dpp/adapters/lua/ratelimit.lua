-- Fixed-window rate limit, INCR first (SPEC §4): the count is taken and the
-- decision made in one step, so N concurrent requests against a limit of L
-- admit exactly L of them.
-- KEYS[1] ratelimit:{tenant}:<name>:<window index>
-- ARGV[1] window length (s)
-- Returns the request's position in the window (1-based).
local n = redis.call('INCR', KEYS[1])
if n == 1 then
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]) + 1)
end
return n
