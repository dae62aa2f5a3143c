-- rebuild_account.lua: load one account from the settlement store (the system of record).
--
-- KEYS: 1 a:{T}  2 h:{T}  3 ph:{T}  4 ps:{T}  5 pd:{T}  6 o:{T}  7 u:{T}  8 ux:{S}  9 hx:{S}
--       10 rx:{S}
-- ARGV: 1 merchant  2 account  3 currency  4 balance  5 credit limit  6 seq  7 created (ms)
--       8 the account's seq and 9 its held as read before the store's snapshot ('' and '':
--       it was not here then)
--       then, per live hold, 5 values: payment id, amount, expiry (ms), order id, document
-- Returns {'ok', holds loaded} | {'busy'}
-- The fence: nothing is loaded ('busy', the caller reads again) while a movement of the
-- account is on its way to the store (u:{T} not empty), or when the account moved since it
-- was read before the snapshot (its seq or held changed): so a rebuild never overwrites a
-- movement the snapshot does not have, on any number of gateway instances.
-- Invariant: afterwards held == sum of the loaded holds and balance/seq equal the store's;
-- holds Redis had that the store does not know are dropped (their payments are marked
-- failed: the store never committed their intent, so no channel was ever called for them).

if redis.call('HLEN', KEYS[7]) > 0 then
  return {'busy'}
end
local now_state = redis.call('HMGET', KEYS[1], 'seq', 'held')
if ARGV[8] == '' then
  if now_state[1] then
    return {'busy'}
  end
elseif now_state[1] ~= ARGV[8] or (now_state[2] or '0') ~= ARGV[9] then
  return {'busy'}
end
redis.call('HSET', KEYS[1], 'm', ARGV[1], 'a', ARGV[2], 'cur', ARGV[3], 'bal', ARGV[4],
  'cred', ARGV[5], 'seq', ARGV[6], 'ca', ARGV[7])
-- Loaded: new movements may start again (rebuild_fence.lua held them off).
redis.call('HDEL', KEYS[1], 'rb')
local known = {}
local held = 0
local n = 0
for i = 10, #ARGV, 5 do
  local pid = ARGV[i]
  local amount = tonumber(ARGV[i + 1])
  known[pid] = true
  redis.call('ZADD', KEYS[2], ARGV[i + 2], pid)
  redis.call('HSET', KEYS[3], pid, ARGV[i + 1])
  redis.call('HSET', KEYS[4], pid, 'pending')
  redis.call('HSET', KEYS[5], pid, ARGV[i + 4])
  redis.call('HSET', KEYS[6], ARGV[i + 3], pid)
  index_hold(KEYS[2])
  index_payment(pid, server_now_ms())
  held = held + amount
  n = n + 1
end
for _, pid in ipairs(redis.call('HKEYS', KEYS[3])) do
  if not known[pid] then
    redis.call('HDEL', KEYS[3], pid)
    redis.call('ZREM', KEYS[2], pid)
    if redis.call('HGET', KEYS[4], pid) == 'pending' then
      redis.call('HSET', KEYS[4], pid, 'failed')
    end
  end
end
redis.call('HSET', KEYS[1], 'held', fmt(held))
return {'ok', fmt(n)}
