-- restore_payment.lua: put back a payment the balance store lost (a Redis failover, a restarted
-- in-process sandbox), as the settlement store (the system of record) has it, so callbacks,
-- the resolution loop and refunds can act on it. Never overwrites a payment that is there.
--
-- KEYS: 1 ps:{T}  2 pd:{T}  3 o:{T}  4 rf:{T}  5 ux:{S}  6 hx:{S}  7 rx:{S}
-- ARGV: 1 payment id  2 status  3 document (JSON)  4 merchant order id
--       5 refund count  6 refunds reserved (pending + succeeded)  7 refunds succeeded
--       then, per pending refund, 4 values: refund id, number, amount, created (ms)
-- Returns {'1'} when restored, {'0'} when the payment was there.
-- Invariant: holds are not restored here (an account's holds come back with the account, in
-- rebuild_account.lua); the order id is taken only if no live payment holds it.

local pid = ARGV[1]
if redis.call('HEXISTS', KEYS[1], pid) == 1 then
  return {'0'}
end
redis.call('HSET', KEYS[1], pid, ARGV[2])
redis.call('HSET', KEYS[2], pid, ARGV[3])
-- Put back now: it stays a retention's time before leaving again.
index_payment(pid, server_now_ms())
if is_live(ARGV[2]) then
  local holder = redis.call('HGET', KEYS[3], ARGV[4])
  if not holder or not is_live(redis.call('HGET', KEYS[1], holder)) then
    redis.call('HSET', KEYS[3], ARGV[4], pid)
  end
end
if tonumber(ARGV[5]) > 0 then
  redis.call('HSET', KEYS[4], pid .. '#n', ARGV[5], pid .. '#r', ARGV[6], pid .. '#s', ARGV[7])
end
for i = 8, #ARGV, 4 do
  redis.call('HSET', KEYS[4], ARGV[i], cjson.encode({
    payment_id = pid, n = ARGV[i + 1], amount = ARGV[i + 2], status = 'pending',
    created_at_ms = ARGV[i + 3],
  }))
end
return {'1'}
