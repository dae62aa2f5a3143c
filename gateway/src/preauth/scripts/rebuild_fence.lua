-- rebuild_fence.lua: before a rebuild reads the settlement store, fence the account off new
-- movements and read its sequence and held amount (the guard rebuild_account.lua compares).
--
-- KEYS: 1 a:{T}
-- ARGV: 1 the fence's end (unix ms): authorize, adjust and a top-up refund's reserve answer
--         'busy' until then, unless rebuild_account.lua lifts it first
-- Returns {seq, held} | {} when there is no such account (nothing fenced).
-- Invariant: movements already started go on (their callbacks, settles and releases), so the
-- movements on their way to the store drain and the rebuild can load; a fence lapses by
-- itself, so a rebuild that gave up blocks nothing for long.

local state = redis.call('HMGET', KEYS[1], 'seq', 'held')
if not state[1] then
  return {}
end
redis.call('HSET', KEYS[1], 'rb', ARGV[1])
return {state[1], state[2] or '0'}
