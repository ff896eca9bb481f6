-- wrk script: one-click POSTs, each to a distinct token read from a file.
-- wrk -s oneclick.lua URL -- TOKENS_FILE THREADS
local threads = {}
local tokens = {}
local counter = 0

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  for line in io.lines(args[1]) do
    tokens[#tokens + 1] = line
  end
  step = tonumber(args[2])
end

function request()
  local i = counter * step + id
  counter = counter + 1
  local token = tokens[(i % #tokens) + 1]
  return wrk.format("POST", "/u/" .. token,
    {["Content-Type"] = "application/x-www-form-urlencoded"}, "List-Unsubscribe=One-Click")
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT {\"requests\": %d, \"duration_us\": %d, \"p99_us\": %d, \"p50_us\": %d, " ..
    "\"connect\": %d, \"read\": %d, \"write\": %d, \"status\": %d, \"timeout\": %d, \"tokens\": %d}\n",
    summary.requests, summary.duration, latency:percentile(99), latency:percentile(50),
    e.connect, e.read, e.write, e.status, e.timeout, #tokens))
end
