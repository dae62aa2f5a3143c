-- restore_keys.lua: put back idempotency records the balance store lost, as the settlement
-- store keeps them (a rebuild: an empty or rolled-back Redis, a restarted sandbox), so a
-- retried request replays its first answer (a payment, an adjustment, or a refusal) instead of
-- being charged; and the order ids of the payments that ended live (succeeded, refunded), so
-- a new key for such an order id is refused here, as the store would refuse it at commit.
--
-- KEYS: for record n (1-based): 4n-3 i:{T}:<idempotency key>  4n-2 o:{T}  4n-1 ps:{T}
--       4n rx:{S} (the retention index of T's slot)
-- ARGV: for record n: 5n-4 request hash  5n-3 its outcome, encoded ('P:<payment id>',
--       'A:<adjustment>', 'E:insufficient_funds:<available>:<shortfall>', …)  5n-2 TTL (s)
--       5n-1 the merchant order id its payment holds ('' = none)  5n that payment's id
-- Returns how many idempotency records were put back.
-- Invariants: a record that is there (in flight, or newer) is never overwritten; an order id
-- already held by a live payment keeps its holder. A restored order id names its payment as
-- '!<payment id>' ("held, per the store"): authorize.lua refuses it as a duplicate; readers
-- by order id find no payment here and ask the store. The marker leaves after the retention
-- like a payment's state: it is indexed in rx:{S} as '!<payment id>:<order id>' (evict.lua).
--
-- The keys of one call may carry several hash tags: fine on a single Redis; on a Redis
-- Cluster the caller sends one call per hash slot.

local restored = 0
local now_ms
for n = 1, #KEYS / 4 do
  local key, orders, statuses, retention = KEYS[4 * n - 3], KEYS[4 * n - 2], KEYS[4 * n - 1],
    KEYS[4 * n]
  if redis.call('EXISTS', key) == 0 then
    redis.call('HSET', key, 'h', ARGV[5 * n - 4], 's', 'D', 'o', ARGV[5 * n - 3])
    redis.call('EXPIRE', key, ARGV[5 * n - 2])
    restored = restored + 1
  end
  local order = ARGV[5 * n - 1]
  if order ~= '' then
    local holder = redis.call('HGET', orders, order)
    local held = holder and (string.sub(holder, 1, 1) == '!'
      or is_live(redis.call('HGET', statuses, holder)))
    if not held then
      redis.call('HSET', orders, order, '!' .. ARGV[5 * n])
      now_ms = now_ms or server_now_ms()
      redis.call('ZADD', retention, now_ms, '!' .. ARGV[5 * n] .. ':' .. order)
    end
  end
end
return restored
