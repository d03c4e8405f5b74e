-- get_usage: the customer's budget and every agent's that ever ran (or has a budget), after
-- returning expired reservations: how much is left, how much is held, and by whom.
--
-- KEYS[1..9]  the customer's keys (see _common.lua)
-- ARGV[1..5]  reap limit, retentions, ledger cap (see _common.lua)
-- Reply: {customer scope, {agent id, agent scope, ...}, now_ms}

local now = now_ms()
if reap(now) then touch() end
local cs = scope_read('', now)
local agents = {}
local all = redis.call('HGETALL', K.budget)
for i = 1, #all, 2 do
  local dig = string.match(all[i], '^a:([0-9a-f]+):name$')
  if dig then
    agents[#agents + 1] = all[i + 1]
    agents[#agents + 1] = scope_reply(scope_read('a:' .. dig .. ':', now, cs))
  end
end
return {scope_reply(cs), agents, now}
