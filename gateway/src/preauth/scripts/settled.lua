-- settled.lua: the settlement store committed movements: forget each one's pending record and
-- let its idempotency record replay. One call for a whole group commit.
--
-- KEYS: for mark n (1-based): 2n-1 u:{T}  2n i:{T}:<idempotency key>
-- ARGV: n id of mark n (payment or adjustment)
-- Returns how many pending records were there (the others were already settled).
-- Invariant: an idempotency record leaves 'F' only after the commit it waited for.
--
-- The keys of one call may carry several hash tags: fine on a single Redis; on a Redis
-- Cluster the caller sends one call per hash slot.

local removed = 0
for n = 1, #ARGV do
  removed = removed + redis.call('HDEL', KEYS[2 * n - 1], ARGV[n])
  release_idempotency(KEYS[2 * n])
end
return removed
