-- wrk script: each request posts a batch of BATCH (default 1000) positions to /v1/locations/batch.
-- Bodies are generated once (BODIES of them, default 32, drivers drawn from DRIVERS, default 100000)
-- and rotated, so the client spends its time sending rather than building JSON.
local batch = tonumber(os.getenv("BATCH") or "1000")
local bodies_n = tonumber(os.getenv("BODIES") or "32")
local drivers = tonumber(os.getenv("DRIVERS") or "100000")
math.randomseed(42)
local bodies = {}
for b = 1, bodies_n do
  local parts = {}
  for i = 1, batch do
    local id = math.random(1, drivers)
    parts[i] = string.format('{"driver_id":"drv-%d","latitude":%.6f,"longitude":%.6f,"status":"online","speed_mps":%.1f}',
      id, 31.13 + math.random() * 0.2, 121.37 + math.random() * 0.2, math.random() * 15)
  end
  bodies[b] = '{"locations":[' .. table.concat(parts, ",") .. ']}'
end
local n = 0
wrk.method = "POST"
wrk.path = "/v1/locations/batch"
wrk.headers["Content-Type"] = "application/json"
request = function()
  n = n % bodies_n + 1
  return wrk.format(nil, nil, nil, bodies[n])
end
