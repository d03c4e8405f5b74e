-- open_task: open a task of the customer with a ceiling (or none), or change its ceiling.
--
-- KEYS[1..8]  the customer's keys (see _common.lua)
-- ARGV[1..3]  reap limit, outcome retention (ms), ledger cap (see _common.lua)
-- ARGV[4] task digest
-- ARGV[5] task_ref
-- ARGV[6] ceiling in units, '' for none
-- Reply: {ceiling|false, used, reserved, exists 1|0, now_ms}

local tf, task_ref, ceiling = ARGV[4], ARGV[5], ARGV[6]

local now = now_ms()
reap(now)
redis.call('HSET', K.tasks, tf .. ':n', task_ref)
if ceiling == '' then
  redis.call('HDEL', K.tasks, tf .. ':c')
else
  redis.call('HSET', K.tasks, tf .. ':c', ceiling)
end
local c, u, r = task_state(tf)
return {c or false, u, r, 1, now}
