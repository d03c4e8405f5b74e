-- get_task: one task of the customer after returning expired reservations.
-- Function flags: allow-oom (a Redis over maxmemory still answers it: its only writes return
-- expired reservations, at most the reap limit of them)
--
-- KEYS[1..10] the customer's keys (see _common.lua)
-- ARGV[1..5]  reap limit, retentions, ledger cap (see _common.lua)
-- ARGV[6] task digest
-- Reply: {ceiling|false, used, reserved, exists 1|0, now_ms}

local tf = ARGV[6]

local now = now_ms()
if reap(now) then touch() end
local c, u, r, exists = task_state(tf)
return {c or false, u, r, exists and 1 or 0, now}
