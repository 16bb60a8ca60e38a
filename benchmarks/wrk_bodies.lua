-- wrk script of benchmarks/http_load.py: POST pre-encoded bodies in turn, report one JSON line.
--
-- wrk -t1 -cN -dSs -s wrk_bodies.lua URL -- RECORDS CONTENT_TYPE PATH
--
-- RECORDS holds the bodies, each as "<length>\n" followed by that many bytes (any bytes, so
-- binary float32 bodies travel too). Every request is formatted once, in init, before the clock
-- starts; request() only hands the next one out. done() prints the figures http_load.py reads.

local requests, at = {}, 0

function init(args)
  local records, content_type, path = args[1], args[2], args[3]
  local f = assert(io.open(records, "rb"))
  while true do
    local length = f:read("*l")
    if not length then break end
    local body = f:read(tonumber(length))
    requests[#requests + 1] = wrk.format("POST", path, {["content-type"] = content_type}, body)
  end
  f:close()
  assert(#requests > 0, "no bodies in " .. records)
end

function request()
  at = at % #requests + 1
  return requests[at]
end

function done(summary, latency, _)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "errors": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.status + e.timeout))
end
