-- void.lua: forget a movement the settlement store refused because this balance store rolled
-- back (its account sequence number was already used). The account is rebuilt from the
-- settlement store right after (its balance, sequence and live holds), so no balance is
-- touched here; what is set back is the state that lets the movement happen again, so it is
-- never lost:
--   '<payment or adjustment id>'   made with its movement: it ends 'failed' (the client
--                                  retries with the same key)
--   '<payment id>#m'               a channel success (capture, top-up credit): the payment is
--                                  'pending' again, so the channel's retried callback (or the
--                                  resolution loop) succeeds it again
--   '<refund id>#f'                a refund's success: the refund is 'pending' again and the
--                                  payment's refunded total and status go back, so the refund
--                                  retry loop finishes it again
--   '<payment id>#l<attempt>'      a late capture: its marker goes, so the retried callback
--                                  captures again
--
-- KEYS: 1 ps:{T}  2 u:{T}  3 i:{T}:<idempotency key>  4 rf:{T}  5 lc:{T}
-- ARGV: 1 the movement's outbox id
-- Returns 1 when the pending record was there, else 0.
-- Invariant: afterwards the movement is nowhere in this store, and what made it can make it
-- again; the settlement store never had it.

local id = ARGV[1]
local base, kind, attempt = string.match(id, '^([^#]+)#(%a)(%d*)$')
if not base then
  if redis.call('HEXISTS', KEYS[1], id) == 1 then
    redis.call('HSET', KEYS[1], id, 'failed')
  end
elseif kind == 'm' then
  if redis.call('HGET', KEYS[1], base) == 'succeeded' then
    redis.call('HSET', KEYS[1], base, 'pending')
  end
elseif kind == 'f' then
  local text = redis.call('HGET', KEYS[4], base)
  if text then
    local rec = cjson.decode(text)
    if rec.status == 'succeeded' then
      local pid = rec.payment_id
      local left = redis.call('HINCRBY', KEYS[4], pid .. '#s', -tonumber(rec.amount))
      if left > 0 then
        redis.call('HSET', KEYS[1], pid, 'partially_refunded')
      else
        redis.call('HSET', KEYS[1], pid, 'succeeded')
      end
      rec.status = 'pending'
      redis.call('HSET', KEYS[4], base, cjson.encode(rec))
    end
  end
elseif kind == 'l' then
  redis.call('HDEL', KEYS[5], base .. '#' .. attempt)
end
redis.call('DEL', KEYS[3])
return redis.call('HDEL', KEYS[2], id)
