-- restore_keys.lua: put back idempotency records the balance store lost, as the settlement
-- store keeps them (a rebuild: an empty or rolled-back Redis, a restarted sandbox), so a
-- retried request replays its first answer (a payment, or a refusal) instead of being charged.
--
-- KEYS: n  i:{T}:<idempotency key> of record n
-- ARGV: for record n (1-based): 3n-2 request hash  3n-1 its outcome, encoded ('P:<payment
--       id>', 'E:insufficient_funds:<available>:<shortfall>', …)  3n TTL (s)
-- Returns how many records were put back.
-- Invariant: a record that is there (in flight, or newer) is never overwritten.
--
-- The keys of one call may carry several hash tags: fine on a single Redis; on a Redis
-- Cluster the caller sends one call per hash slot.

local restored = 0
for n = 1, #KEYS do
  if redis.call('EXISTS', KEYS[n]) == 0 then
    redis.call('HSET', KEYS[n], 'h', ARGV[3 * n - 2], 's', 'D', 'o', ARGV[3 * n - 1])
    redis.call('EXPIRE', KEYS[n], ARGV[3 * n])
    restored = restored + 1
  end
end
return restored
