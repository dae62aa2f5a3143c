-- authorize.lua: create a payment with its pre-authorization, in one round trip.
--
-- KEYS: 1 a:{T}  2 h:{T}  3 ph:{T}  4 ps:{T}  5 pd:{T}  6 o:{T}  7 i:{T}:<idempotency key>
--       8 u:{T}
-- ARGV: 1 merchant  2 account ('' for a payment without account)  3 request hash
--       4 idempotency retention (s)  5 payment id  6 amount (minor units)  7 currency
--       8 hold expiry (unix ms; '0' = no hold)  9 capture now ('1' | '0')  10 now (unix ms)
--       11 lazy release limit  12 merchant order id  13 payment document (JSON)
--       14 pending record (JSON; '' = none)  15 the idempotency key itself
-- With a pending record the idempotency record stays in flight ('F') and the record goes to
-- u:{T} until settled.lua (after the settlement store committed it) or abandon.lua.
-- Returns one of:
--   {'replay', outcome} {'conflict'} {'in_flight'} {'not_found'} {'collision'}
--   {'currency', account currency} {'duplicate', live payment id}
--   {'insufficient', available, shortfall}           (recorded under the idempotency key)
--   {'created', status, cur, bal, held, cred, seq}   (account fields empty without account)
-- Invariant: the hold is placed only if balance + cred - held >= amount, atomically with the
-- check; at most one live payment per order id; exactly one outcome per idempotency key.

local idem = check_idempotency(KEYS[7], ARGV[3])
if idem then
  return idem
end

local has_account = ARGV[2] ~= ''
if has_account then
  local bad = check_account(KEYS[1], ARGV[1], ARGV[2], ARGV[7])
  if bad then
    return bad
  end
end

if has_account then
  -- First, so that an order id whose hold just expired is free again.
  release_expired(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[8], ARGV[10], tonumber(ARGV[11]))
end

local existing = redis.call('HGET', KEYS[6], ARGV[12])
if existing and is_live(redis.call('HGET', KEYS[4], existing)) then
  return {'duplicate', existing}
end

local pid = ARGV[5]
local amount = tonumber(ARGV[6])
local hold_expiry = tonumber(ARGV[8])
local status = 'pending'

-- A top-up has an account but takes nothing from it: no check, no hold.
if has_account and (ARGV[9] == '1' or hold_expiry > 0) then
  local acct = redis.call('HMGET', KEYS[1], 'bal', 'held', 'cred')
  local available = tonumber(acct[1]) + tonumber(acct[3]) - tonumber(acct[2])
  if available < amount then
    local shortfall = amount - available
    record_idempotency(KEYS[7], ARGV[3], 'D',
      'E:insufficient_funds:' .. fmt(available) .. ':' .. fmt(shortfall), ARGV[4])
    return {'insufficient', fmt(available), fmt(shortfall)}
  end
  if ARGV[9] == '1' then
    redis.call('HINCRBY', KEYS[1], 'bal', -amount)
    redis.call('HINCRBY', KEYS[1], 'seq', 1)
    status = 'succeeded'
  elseif hold_expiry > 0 then
    redis.call('HINCRBY', KEYS[1], 'held', amount)
    redis.call('ZADD', KEYS[2], hold_expiry, pid)
    redis.call('HSET', KEYS[3], pid, ARGV[6])
  end
end

redis.call('HSET', KEYS[4], pid, status)
redis.call('HSET', KEYS[5], pid, ARGV[13])
redis.call('HSET', KEYS[6], ARGV[12], pid)
if ARGV[14] ~= '' then
  local seq = 0
  if has_account then
    seq = tonumber(redis.call('HGET', KEYS[1], 'seq'))
  end
  record_unsettled(KEYS[8], pid, seq, ARGV[15], ARGV[14], tonumber(ARGV[10]))
  record_idempotency(KEYS[7], ARGV[3], 'F', 'P:' .. pid, ARGV[4])
else
  record_idempotency(KEYS[7], ARGV[3], 'D', 'P:' .. pid, ARGV[4])
end

local reply = {'created', status}
if has_account then
  local snap = snapshot(KEYS[1])
  for i = 1, 5 do
    reply[#reply + 1] = snap[i]
  end
end
return reply
