-- refund_finish.lua: a refund's outcome at the channel, once.
--
-- KEYS: 1 a:{T}  2 h:{T}  3 ph:{T}  4 ps:{T}  5 pd:{T}  6 u:{T}  7 rf:{T}  then ux:{S} hx:{S}
--       rx:{S} (the slot's indexes, last: see common.lua)
-- ARGV: 1 refund id  2 result ('succeeded' | 'failed')  3 now (unix ms)
--       4 the pending record (JSON: the settlement when succeeded — its payment row's one
--         member "status":"partially_refunded" is replaced with the status reached, and
--         18446744073709551608 with the account's sequence —, the refund's status when failed)
-- Returns {'done', seq, payment status} | {'already', refund status} | {'not_found'}
-- Invariants: a refund ends once. Succeeded: the payment's refunded total grows (its status
-- becomes 'partially_refunded' or 'refunded'); a top-up refund captures its hold (balance -=
-- amount), a balance or supplier charge's refund credits the account back; seq += 1 when a
-- balance moves.
-- Failed: the reservation (and a top-up refund's hold) is released.

local rid = ARGV[1]
local text = redis.call('HGET', KEYS[7], rid)
if not text then
  return {'not_found'}
end
local rec = cjson.decode(text)
if rec.status ~= 'pending' then
  return {'already', rec.status}
end
local pid = rec.payment_id
local amount = tonumber(rec.amount)
local doc = cjson.decode(redis.call('HGET', KEYS[5], pid))
local seq = 0
drop_hold(KEYS[1], KEYS[2], KEYS[3], rid)
if ARGV[2] == 'failed' then
  redis.call('HINCRBY', KEYS[7], pid .. '#r', -amount)
else
  if doc.purpose == 'topup' then
    redis.call('HINCRBY', KEYS[1], 'bal', -amount)
    seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
  elseif doc.method == 'supplier' or doc.method == 'balance' then
    redis.call('HINCRBY', KEYS[1], 'bal', amount)
    seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
  end
  local refunded = redis.call('HINCRBY', KEYS[7], pid .. '#s', amount)
  if refunded >= tonumber(doc.amount_minor) then
    redis.call('HSET', KEYS[4], pid, 'refunded')
  else
    redis.call('HSET', KEYS[4], pid, 'partially_refunded')
  end
end
local record = ARGV[4]
if ARGV[2] == 'succeeded' then
  record = string.gsub(record, '"status":"partially_refunded"',
    '"status":"' .. redis.call('HGET', KEYS[4], pid) .. '"', 1)
  record = string.gsub(record, '18446744073709551608', fmt(seq))
end
rec.status = ARGV[2]
rec.updated_at_ms = ARGV[3]
redis.call('HSET', KEYS[7], rid, cjson.encode(rec))
record_unsettled(KEYS[6], rid .. '#f', seq, '', record, tonumber(ARGV[3]))
return {'done', fmt(seq), redis.call('HGET', KEYS[4], pid)}
