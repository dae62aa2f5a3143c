-- authorize.lua: create a payment with its pre-authorization, in one round trip.
--
-- KEYS: 1 a:{T}  2 h:{T}  3 ph:{T}  4 ps:{T}  5 pd:{T}  6 o:{T}  7 i:{T}:<idempotency key>
--       8 u:{T}  9 ux:{S}  10 hx:{S}  11 rx:{S}  (the slot's indexes, see common.lua)
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
--   {'busy'}                                         (the account is being rebuilt: retry)
--   {'insufficient', available, shortfall}           (recorded under the idempotency key)
--   {'created', status, cur, bal, held, cred, seq}   (account fields empty without account)
-- Invariant: the hold is placed only if balance + cred - held >= amount, atomically with the
-- check; at most one live payment per order id; exactly one outcome per idempotency key.

local idem = check_idempotency(KEYS[7], ARGV[3])
if idem then
  return idem
end

local has_account = ARGV[2] ~= ''
-- The account, read once: {m, a, cur, bal, held, cred, seq, rb} (the fields this script needs;
-- it writes back what it changes and answers from these values).
local acct
if has_account then
  acct = redis.call('HMGET', KEYS[1], 'm', 'a', 'cur', 'bal', 'held', 'cred', 'seq', 'rb')
  local bad = account_mismatch(acct, ARGV[1], ARGV[2], ARGV[7])
  if bad then
    return bad
  end
  if fence_holds(acct[8], ARGV[10]) then
    return {'busy'}
  end
  -- First, so that an order id whose hold just expired is free again. An account holding
  -- nothing has no hold to release (held == the sum of its holds, each > 0): no scan.
  if tonumber(acct[5] or '0') > 0 then
    local released = release_expired(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[8], ARGV[10],
      tonumber(ARGV[11]))
    if released > 0 then
      acct[5] = redis.call('HGET', KEYS[1], 'held')
    end
  end
end

local existing = redis.call('HGET', KEYS[6], ARGV[12])
if existing and string.sub(existing, 1, 1) == '!' then
  -- Put back by a rebuild: held by a payment that ended live (restore_keys.lua).
  return {'duplicate', string.sub(existing, 2)}
end
if existing and is_live(redis.call('HGET', KEYS[4], existing)) then
  return {'duplicate', existing}
end

local pid = ARGV[5]
local amount = tonumber(ARGV[6])
local hold_expiry = tonumber(ARGV[8])
local status = 'pending'

-- A top-up has an account but takes nothing from it: no check, no hold.
if has_account and (ARGV[9] == '1' or hold_expiry > 0) then
  local bal, held, cred = tonumber(acct[4]), tonumber(acct[5]), tonumber(acct[6])
  local available = bal + cred - held
  if available < amount then
    local shortfall = amount - available
    record_idempotency(KEYS[7], ARGV[3], 'D',
      'E:insufficient_funds:' .. fmt(available) .. ':' .. fmt(shortfall), ARGV[4])
    return {'insufficient', fmt(available), fmt(shortfall)}
  end
  if ARGV[9] == '1' then
    acct[4] = fmt(bal - amount)
    acct[7] = fmt(tonumber(acct[7]) + 1)
    redis.call('HSET', KEYS[1], 'bal', acct[4], 'seq', acct[7])
    status = 'succeeded'
  elseif hold_expiry > 0 then
    acct[5] = fmt(held + amount)
    redis.call('HSET', KEYS[1], 'held', acct[5])
    redis.call('ZADD', KEYS[2], hold_expiry, pid)
    redis.call('HSET', KEYS[3], pid, ARGV[6])
    index_hold(KEYS[2])
  end
end

redis.call('HSET', KEYS[4], pid, status)
redis.call('HSET', KEYS[5], pid, ARGV[13])
redis.call('HSET', KEYS[6], ARGV[12], pid)
index_payment(pid, ARGV[10])
if ARGV[14] ~= '' then
  local seq = 0
  if has_account then
    seq = tonumber(acct[7])
  end
  record_unsettled(KEYS[8], pid, seq, ARGV[15], ARGV[14], tonumber(ARGV[10]))
  record_idempotency(KEYS[7], ARGV[3], 'F', 'P:' .. pid, ARGV[4])
else
  record_idempotency(KEYS[7], ARGV[3], 'D', 'P:' .. pid, ARGV[4])
end

local reply = {'created', status}
if has_account then
  for i = 3, 7 do
    reply[#reply + 1] = acct[i]
  end
end
return reply
