-- set_limits: set (or remove) the rate limit or the concurrency limit of the customer or of
-- one of its agents. Takes effect on the next preflight of every worker.
--
-- KEYS[1..10] the customer's keys (see _common.lua)
-- ARGV[1..5]  reap limit, retentions, ledger cap (see _common.lua)
-- ARGV[6] agent digest, '' for the customer
-- ARGV[7] 'rate' or 'concurrency'
-- ARGV[8] rate: units per window (integer >= 1), '' to remove; concurrency: max in flight, ''
-- ARGV[9] rate: window, ms
-- ARGV[10] rate: burst in units
-- ARGV[11] customer id
-- ARGV[12] agent id ('' for the customer)
-- Reply: {customer scope, agent scope|false, now_ms}, as get_budget.

local adig, what, n, per, burst = ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local customer_id, agent = ARGV[11], ARGV[12]
local p = adig == '' and '' or ('a:' .. adig .. ':')

local now = now_ms()
budget_reply(adig, now) -- its stored values checked (bounded()) before the first write
reap(now)
if what == 'rate' then
  if n == '' then
    redis.call('HDEL', K.budget, p .. 'rl_n', p .. 'rl_per', p .. 'rl_burst', p .. 'rl_tat')
  else
    -- Units already taken under the old rate still count, at the new rate: the stored
    -- arrival time is ahead of now by (units taken) x (old interval); rescale that lead to
    -- the new interval, so a raised (or lowered) rate applies from the next preflight.
    local v = redis.call('HMGET', K.budget, p .. 'rl_n', p .. 'rl_per', p .. 'rl_tat')
    local tat = tonumber(v[3] or '0')
    if v[1] and tat > now then
      local old = tonumber(v[2]) / tonumber(v[1])
      local new = tonumber(per) / tonumber(n)
      redis.call('HSET', K.budget, p .. 'rl_tat', string.format('%.17g', now + (tat - now) * new / old))
    end
    redis.call('HSET', K.budget, p .. 'rl_n', n, p .. 'rl_per', per, p .. 'rl_burst', burst)
  end
elseif n == '' then
  redis.call('HDEL', K.budget, p .. 'cc')
else
  redis.call('HSET', K.budget, p .. 'cc', n)
end
name_scopes(customer_id, p, agent, adig, now)
if n ~= '' then
  redis.call('HSET', K.budget, 'policy', '1')
end
touch()
return budget_reply(adig, now)
