-- abandon.lua: a payment whose intent could not be committed is undone, as if it never was:
-- its hold is released, it ends 'failed' (freeing its order id), its pending record and its
-- idempotency record are removed so the client may retry with the same key.
--
-- KEYS: 1 a:{T}  2 h:{T}  3 ph:{T}  4 ps:{T}  5 u:{T}  6 i:{T}:<idempotency key>
-- ARGV: 1 payment id
-- Returns {'done'} | {'not_pending', status}
-- Invariant: never touches a payment that moved money (only a pending one is undone).

local pid = ARGV[1]
local status = redis.call('HGET', KEYS[4], pid)
if status and status ~= 'pending' then
  return {'not_pending', status}
end
drop_hold(KEYS[1], KEYS[2], KEYS[3], pid)
if status then
  redis.call('HSET', KEYS[4], pid, 'failed')
end
redis.call('HDEL', KEYS[5], pid)
redis.call('DEL', KEYS[6])
return {'done'}
