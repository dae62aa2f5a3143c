-- release.lua: end a pending payment without capture, releasing its hold if it has one.
--
-- KEYS: 1 a:{T}  2 h:{T}  3 ph:{T}  4 ps:{T}  5 u:{T}  [6 i:{T}:<idempotency key>, with ARGV[4]]
--       then ux:{S} hx:{S} rx:{S} (the slot's indexes, last: see common.lua)
-- ARGV: 1 payment id  2 final status ('failed' | 'canceled' | 'expired')  3 now (unix ms)
--       [4 the idempotency record's new outcome, e.g. 'E:no_channel_available']
-- The final status also goes to u:{T}, for the settlement store. With KEYS[6] and ARGV[4], the
-- idempotency record (if it still exists) answers that outcome from now on.
-- Returns {'done', status} | {'not_pending', status} | {'not_found'}
-- Invariant: a hold is released at most once and never after a capture; held -= hold.
-- The order id is freed implicitly: o:{T} entries of non-live payments are ignored.

local pid = ARGV[1]
local status = redis.call('HGET', KEYS[4], pid)
if not status then
  return {'not_found'}
end
if status ~= 'pending' then
  return {'not_pending', status}
end
drop_hold(KEYS[1], KEYS[2], KEYS[3], pid)
redis.call('HSET', KEYS[4], pid, ARGV[2])
record_final_status(KEYS[5], pid, ARGV[2], tonumber(ARGV[3]))
if KEYS[6] and ARGV[4] and redis.call('EXISTS', KEYS[6]) == 1 then
  redis.call('HSET', KEYS[6], 'o', ARGV[4])
end
return {'done', ARGV[2]}
