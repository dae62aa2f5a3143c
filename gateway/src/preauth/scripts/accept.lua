-- accept.lua: a channel took the order of an attempt of a payment whose intent is committed:
-- keep the acceptance with the payment, then do what settled.lua does for its mark (the
-- intent's pending record goes, the idempotency record may replay). The answer goes out after
-- this call; the attempt's row rides a later group commit.
--
-- KEYS: 1 pd:{T}  2 u:{T}  3 i:{T}:<idempotency key>
-- ARGV: 1 payment id  2 the acceptance (JSON, see `AcceptedAttempt`)
-- Returns 1 when kept, 0 when the payment is not here (then nothing changes).
-- Invariant: the acceptance lives in pd:{T} as '<payment id>#a' beside the document and leaves
-- with it (evict.lua); an idempotency record leaves 'F' only after the intent's commit.

local pid = ARGV[1]
if redis.call('HEXISTS', KEYS[1], pid) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], pid .. '#a', ARGV[2])
redis.call('HDEL', KEYS[2], pid)
release_idempotency(KEYS[3])
return 1
