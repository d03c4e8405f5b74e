-- get_budget: the customer's budget (and one agent's) after returning expired reservations.
--
-- KEYS[1..8]  the customer's keys (see _common.lua)
-- ARGV[1..3]  reap limit, outcome retention (ms), ledger cap (see _common.lua)
-- ARGV[4] agent digest, '' for the customer alone
-- Reply: {customer scope, agent scope|false, now_ms}; a scope is scope_reply's list.

local adig = ARGV[4]

local now = now_ms()
reap(now)
return budget_reply(adig, now)
