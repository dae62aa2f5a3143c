-- read_payment.lua: a payment's document, status and live hold, by id or by live order id.
--
-- KEYS: 1 pd:{T}  2 ps:{T}  3 ph:{T}  4 o:{T}
-- ARGV: 1 mode ('id' | 'order')  2 payment id or merchant order id
-- Returns {doc, status, held, acceptance ('' when none: see accept.lua)} | {} when there is
-- none (or, by order, none live).
-- Invariant: read-only.

local pid = ARGV[2]
if ARGV[1] == 'order' then
  pid = redis.call('HGET', KEYS[4], ARGV[2])
  if not pid then
    return {}
  end
end
local status = redis.call('HGET', KEYS[2], pid)
if not status or (ARGV[1] == 'order' and not is_live(status)) then
  return {}
end
return {redis.call('HGET', KEYS[1], pid), status, redis.call('HGET', KEYS[3], pid) or '0',
  redis.call('HGET', KEYS[1], pid .. '#a') or ''}
