-- read_account.lua: read an account after releasing its expired holds; also the sweeper's
-- per-account step (which also takes a scope without holds out of hx:{S}).
--
-- KEYS: 1 a:{T}  2 h:{T}  3 ph:{T}  4 ps:{T}  5 u:{T}  6 ux:{S}  7 hx:{S}  8 rx:{S}
-- ARGV: 1 merchant ('' from the sweeper: skip the identity check)  2 account  3 now (unix ms)
--       4 lazy release limit
-- Returns {'ok', released, cur, bal, held, cred, seq} | {'not_found'} | {'collision'}
-- Invariant: as common.lua; releases at most `limit` holds.

if ARGV[1] ~= '' then
  local bad = check_account(KEYS[1], ARGV[1], ARGV[2], '')
  if bad then
    return bad
  end
elseif redis.call('EXISTS', KEYS[1]) == 0 then
  return {'not_found'}
end
local released = release_expired(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[3], tonumber(ARGV[4]))
-- The sweeper found the scope through hx:{S}: once it holds nothing, it leaves the index.
if ARGV[1] == '' and HOLDS_INDEX and redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('SREM', HOLDS_INDEX, tag_of(KEYS[2]))
end
local reply = {'ok', fmt(released)}
local snap = snapshot(KEYS[1])
for i = 1, 5 do
  reply[#reply + 1] = snap[i]
end
return reply
