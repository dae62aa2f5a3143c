-- evict.lua: let go of finished payments' state once it is older than the retention (issue 14:
-- Redis holds the hot state, the settlement store keeps everything; reads, refunds and
-- callbacks of a payment no longer here fall back to the store and put back what they need).
--
-- KEYS: 1 rx:{S} (the slot's retention index)  2 ps:{T}  3 pd:{T}  4 o:{T}  5 rf:{T}  6 lc:{T}
--       7 u:{T}  (one scope T of slot S)
-- ARGV: 1 cutoff (unix ms: state written at or before it is due)  2 now (unix ms)
--       3.. payment ids of scope T found due in rx:{S}, or order-id markers a rebuild put
--       back ('!<payment id>:<order id>', see restore_keys.lua)
-- Returns {evicted, deferred}.
-- A due payment leaves — its status, document (and channel acceptance), order-id entry (if still its own), refunds'
-- state and late-capture markers — unless something may still need it here: it is pending, or
-- a movement of it (its intent or settlement, status change, a late capture, a refund) waits
-- in the outbox, or one of its refunds is pending. Then it is looked at again a retention
-- later (its index entry re-dated now). A payment that is gone already just leaves the index.
-- Invariant: never touches money (a:{T}, h:{T}, ph:{T}) or idempotency records (they expire on
-- their own TTL); never removes the state of a payment with a live hold or an unsettled record.

-- Late-capture markers '<pid>#<attempt>' for attempts 1..8: payments.max_attempts is at most 8
-- (config validation).
local MAX_ATTEMPTS = 8

local outbox_busy = redis.call('HLEN', KEYS[7]) > 0

-- Whether anything of payment `pid` may still be needed here.
local function busy(pid, status)
  if status == 'pending' then
    return true
  end
  local refunds = tonumber(redis.call('HGET', KEYS[5], pid .. '#n') or '0')
  local body = string.sub(pid, 5)
  for n = 1, refunds do
    local rid = 're_' .. body .. '_' .. fmt(n)
    local rec = redis.call('HGET', KEYS[5], rid)
    if rec and string.find(rec, '"status":"pending"', 1, true) then
      return true
    end
    if outbox_busy and (redis.call('HEXISTS', KEYS[7], rid) == 1
        or redis.call('HEXISTS', KEYS[7], rid .. '#f') == 1) then
      return true
    end
  end
  if outbox_busy then
    for _, id in ipairs({pid, pid .. '#m', pid .. '#s'}) do
      if redis.call('HEXISTS', KEYS[7], id) == 1 then
        return true
      end
    end
    for attempt = 1, MAX_ATTEMPTS do
      if redis.call('HEXISTS', KEYS[7], pid .. '#l' .. attempt) == 1 then
        return true
      end
    end
  end
  return false
end

local evicted, deferred = 0, 0
local cutoff = tonumber(ARGV[1])
for i = 3, #ARGV do
  local pid = ARGV[i]
  local score = redis.call('ZSCORE', KEYS[1], pid)
  local marked, order = string.match(pid, '^!([^:]+):(.*)$')
  if marked then
    if score and tonumber(score) <= cutoff then
      if redis.call('HGET', KEYS[4], order) == '!' .. marked then
        redis.call('HDEL', KEYS[4], order)
      end
      redis.call('ZREM', KEYS[1], pid)
      evicted = evicted + 1
    end
  elseif score and tonumber(score) <= cutoff then
    local status = redis.call('HGET', KEYS[2], pid)
    if not status then
      redis.call('ZREM', KEYS[1], pid)
    elseif busy(pid, status) then
      redis.call('ZADD', KEYS[1], ARGV[2], pid)
      deferred = deferred + 1
    else
      local doc = redis.call('HGET', KEYS[3], pid)
      -- Order ids are [A-Za-z0-9_.:-] (never escaped), the field precedes any free text.
      local order = doc and string.match(doc, '"merchant_order_id":"([^"]*)"')
      if order and redis.call('HGET', KEYS[4], order) == pid then
        redis.call('HDEL', KEYS[4], order)
      end
      local refunds = tonumber(redis.call('HGET', KEYS[5], pid .. '#n') or '0')
      local body = string.sub(pid, 5)
      for n = 1, refunds do
        redis.call('HDEL', KEYS[5], 're_' .. body .. '_' .. fmt(n))
      end
      redis.call('HDEL', KEYS[5], pid .. '#n', pid .. '#r', pid .. '#s')
      for attempt = 1, MAX_ATTEMPTS do
        redis.call('HDEL', KEYS[6], pid .. '#' .. attempt)
      end
      redis.call('HDEL', KEYS[2], pid)
      redis.call('HDEL', KEYS[3], pid, pid .. '#a')
      redis.call('ZREM', KEYS[1], pid)
      evicted = evicted + 1
    end
  end
end
return {evicted, deferred}
