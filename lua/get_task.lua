-- get_task: one task of the customer after returning expired reservations.
--
-- KEYS[1..7]  the customer's keys (see _common.lua)
-- ARGV[1] task digest
-- ARGV[2] reap limit
-- ARGV[3] outcome retention, ms
-- Reply: {ceiling|false, used, reserved, exists 1|0, now_ms}

local tf = ARGV[1]
local reap_limit = tonumber(ARGV[2])
local retention = tonumber(ARGV[3])

local now = now_ms()
reap(now, reap_limit, retention)
local c, u, r, exists = task_state(tf)
return {c or false, u, r, exists and 1 or 0, now}
