-- wrk script: POST one fixed body (any bytes) and print the results as one JSON line.
--
-- Environment:
--   WRK_BODY_FILE                 file holding the request body (required)
--   WRK_CONTENT_TYPE              Content-Type header (default application/json)
--   WRK_INFERENCE_HEADER_LENGTH   Inference-Header-Content-Length header, if set
--   WRK_EXTRA_HEADERS             more headers, one "Name: value" a line (e.g. an API key)
--
-- No response() callback: it makes wrk parse every response in Lua and slows it
-- down; non-2xx answers are counted by wrk itself in summary.errors.status.
--
-- The latency percentiles are wrk's own, as `wrk --latency` prints them: before
-- done() runs, wrk 4.x corrects for coordinated omission by adding, for every sample
-- n >= 2e (e = runtime / (requests / connections)), synthetic samples at n-e, n-2e,
-- ... > e. That weighs stalls more than a plain closed-loop histogram would. (The
-- Debian build exposes no histogram buckets to Lua, so this cannot be undone here.)

local function read_file(path)
  local f = assert(io.open(path, "rb"))
  local data = f:read("*a")
  f:close()
  return data
end

wrk.method = "POST"
wrk.body = read_file(assert(os.getenv("WRK_BODY_FILE"), "WRK_BODY_FILE is not set"))
wrk.headers["Content-Type"] = os.getenv("WRK_CONTENT_TYPE") or "application/json"
local header_length = os.getenv("WRK_INFERENCE_HEADER_LENGTH")
if header_length and header_length ~= "" then
  wrk.headers["Inference-Header-Content-Length"] = header_length
end
for line in (os.getenv("WRK_EXTRA_HEADERS") or ""):gmatch("[^\n]+") do
  local name, value = line:match("^([^:]+):%s*(.*)$")
  if name then wrk.headers[name] = value end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,' ..
    '"errors":{"connect":%.0f,"read":%.0f,"write":%.0f,"status":%.0f,"timeout":%.0f},' ..
    '"latency_us":{"p50":%.0f,"p90":%.0f,"p99":%.0f,"p999":%.0f,"max":%.0f,' ..
    '"mean":%.3f,"stdev":%.3f}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean, latency.stdev))
end
