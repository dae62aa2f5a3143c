-- upsert_account.lua: create an account (balance 0) or update its credit limit.
--
-- KEYS: 1 a:{T}  2 h:{T}  3 ph:{T}  4 ps:{T}  5 u:{T}  then ux:{S} hx:{S} rx:{S} (the slot's
--       indexes, last: see common.lua)
-- ARGV: 1 merchant  2 account  3 currency  4 credit limit (minor units)  5 now (unix ms)
--       6 lazy release limit
-- Returns {'created'|'updated', cur, bal, held, cred, seq} | {'currency', cur} | {'collision'}
--   | {'range'}
-- Invariant: an account's currency never changes; bal + cred stays within 2^53 - 1.

local acct = redis.call('HMGET', KEYS[1], 'm', 'a', 'cur', 'bal')
local result = 'updated'
if not acct[1] then
  redis.call('HSET', KEYS[1], 'm', ARGV[1], 'a', ARGV[2], 'cur', ARGV[3], 'bal', 0,
    'held', 0, 'cred', ARGV[4], 'seq', 0, 'ca', ARGV[5])
  result = 'created'
else
  if acct[1] ~= ARGV[1] or acct[2] ~= ARGV[2] then
    return {'collision'}
  end
  if acct[3] ~= ARGV[3] then
    return {'currency', acct[3]}
  end
  if tonumber(acct[4]) + tonumber(ARGV[4]) > MAX_SAFE then
    return {'range'}
  end
  redis.call('HSET', KEYS[1], 'cred', ARGV[4])
  release_expired(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[5], tonumber(ARGV[6]))
end
local reply = {result}
local snap = snapshot(KEYS[1])
for i = 1, 5 do
  reply[#reply + 1] = snap[i]
end
return reply
