-- refund_unwind.lua: undo a refund the settlement store refused (its cap, or another refund
-- under its number: the balance store had lost the payment's refunds), and set the payment's
-- refund state to the store's, so the next reservation counts what was really refunded.
--
-- KEYS: 1 a:{T}  2 h:{T}  3 ph:{T}  4 u:{T}  5 rf:{T}  6 i:{T}:<idempotency key>
-- ARGV: 1 refund id  2 payment id  3 the store's highest refund number  4 its pending and
--       succeeded total  5 its succeeded total
-- Returns 1 when undone, 0 when the refund's pending record was gone (nothing changed).
-- Invariant: only a refund the settlement store never recorded is undone, at most once (its
-- intent is still in u:{T}); a top-up refund's hold goes with it.

local rid = ARGV[1]
if redis.call('HDEL', KEYS[4], rid) == 0 then
  return 0
end
drop_hold(KEYS[1], KEYS[2], KEYS[3], rid)
redis.call('HDEL', KEYS[5], rid)
local pid = ARGV[2]
redis.call('HSET', KEYS[5], pid .. '#n', ARGV[3], pid .. '#r', ARGV[4], pid .. '#s', ARGV[5])
redis.call('DEL', KEYS[6])
return 1
