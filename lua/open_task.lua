-- open_task: open a task of the customer with a ceiling (or none), or change its ceiling.
--
-- KEYS[1..10] the customer's keys (see _common.lua)
-- ARGV[1..5]  reap limit, retentions, ledger cap (see _common.lua)
-- ARGV[6] task digest
-- ARGV[7] task_ref
-- ARGV[8] ceiling in units, '' for none
-- Reply: {ceiling|false, used, reserved, exists 1|0, now_ms}

local tf, task_ref, ceiling = ARGV[6], ARGV[7], ARGV[8]

local now = now_ms()
reap(now)
redis.call('HSET', K.tasks, tf .. ':n', task_ref)
if ceiling == '' then
  redis.call('HDEL', K.tasks, tf .. ':c')
else
  redis.call('HSET', K.tasks, tf .. ':c', ceiling)
end
task_seen(tf, now)
touch()
local c, u, r = task_state(tf)
return {c or false, u, r, 1, now}
