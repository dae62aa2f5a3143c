-- settled.lua: the settlement store committed a movement: forget its pending record and let
-- its idempotency record replay.
--
-- KEYS: 1 u:{T}  2 i:{T}:<idempotency key>
-- ARGV: 1 id (payment or adjustment)
-- Returns 1 when the pending record was there, 0 when it was already settled.
-- Invariant: an idempotency record leaves 'F' only after the commit it waited for.

local removed = redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('HGET', KEYS[2], 's') == 'F' then
  redis.call('HSET', KEYS[2], 's', 'D')
end
return removed
