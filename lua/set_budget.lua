-- set_budget: set (or remove, for unlimited) the budget of the customer or of one of its
-- agents: its limit, period, time zone and thresholds. Lowering a limit below what is spent
-- and reserved is allowed: it only refuses new runs. Thresholds are re-armed. A changed
-- period (or zone) starts a new period at once.
--
-- KEYS[1..10] the customer's keys (see _common.lua)
-- ARGV[1..5]  reap limit, retentions, ledger cap (see _common.lua)
-- ARGV[6] agent digest, '' for the customer's own budget
-- ARGV[7] limit in units, '' for unlimited
-- ARGV[8] period: '', 'hour', 'day', 'week' or 'month'
-- ARGV[9] zone table ('<utc_ms>:<offset_ms>,...'), '' for UTC
-- ARGV[10] thresholds: percents joined by ',', '' for none
-- ARGV[11] customer id (stored once, for people reading the keys)
-- ARGV[12] agent id ('' for the customer)
-- Reply: {customer scope, agent scope|false, now_ms}, as get_budget.

local adig, limit, period, tzt, thr = ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local customer_id, agent = ARGV[11], ARGV[12]
local p = adig == '' and '' or ('a:' .. adig .. ':')

-- The zone table and thresholds it stores, checked before its first write: another caller
-- than the clients (a tenant key's own FCALL) could send any length (bounded()).
bounded(tzt, MAX_TZT, 'tzt')
bounded(thr, MAX_THR, 'thr')
-- The thresholds stored before, whose marks are dropped: longer than any agentbill writes
-- (not its own), they are not parsed, so that setting the budget again repairs the scope.
local old = redis.call('HGET', K.budget, p .. 'thr') or ''
if #old > MAX_THR then old = '' end
local now = now_ms()
reap(now)
for pct in string.gmatch(old .. ',' .. thr, '%d+') do
  redis.call('HDEL', K.budget, p .. 'thr:' .. pct)
end
local function put(field, value)
  if value == '' then
    redis.call('HDEL', K.budget, p .. field)
  else
    redis.call('HSET', K.budget, p .. field, value)
  end
end
put('limit', limit)
put('period', period)
put('tzt', tzt)
put('thr', thr)
name_scopes(customer_id, p, agent, adig, now)
if limit ~= '' or period ~= '' or thr ~= '' then
  redis.call('HSET', K.budget, 'policy', '1')
end
touch()
return budget_reply(adig, now)
