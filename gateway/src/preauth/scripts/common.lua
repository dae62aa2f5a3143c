-- common.lua: helpers prepended to every pre-authorization script at load time.
--
-- Key layout (all keys of one scope share the hash tag {T}, so every script is single-slot):
--   a:{T}   hash   account: m (merchant), a (account), cur, bal, held, cred, seq, ca (created ms)
--   h:{T}   zset   live holds: member payment id, score expiry (unix ms)
--   ph:{T}  hash   payment id -> amount held (present while the hold is live)
--   ps:{T}  hash   payment id -> status
--   pd:{T}  hash   payment id -> the payment's fixed JSON document (never rewritten)
--   o:{T}   hash   merchant order id -> payment id (stale when that payment is no longer live)
--   i:{T}:K hash   idempotency record of key K: h (request hash), s ('F' while in flight;
--                  absent or 'D' once done), o (outcome); expires after the configured retention
--   u:{T}   hash   id -> what must still reach the settlement store, as JSON
--                  {"seq": account seq after the movement, "key": idempotency key,
--                   "record": {"settlement": …} | {"intent": …} | a compact record}; removed
--                  by settled.lua
--   rf:{T}  hash   refunds: '<pid>#n' count, '<pid>#r' reserved, '<pid>#s' succeeded,
--                  '<refund id>' its JSON
--   lc:{T}  hash   '<pid>#<attempt>' -> seq of the attempt's late capture
--
-- Index keys, one per cluster slot S (a short tag hashing to the slot of every {T} it lists,
-- see preauth/slots.rs), passed as the LAST keys of a script that may add to them:
--   ux:{S}  set    scope tags whose u:{T} may hold records (added with each record; removed
--                  by prune_index.lua once u:{T} is empty): recovery reads these, not SCAN
--   hx:{S}  set    scope tags whose h:{T} may hold live holds (added with each hold; removed
--                  by the sweep once h:{T} is empty)
--   rx:{S}  zset   payment id -> when its state was written (unix ms): evict.lua removes a
--                  finished payment's fields (ps, pd, o, rf, lc) once that is older than the
--                  retention (redis.payment_retention_seconds)
--
-- Invariant kept by every script: a:{T}.held == sum of ph:{T}; every member of h:{T} has an
-- entry in ph:{T} and status pending. Numbers are Lua doubles: the gateway bounds every stored
-- value by 2^53 - 1, so arithmetic here stays exact.

local MAX_SAFE = 9007199254740991

