-- estimates: the estimate statistics settle.lua keeps for one (customer, agent), or for one
-- (customer, agent, model) of the LLM wrapper: both generations summed (the last 100 to 200
-- records that closed a reservation; see "Learning" in settle.lua). Reads only.
-- Function flags: no-writes (it reads only, so a Redis over maxmemory still answers it)
--
-- KEYS[1..10] the customer's keys (see _common.lua)
-- KEYS[11]    the statistics hash
-- ARGV[1..5]  reap limit, retentions, ledger cap (see _common.lua)
-- Reply: one string, these fields packed (see packed() in _common.lua: false is ''):
--        {samples, actual units summed, estimates summed, {histogram bins}}
--   a histogram bin is "<bin>:<samples>" (bin_of in settle.lua: -1 for 0 units, else
--   4 * floor(log2 units) + the quarter of its power of two), ascending.

local samples, actual, estimate, items = 0, 0, 0, {}
local zero, one = stats_fields('0'), stats_fields('1')
local v0 = redis.call('HMGET', KEYS[11], unpack(zero))
local v1 = redis.call('HMGET', KEYS[11], unpack(one))
local function n(i)
  return tonumber(v0[i] or '0') + tonumber(v1[i] or '0')
end
samples, actual, estimate = n(1), n(2), n(3)
for i = 4, #zero do
  if n(i) > 0 then
    items[#items + 1] = string.sub(zero[i], 3) .. ':' .. fmt(n(i))
  end
end
return packed({samples, actual, estimate, items}, 4)
