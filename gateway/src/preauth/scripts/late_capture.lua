-- late_capture.lua: a supplier says it executed a charge whose payment already ended (late
-- money, DESIGN.md §7): debit the account if it can still afford it, and put the capture's
-- settlement into the outbox. The payment's status is not changed (its order id may already
-- belong to a new payment).
--
-- KEYS: 1 a:{T}  2 h:{T}  3 ph:{T}  4 ps:{T}  5 u:{T}  6 lc:{T} ('<payment id>#<attempt>' ->
--       seq of its late capture: at most one per attempt)
--       then ux:{S} hx:{S} rx:{S} (the slot's indexes, last: see common.lua)
-- ARGV: 1 payment id  2 amount (minor units)  3 now (unix ms)  4 pending settlement record
--       (JSON)  5 its outbox id  6 lazy release limit  7 the attempt number
-- Returns {'done', seq} | {'insufficient', available} | {'not_found'} | {'pending'}
-- Invariant: never takes available below zero; at most one late capture per attempt (a repeat
-- answers 'done' with the first one's sequence and moves nothing).

local pid = ARGV[1]
local status = redis.call('HGET', KEYS[4], pid)
if not status then
  return {'not_found'}
end
if status == 'pending' then
  return {'pending'}
end
local marker = pid .. '#' .. ARGV[7]
local done = redis.call('HGET', KEYS[6], marker)
if done then
  return {'done', done}
end
release_expired(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[3], tonumber(ARGV[6]))
local acct = redis.call('HMGET', KEYS[1], 'bal', 'held', 'cred')
if not acct[1] then
  return {'not_found'}
end
local amount = tonumber(ARGV[2])
local available = tonumber(acct[1]) + tonumber(acct[3]) - tonumber(acct[2])
if available < amount then
  return {'insufficient', fmt(available)}
end
redis.call('HINCRBY', KEYS[1], 'bal', -amount)
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('HSET', KEYS[6], marker, fmt(seq))
record_unsettled(KEYS[5], ARGV[5], seq, '', ARGV[4], tonumber(ARGV[3]))
return {'done', fmt(seq)}
