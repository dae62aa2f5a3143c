-- adjust.lua: a manual credit or debit of an account, idempotent.
--
-- KEYS: 1 a:{T}  2 h:{T}  3 ph:{T}  4 ps:{T}  5 i:{T}:<idempotency key>  6 u:{T}  then ux:{S}
--       hx:{S} rx:{S} (the slot's indexes, last: see common.lua)
-- ARGV: 1 merchant  2 account  3 request hash  4 idempotency retention (s)
--       5 direction ('credit' | 'debit')  6 amount (minor units)  7 currency  8 now (unix ms)
--       9 lazy release limit  10 outcome to record ('A:<adjustment json>')
--       11 pending record (JSON)  12 adjustment id  13 the idempotency key itself
-- The idempotency record stays in flight ('F') until settled.lua: an adjustment is answered
-- only once its settlement is committed.
-- Returns {'replay', outcome} | {'conflict'} | {'in_flight'} | {'not_found'} | {'collision'}
--   | {'currency', cur} | {'range'} | {'insufficient', available, shortfall} | {'busy'}
--   | {'applied', cur, bal, held, cred, seq}
-- Invariant: a debit never takes available (bal + cred - held) below zero; bal + cred stays
-- within +-(2^53 - 1); seq += 1 per applied adjustment; one outcome per idempotency key.

local idem = check_idempotency(KEYS[5], ARGV[3])
if idem then
  return idem
end
local bad = check_account(KEYS[1], ARGV[1], ARGV[2], ARGV[7])
if bad then
  return bad
end
if fenced(KEYS[1], ARGV[8]) then
  return {'busy'}
end
release_expired(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[6], ARGV[8], tonumber(ARGV[9]))

local amount = tonumber(ARGV[6])
local acct = redis.call('HMGET', KEYS[1], 'bal', 'held', 'cred')
local bal, held, cred = tonumber(acct[1]), tonumber(acct[2]), tonumber(acct[3])
local delta = amount
if ARGV[5] == 'debit' then
  delta = -amount
  local available = bal + cred - held
  if available < amount then
    local shortfall = amount - available
    record_idempotency(KEYS[5], ARGV[3], 'D',
      'E:insufficient_funds:' .. fmt(available) .. ':' .. fmt(shortfall), ARGV[4])
    return {'insufficient', fmt(available), fmt(shortfall)}
  end
end
if bal + delta + cred > MAX_SAFE or bal + delta < -MAX_SAFE then
  return {'range'}
end
redis.call('HINCRBY', KEYS[1], 'bal', delta)
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
record_unsettled(KEYS[6], ARGV[12], seq, ARGV[13], ARGV[11], tonumber(ARGV[8]))
record_idempotency(KEYS[5], ARGV[3], 'F', ARGV[10], ARGV[4])
local reply = {'applied'}
local snap = snapshot(KEYS[1])
for i = 1, 5 do
  reply[#reply + 1] = snap[i]
end
return reply
