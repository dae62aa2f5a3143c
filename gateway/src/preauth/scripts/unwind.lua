-- unwind.lua: undo a payment (or an admin adjustment) the settlement store refused to create
-- (the store already holds its idempotency key, or a live payment under its order id: the
-- store decides). Whatever authorize.lua (adjust.lua) did for it is reversed, and its
-- idempotency key answers as the store says.
--
-- KEYS: 1 a:{T}  2 h:{T}  3 ph:{T}  4 ps:{T}  5 pd:{T}  6 o:{T}  7 u:{T}
--       8 i:{T}:<idempotency key>
-- ARGV: 1 payment (adjustment) id  2 merchant order id ('' for an adjustment)  3 what its
--       creation took from the balance, given back (minor units; '0' for a payment that only
--       held or took nothing; negative for an adjustment's credit, taken back)  4 the key's request hash ('' = remove
--       the key's record)  5 the key's outcome, encoded ('P:<payment id>', …)  6 its TTL (s)
-- Returns 1 when undone, 0 when the payment's pending record was gone (nothing changed).
-- Invariant: a payment is unwound at most once, and only while the settlement store has
-- nothing of it (its pending record in u:{T} is still there): a capture is given back at
-- most once, and never one that was committed.

local pid = ARGV[1]
if redis.call('HDEL', KEYS[7], pid) == 0 then
  return 0
end
drop_hold(KEYS[1], KEYS[2], KEYS[3], pid)
local captured = tonumber(ARGV[3])
if captured ~= 0 then
  redis.call('HINCRBY', KEYS[1], 'bal', captured)
end
redis.call('HDEL', KEYS[4], pid)
redis.call('HDEL', KEYS[5], pid)
if redis.call('HGET', KEYS[6], ARGV[2]) == pid then
  redis.call('HDEL', KEYS[6], ARGV[2])
end
if ARGV[4] == '' then
  redis.call('DEL', KEYS[8])
else
  redis.call('DEL', KEYS[8])
  redis.call('HSET', KEYS[8], 'h', ARGV[4], 's', 'D', 'o', ARGV[5])
  redis.call('EXPIRE', KEYS[8], ARGV[6])
end
return 1
