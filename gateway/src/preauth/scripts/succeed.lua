-- succeed.lua: a pending payment succeeded at its channel: its effect on the money, its status
-- and its settlement (into the outbox), in one step.
--
-- KEYS: 1 a:{T}  2 h:{T}  3 ph:{T}  4 ps:{T}  5 u:{T}  then ux:{S} hx:{S} rx:{S} (the slot's
--       indexes, last: see common.lua)
-- ARGV: 1 payment id  2 effect ('capture' | 'credit' | 'collect')  3 amount (minor units; the
--       credit)  4 now (unix ms)  5 pending settlement record (JSON)  6 its outbox id
-- Returns {'done', seq} | {'not_pending', status} | {'not_found'} | {'no_hold'}
--         | {'no_account'} | {'out_of_range'}
-- Invariant: a payment succeeds at most once (the status leaves 'pending' in the same step), so
-- a hold is captured and an account credited at most once. capture: balance -= hold,
-- held -= hold, seq += 1. credit: balance += amount, seq += 1. collect: no account money moves.

local pid = ARGV[1]
local status = redis.call('HGET', KEYS[4], pid)
if not status then
  return {'not_found'}
end
if status ~= 'pending' then
  return {'not_pending', status}
end
local effect = ARGV[2]
local seq = 0
if effect == 'capture' then
  if redis.call('HEXISTS', KEYS[3], pid) == 0 then
    return {'no_hold'}
  end
  local amount = drop_hold(KEYS[1], KEYS[2], KEYS[3], pid)
  redis.call('HINCRBY', KEYS[1], 'bal', -amount)
  seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
elseif effect == 'credit' then
  local acct = redis.call('HMGET', KEYS[1], 'bal', 'cred')
  if not acct[1] then
    return {'no_account'}
  end
  local amount = tonumber(ARGV[3])
  if tonumber(acct[1]) + tonumber(acct[2]) + amount > MAX_SAFE then
    return {'out_of_range'}
  end
  redis.call('HINCRBY', KEYS[1], 'bal', amount)
  seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
elseif effect ~= 'collect' then
  return redis.error_reply('unknown effect ' .. effect)
end
redis.call('HSET', KEYS[4], pid, 'succeeded')
record_unsettled(KEYS[5], ARGV[6], seq, '', ARGV[5], tonumber(ARGV[4]))
return {'done', fmt(seq)}