-- The slot index keys this call was given (the last keys, by convention; nil when absent).
local UNSETTLED_INDEX, HOLDS_INDEX, RETENTION_INDEX
for i = math.max(1, #KEYS - 2), #KEYS do
  local prefix = string.sub(KEYS[i], 1, 4)
  if prefix == 'ux:{' then
    UNSETTLED_INDEX = KEYS[i]
  elseif prefix == 'hx:{' then
    HOLDS_INDEX = KEYS[i]
  elseif prefix == 'rx:{' then
    RETENTION_INDEX = KEYS[i]
  end
end

-- The hash tag T of a key 'x:{T}'.
local function tag_of(key)
  return string.match(key, '{([^}]*)}')
end

-- A live hold was placed in h:{T}: the sweeper finds the scope through hx:{S}.
local function index_hold(hkey)
  if HOLDS_INDEX then
    redis.call('SADD', HOLDS_INDEX, tag_of(hkey))
  end
end

-- A payment's state was written (created, or put back from the store) at `at_ms`: it leaves
-- once it is finished and that is older than the retention (evict.lua).
local function index_payment(pid, at_ms)
  if RETENTION_INDEX then
    redis.call('ZADD', RETENTION_INDEX, at_ms, pid)
  end
end

-- Now (unix ms) by the server's clock, for scripts not given one.
local function server_now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function fmt(n)
  return string.format('%d', n)
end

local function is_live(status)
  return status == 'pending' or status == 'succeeded'
    or status == 'partially_refunded' or status == 'refunded'
end

-- Records a movement or a status change that must reach the settlement store (its outbox).
-- `id` is the payment or adjustment id, or '<payment id>#s' for a status change.
local function record_unsettled(ukey, id, seq, idempotency_key, record_json, now_ms)
  if UNSETTLED_INDEX then
    redis.call('SADD', UNSETTLED_INDEX, tag_of(ukey))
  end
  redis.call('HSET', ukey, id,
    '{"seq":' .. fmt(seq) .. ',"key":' .. cjson.encode(idempotency_key) .. ',"at":' .. fmt(now_ms)
    .. ',"record":' .. record_json .. '}')
end

-- A payment left 'pending' without capture: the store must learn its final status.
local function record_final_status(ukey, pid, status, now_ms)
  record_unsettled(ukey, pid .. '#s', 0, '',
    '{"status":{"payment_id":"' .. pid .. '","status":"' .. status .. '","updated_at_ms":'
    .. fmt(now_ms) .. '}}', now_ms)
end

-- Removes a payment's hold (if any) and takes it off `held`; returns the amount it held.
local function drop_hold(akey, hkey, phkey, pid)
  local amount = tonumber(redis.call('HGET', phkey, pid) or '0')
  if amount > 0 then
    redis.call('HINCRBY', akey, 'held', -amount)
  end
  redis.call('HDEL', phkey, pid)
  redis.call('ZREM', hkey, pid)
  return amount
end

-- Releases up to `limit` holds whose expiry is <= now_ms: held -= amount, status -> expired.
local function release_expired(akey, hkey, phkey, pskey, ukey, now_ms, limit)
  local expired = redis.call('ZRANGEBYSCORE', hkey, '-inf', now_ms, 'LIMIT', 0, limit)
  for _, pid in ipairs(expired) do
    drop_hold(akey, hkey, phkey, pid)
    if redis.call('HGET', pskey, pid) == 'pending' then
      redis.call('HSET', pskey, pid, 'expired')
      record_final_status(ukey, pid, 'expired', tonumber(now_ms))
    end
  end
  return #expired
end

-- {cur, bal, held, cred, seq} as strings.
local function snapshot(akey)
  return redis.call('HMGET', akey, 'cur', 'bal', 'held', 'cred', 'seq')
end

-- Checks that an account read as {m, a, cur, ...} exists and is the one the caller means (a tag
-- collision is refused). Returns nil when fine, else the reply to return.
local function account_mismatch(acct, merchant, account, currency)
  if not acct[1] then
    return {'not_found'}
  end
  if acct[1] ~= merchant or acct[2] ~= account then
    return {'collision'}
  end
  if currency ~= '' and acct[3] ~= currency then
    return {'currency', acct[3]}
  end
  return nil
end

-- Whether a rebuild of the account is under way (its fence, 'rb' in a:{T}, set by
-- rebuild_fence.lua until a time): no new movement of the account starts until the rebuild
-- has loaded the store's state (rebuild_account.lua lifts the fence) or the fence lapsed.
local function fence_holds(until_ms, now)
  return until_ms and tonumber(until_ms) > tonumber(now)
end

-- Same, reading the fence itself (authorize.lua reads it with the account's other fields).
local function fenced(akey, now)
  return fence_holds(redis.call('HGET', akey, 'rb'), now)
end

-- Same, reading the account's m, a and cur itself.
local function check_account(akey, merchant, account, currency)
  return account_mismatch(redis.call('HMGET', akey, 'm', 'a', 'cur'), merchant, account, currency)
end

-- Returns nil when the key is new, else the reply for a replay, conflict or in-flight request.
local function check_idempotency(ikey, request_hash)
  local rec = redis.call('HMGET', ikey, 'h', 's', 'o')
  if not rec[1] then
    return nil
  end
  if rec[1] ~= request_hash then
    return {'conflict'}
  end
  if rec[2] == 'F' then
    return {'in_flight'}
  end
  return {'replay', rec[3]}
end

-- Records the outcome of a new key: in flight ('F') or done ('D', kept as an absent 's').
local function record_idempotency(ikey, request_hash, state, outcome, retention_seconds)
  if state == 'F' then
    redis.call('HSET', ikey, 'h', request_hash, 's', 'F', 'o', outcome)
  else
    redis.call('HSET', ikey, 'h', request_hash, 'o', outcome)
  end
  redis.call('EXPIRE', ikey, retention_seconds)
end

-- The commit an in-flight record waited for has happened: it replays from now on. One command,
-- and nothing is written when the record has expired (no record without its request hash).
local function release_idempotency(ikey)
  redis.call('HDEL', ikey, 's')
end

