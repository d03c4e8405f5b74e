-- get_task: one task of the customer after returning expired reservations.
--
-- KEYS[1..8]  the customer's keys (see _common.lua)
-- ARGV[1..3]  reap limit, outcome retention (ms), ledger cap (see _common.lua)
-- ARGV[4] task digest
-- Reply: {ceiling|false, used, reserved, exists 1|0, now_ms}

local tf = ARGV[4]

local now = now_ms()
reap(now)
local c, u, r, exists = task_state(tf)
return {c or false, u, r, exists and 1 or 0, now}
