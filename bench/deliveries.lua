-- wrk script: send the signed deliveries of a request file, one line each, in order.
--
-- Usage: wrk -t2 -c32 -d8s -s bench/deliveries.lua URL -- REQUEST_FILE 2
-- The last argument repeats wrk's thread count (-t).
-- Each line is "id<TAB>signature<TAB>event<TAB>body". wrk's Lua cannot compute HMAC-SHA256, so
-- the bench signs the bodies beforehand. With several wrk threads, thread k sends the lines whose
-- number modulo the thread count is k, so no delivery is sent twice. A thread that runs out of
-- lines starts over and counts the restarts, which the bench reports as an undersized file.

local threads = {}

function setup(thread)
   thread:set("thread_index", #threads)
   table.insert(threads, thread)
end

function init(args)
   requests = {}
   position = 0
   restarts = 0
   local thread_count = tonumber(args[2] or "1")
   local line_number = 0
   for line in io.lines(args[1]) do
      if line_number % thread_count == thread_index then
         local delivery_id, signature, event, body = line:match("^([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$")
         requests[#requests + 1] = wrk.format("POST", "/webhooks/proximity", {
            ["Content-Type"] = "application/json",
            ["X-Webhook-Delivery"] = delivery_id,
            ["X-Webhook-Signature"] = signature,
            ["X-Webhook-Event"] = event,
         }, body)
      end
      line_number = line_number + 1
   end
end

function request()
   position = position + 1
   if position > #requests then
      position = 1
      restarts = restarts + 1
   end
   return requests[position]
end

function done(summary, latency, requests)
   local repeated = 0
   for _, thread in ipairs(threads) do
      repeated = repeated + (thread:get("restarts") or 0)
   end
   local errors = summary.errors
   io.write(string.format(
      "BENCH-JSON {\"requests\": %d, \"duration_us\": %d, \"p50_us\": %d, \"p99_us\": %d, " ..
      "\"max_us\": %d, \"errors_status\": %d, \"errors_socket\": %d, \"file_restarts\": %d}\n",
      summary.requests, summary.duration, latency:percentile(50.0), latency:percentile(99.0),
      latency.max, errors.status, errors.connect + errors.read + errors.write + errors.timeout, repeated))
end
