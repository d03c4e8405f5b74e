-- set_limits: set (or remove) the rate limit or the concurrency limit of the customer or of
-- one of its agents. Takes effect on the next preflight of every worker.
--
-- KEYS[1..8]  the customer's keys (see _common.lua)
-- ARGV[1..3]  reap limit, outcome retention (ms), ledger cap (see _common.lua)
-- ARGV[4] agent digest, '' for the customer
-- ARGV[5] 'rate' or 'concurrency'
-- ARGV[6] rate: units per window (integer >= 1), '' to remove; concurrency: max in flight, ''
-- ARGV[7] rate: window, ms
-- ARGV[8] rate: burst in units
-- ARGV[9] customer id
-- ARGV[10] agent id ('' for the customer)
-- Reply: {customer scope, agent scope|false, now_ms}, as get_budget.

local adig, what, n, per, burst = ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local customer_id, agent = ARGV[9], ARGV[10]
local p = adig == '' and '' or ('a:' .. adig .. ':')

local now = now_ms()
reap(now)
if what == 'rate' then
  if n == '' then
    redis.call('HDEL', K.budget, p .. 'rl_n', p .. 'rl_per', p .. 'rl_burst', p .. 'rl_tat')
  else
    redis.call('HSET', K.budget, p .. 'rl_n', n, p .. 'rl_per', per, p .. 'rl_burst', burst)
  end
elseif n == '' then
  redis.call('HDEL', K.budget, p .. 'cc')
else
  redis.call('HSET', K.budget, p .. 'cc', n)
end
name_scopes(customer_id, p, agent)
return budget_reply(adig, now)
