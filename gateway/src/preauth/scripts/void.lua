-- void.lua: forget a movement the settlement store refused because this balance store rolled
-- back (its account sequence number was already used). The account is rebuilt from the
-- settlement store right after, so no money is touched here.
--
-- KEYS: 1 ps:{T}  2 u:{T}  3 i:{T}:<idempotency key>
-- ARGV: 1 id (payment or adjustment)
-- Returns 1 when the pending record was there, else 0.
-- Invariant: afterwards the movement is nowhere in this store but as a 'failed' payment; the
-- client may retry with the same key.

if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], 'failed')
end
redis.call('DEL', KEYS[3])
return redis.call('HDEL', KEYS[2], ARGV[1])
