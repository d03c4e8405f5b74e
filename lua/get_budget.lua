-- get_budget: the customer's budget (and one agent's) after returning expired reservations.
-- Function flags: allow-oom (a Redis over maxmemory still answers it: its only writes return
-- expired reservations, at most the reap limit of them)
--
-- KEYS[1..10] the customer's keys (see _common.lua)
-- ARGV[1..5]  reap limit, retentions, ledger cap (see _common.lua)
-- ARGV[6] agent digest, '' for the customer alone
-- Reply: {customer scope, agent scope|false, now_ms}; a scope is scope_reply's list.

local adig = ARGV[6]

local now = now_ms()
-- Read before reaping, so a stored value too long to parse (bounded() in _common.lua) fails
-- the call before it writes anything; read again only if reaping changed a counter.
local reply = budget_reply(adig, now)
if reap(now) then
  touch()
  reply = budget_reply(adig, now)
end
return reply
