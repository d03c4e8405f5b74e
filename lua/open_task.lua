-- open_task: open a task of the customer with a ceiling (or none), or change its ceiling.
--
-- KEYS[1..7]  the customer's keys (see _common.lua)
-- ARGV[1] task digest
-- ARGV[2] task_ref
-- ARGV[3] ceiling in units, '' for none
-- ARGV[4] reap limit
-- ARGV[5] outcome retention, ms
-- Reply: {ceiling|false, used, reserved, exists 1|0, now_ms}

local tf, task_ref, ceiling = ARGV[1], ARGV[2], ARGV[3]
local reap_limit = tonumber(ARGV[4])
local retention = tonumber(ARGV[5])

local now = now_ms()
reap(now, reap_limit, retention)
redis.call('HSET', K.tasks, tf .. ':n', task_ref)
if ceiling == '' then
  redis.call('HDEL', K.tasks, tf .. ':c')
else
  redis.call('HSET', K.tasks, tf .. ':c', ceiling)
end
local c, u, r = task_state(tf)
return {c or false, u, r, 1, now}
