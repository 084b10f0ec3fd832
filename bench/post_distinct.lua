-- wrk script: POST a small chat completion whose body differs in every request, so the
-- response cache never has its answer (every request a miss that goes upstream):
--   wrk -t2 -c64 -d10s -s bench/post_distinct.lua URL -- RUN_ID
-- The body is post.lua's with a `user` field of RUN_ID (one per wrk run, from bench/runner.py),
-- the wrk thread and a counter. The summary line ("BENCH_JSON {...}") is post.lua's.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "post.lua")

local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("thread_id", threads)
end

local prefix, count = "", 0
function init(args)
  prefix = (args[1] or tostring(os.time())) .. "-" .. tostring(thread_id) .. "-"
end

function request()
  count = count + 1
  return wrk.format(nil, nil, nil,
    '{"model":"bench","messages":[{"role":"user","content":"hi"}],"user":"' ..
    prefix .. count .. '"}')
end
