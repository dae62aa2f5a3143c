-- refund_reserve.lua: reserve (part of) a succeeded payment's amount for a refund, before the
-- channel is called (DESIGN.md §7), in one step with the idempotency record.
--
-- KEYS: 1 a:{T}  2 h:{T}  3 ph:{T}  4 ps:{T}  5 pd:{T}  6 u:{T}  7 i:{T}:<idempotency key>
--       8 rf:{T} (refunds: '<pid>#n' count, '<pid>#r' reserved (pending + succeeded),
--       '<pid>#s' succeeded, '<refund id>' its JSON)  9 ux:{S}  10 hx:{S}  11 rx:{S}
-- ARGV: 1 payment id  2 amount (minor units; '' = all that is left)  3 now (unix ms)
--       4 request hash  5 idempotency retention (s)  6 the idempotency key itself
--       7 hold expiry for a top-up refund (unix ms)  8 lazy release limit
--       9 the refund intent record (JSON with placeholders: the string "%ID%", and the numbers
--         4294967290 for the refund's number and 9007199254740990 for its amount)
-- Returns {'replay', outcome} | {'conflict'} | {'in_flight'} | {'not_found'}
--   | {'invalid_state', status} | {'exceeds', remaining}
--   | {'insufficient', available, shortfall}                (a top-up refund the account lacks)
--   | {'busy'}                                  (a top-up refund while its account is rebuilt)
--   | {'created', refund id, n, amount}
-- Numbers inside the refund's JSON are strings (cjson would round large numbers).
-- Invariants: reserved never exceeds the payment's amount; a top-up refund holds the amount on
-- the account (available never below zero); one refund per idempotency key.

local idem = check_idempotency(KEYS[7], ARGV[4])
if idem then
  return idem
end
local pid = ARGV[1]
local status = redis.call('HGET', KEYS[4], pid)
if not status then
  return {'not_found'}
end
if status ~= 'succeeded' and status ~= 'partially_refunded' then
  return {'invalid_state', status}
end
local doc = cjson.decode(redis.call('HGET', KEYS[5], pid))
local total = tonumber(doc.amount_minor)
local reserved = tonumber(redis.call('HGET', KEYS[8], pid .. '#r') or '0')
local remaining = total - reserved
local amount = remaining
if ARGV[2] ~= '' then
  amount = tonumber(ARGV[2])
end
if amount <= 0 or amount > remaining then
  return {'exceeds', fmt(remaining)}
end
local n = tonumber(redis.call('HGET', KEYS[8], pid .. '#n') or '0') + 1
local rid = 're_' .. string.sub(pid, 5) .. '_' .. fmt(n)
if doc.purpose == 'topup' then
  release_expired(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[6], ARGV[3], tonumber(ARGV[8]))
  local acct = redis.call('HMGET', KEYS[1], 'bal', 'held', 'cred')
  if not acct[1] then
    return {'not_found'}
  end
  if fenced(KEYS[1], ARGV[3]) then
    return {'busy'}
  end
  local available = tonumber(acct[1]) + tonumber(acct[3]) - tonumber(acct[2])
  if available < amount then
    record_idempotency(KEYS[7], ARGV[4], 'D',
      'E:insufficient_funds:' .. fmt(available) .. ':' .. fmt(amount - available), ARGV[5])
    return {'insufficient', fmt(available), fmt(amount - available)}
  end
  redis.call('HINCRBY', KEYS[1], 'held', amount)
  redis.call('ZADD', KEYS[2], tonumber(ARGV[7]), rid)
  redis.call('HSET', KEYS[3], rid, fmt(amount))
  index_hold(KEYS[2])
end
redis.call('HSET', KEYS[8], pid .. '#n', fmt(n))
redis.call('HINCRBY', KEYS[8], pid .. '#r', amount)
redis.call('HSET', KEYS[8], rid, cjson.encode({
  payment_id = pid, n = fmt(n), amount = fmt(amount), status = 'pending', created_at_ms = ARGV[3],
}))
local intent = string.gsub(ARGV[9], '%%ID%%', rid)
intent = string.gsub(intent, '4294967290', fmt(n))
intent = string.gsub(intent, '9007199254740990', fmt(amount))
record_unsettled(KEYS[6], rid, 0, ARGV[6], intent, tonumber(ARGV[3]))
record_idempotency(KEYS[7], ARGV[4], 'F', 'R:' .. rid, ARGV[5])
return {'created', rid, fmt(n), fmt(amount)}
