-- prune_index.lua: take a scope out of its slot's outbox index once its outbox is empty.
--
-- KEYS: 1 u:{T}  2 ux:{S} (the index of T's slot)
-- ARGV: 1 the scope tag T
-- Returns 1 when the scope left the index, else 0.
-- Invariant: a scope with a record in u:{T} is always in ux:{S} (record_unsettled adds it in
-- the same script that writes the record; this removes it only while u:{T} is empty, atomically).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.call('SREM', KEYS[2], ARGV[1])
end
return 0
