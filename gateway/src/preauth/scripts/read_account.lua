-- read_account.lua: read an account after releasing its expired holds; also the sweeper's
-- per-account step.
--
-- KEYS: 1 a:{T}  2 h:{T}  3 ph:{T}  4 ps:{T}  5 u:{T}
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
local reply = {'ok', fmt(released)}
local snap = snapshot(KEYS[1])
for i = 1, 5 do
  reply[#reply + 1] = snap[i]
end
return reply
