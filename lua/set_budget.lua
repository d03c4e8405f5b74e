-- set_budget: set (or remove, for unlimited) the customer's budget limit. Lowering it below
-- what is spent and reserved is allowed: it only refuses new runs.
--
-- KEYS[1..7]  the customer's keys (see _common.lua)
-- ARGV[1] limit in units, '' for unlimited
-- ARGV[2] customer id (stored once, for people reading the keys)
-- ARGV[3] reap limit
-- ARGV[4] outcome retention, ms
-- Reply: {limit|false, spent, reserved, open reservations, now_ms}

local limit_arg = ARGV[1]
local customer_id = ARGV[2]
local reap_limit = tonumber(ARGV[3])
local retention = tonumber(ARGV[4])

local now = now_ms()
reap(now, reap_limit, retention)
if limit_arg == '' then
  redis.call('HDEL', K.budget, 'limit')
else
  redis.call('HSET', K.budget, 'limit', limit_arg)
end
redis.call('HSETNX', K.budget, 'customer', customer_id)
local limit, spent, reserved, open = budget_state()
return {limit or false, spent, reserved, open, now}
