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

-- At most MAX_ITEMS agents (the clients' bound, limit in get_usage) whoever asks: each one listed
-- costs a read of its scope, and a caller other than agentbill's clients (a tenant key's own
-- FCALL) could ask for '0' or '-1' (ZREVRANGE 0 -1: every agent; 100,000 of them held Redis
-- over 5 s, past the BUSY threshold). Checked before reaping: an error writes nothing.
local limit = count(ARGV[6], 'agent_limit')

local now = now_ms()
local function usage()
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
end
-- Read before reaping, so a stored value too long to parse (bounded() in _common.lua) fails
-- the call before it writes anything; read again only if reaping changed a counter or agent.
local reply = usage()
if reap(now) then
  touch()
  reply = usage()
end
return reply
