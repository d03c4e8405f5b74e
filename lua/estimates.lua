-- estimates: the estimate statistics settle.lua keeps for one (customer, agent), or for one
-- (customer, agent, model) of the LLM wrapper: both generations summed (the last 100 to 200
-- records that closed a reservation; see "Learning" in settle.lua). Reads only.
--
-- KEYS[1..10] the customer's keys (see _common.lua)
-- KEYS[11]    the statistics hash
-- ARGV[1..5]  reap limit, retentions, ledger cap (see _common.lua)
-- Reply: one string, these fields packed (see packed() in _common.lua: false is ''):
--        {samples, actual units summed, estimates summed, {histogram bins}}
--   a histogram bin is "<bin>:<samples>" (bin_of in settle.lua: -1 for 0 units, else
--   4 * floor(log2 units) + the quarter of its power of two), in no particular order.

local samples, actual, estimate, bins = 0, 0, 0, {}
local flat = redis.call('HGETALL', KEYS[11])
for i = 1, #flat, 2 do
  local f, n = flat[i], tonumber(flat[i + 1])
  local kind = string.sub(f, 2)
  if kind == 'n' then
    samples = samples + n
  elseif kind == 'a' then
    actual = actual + n
  elseif kind == 'e' then
    estimate = estimate + n
  elseif string.sub(kind, 1, 1) == ':' then
    local bin = string.sub(kind, 2)
    bins[bin] = (bins[bin] or 0) + n
  end
end
local items = {}
for bin, n in pairs(bins) do
  items[#items + 1] = bin .. ':' .. fmt(n)
end
return packed({samples, actual, estimate, items}, 4)
