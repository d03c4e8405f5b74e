-- get_budget: the customer's budget after returning expired reservations.
--
-- KEYS[1..7]  the customer's keys (see _common.lua)
-- ARGV[1] reap limit
-- ARGV[2] outcome retention, ms
-- Reply: {limit|false, spent, reserved, open reservations, now_ms}

local reap_limit = tonumber(ARGV[1])
local retention = tonumber(ARGV[2])

local now = now_ms()
reap(now, reap_limit, retention)
local limit, spent, reserved, open = budget_state()
return {limit or false, spent, reserved, open, now}
