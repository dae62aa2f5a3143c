-- capture.lua: capture a pending payment's hold.
--
-- KEYS: 1 a:{T}  2 h:{T}  3 ph:{T}  4 ps:{T}
-- ARGV: 1 payment id
-- (The caller settles the capture through the settlement stream: the channels issue.)
-- Returns {'done', 'succeeded'} | {'not_pending', status} | {'not_found'} | {'no_hold'}
-- Invariant: a hold is captured at most once (the status leaves 'pending' in the same step);
-- balance -= hold, held -= hold, seq += 1.

local pid = ARGV[1]
local status = redis.call('HGET', KEYS[4], pid)
if not status then
  return {'not_found'}
end
if status ~= 'pending' then
  return {'not_pending', status}
end
if redis.call('HEXISTS', KEYS[3], pid) == 0 then
  return {'no_hold'}
end
local amount = drop_hold(KEYS[1], KEYS[2], KEYS[3], pid)
redis.call('HINCRBY', KEYS[1], 'bal', -amount)
redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('HSET', KEYS[4], pid, 'succeeded')
return {'done', 'succeeded'}
