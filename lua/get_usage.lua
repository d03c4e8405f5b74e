-- get_usage: the customer's budget and its agents' (the most recently active first, at most a
-- Function flags: allow-oom (a Redis over maxmemory still answers it: its only writes return
-- expired reservations, at most the reap limit of them)
-- limit of them), after returning expired reservations: how much is left, how much is held,
-- and by whom. An agent is listed while it is remembered: with a budget or limit, always;
-- otherwise until it has been idle for the idle retention.
--
-- KEYS[1..10] the customer's keys (see _common.lua)
-- ARGV[1..5]  reap limit, retentions, ledger cap (see _common.lua)
-- ARGV[6]     at most this many agents
-- Reply: {customer scope, {agent id, agent scope, ...}, now_ms}

local limit = tonumber(ARGV[6])

local now = now_ms()
if reap(now) then touch() end
local cs = scope_read('', now)
local agents = {}
for _, dig in ipairs(redis.call('ZREVRANGE', K.agents, 0, limit - 1)) do
  local s = scope_read('a:' .. dig .. ':', now, cs)
  if s.name then
    agents[#agents + 1] = s.name
    agents[#agents + 1] = scope_reply(s)
  end
end
return {scope_reply(cs), agents, now}
