-- What every workload shares: the request's head, checking each answer, and the figures
-- as one JSON line for bench/http.py. Loaded by each workload's script with dofile.
--
-- Settings come from the environment: WRK_TOKEN (a bearer token), WRK_BODIES (a file of
-- request bodies, one JSON document a line: taken in turn), WRK_EXPECT (a string every
-- good answer's body holds).

local token = os.getenv("WRK_TOKEN")
local expect = os.getenv("WRK_EXPECT")
local requests_made = {}

wrk.method = "POST"
wrk.path = "/graphql"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json"
if token and token ~= "" then
   wrk.headers["Authorization"] = "Bearer " .. token
end

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

-- Every body of the file, each a request made once, here in the thread that sends it.
function init(args)
   bad = 0
   first_bad = ""
   local file = assert(io.open(os.getenv("WRK_BODIES"), "r"))
   for line in file:lines() do
      if line ~= "" then
         table.insert(requests_made, wrk.format(nil, nil, nil, line))
      end
   end
   file:close()
   turn = 0
end

function request()
   turn = turn % #requests_made + 1
   return requests_made[turn]
end

-- An answer that is not the expected success counts as bad: a GraphQL error comes with
-- status 200, so the status alone would not tell.
function response(status, headers, body)
   if status ~= 200 or not string.find(body, expect, 1, true) then
      bad = bad + 1
      if first_bad == "" then
         first_bad = tostring(status) .. " " .. string.sub(body, 1, 300)
      end
   end
end

local function quoted(text)
   return '"' .. string.gsub(text, '[%c"\\]', function(c) return string.format("\\u%04x", string.byte(c)) end) .. '"'
end

function done(summary, latency, requests)
   local bad_total, first = 0, ""
   for _, thread in ipairs(threads) do
      bad_total = bad_total + thread:get("bad")
      if first == "" then first = thread:get("first_bad") end
   end
   local errors = summary.errors
   io.write(string.format(
      'WRK_RESULT {"requests": %d, "duration_us": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, '
      .. '"max_us": %d, "mean_us": %.1f, "socket_errors": %d, "status_errors": %d, "timeouts": %d, '
      .. '"bad": %d, "first_bad": %s}\n',
      summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
      latency:percentile(99), latency.max, latency.mean,
      errors.connect + errors.read + errors.write, errors.status, errors.timeout, bad_total, quoted(first)))
end
