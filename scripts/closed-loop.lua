-- wrk script of scripts/closed-loop.sh: balance payments of 0.01 over $ACCOUNTS pre-funded
-- accounts (cl_0 … cl_<n-1>), each with its own Idempotency-Key and merchant order id (unique
-- per run: $RUN and the start time in them).
local accounts = tonumber(os.getenv("ACCOUNTS") or "64")
local run = (os.getenv("RUN") or "run") .. "-" .. os.time()
local n = 0

wrk.method = "POST"
wrk.headers["Authorization"] = "Bearer sk_test_alpha"
wrk.headers["Content-Type"] = "application/json"

request = function()
  n = n + 1
  local id = run .. "-" .. n
  wrk.headers["Idempotency-Key"] = id
  local body = '{"merchant_order_id":"' .. id .. '","amount":"0.01","currency":"CNY",'
    .. '"method":"balance","account_id":"cl_' .. (n % accounts) .. '"}'
  return wrk.format(nil, "/v1/payments", nil, body)
end
