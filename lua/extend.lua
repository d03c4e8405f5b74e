-- extend: reserve more on an open reservation, atomically, under every rule a preflight
-- checks: the per-request ceiling (on the reservation's new total), the task's ceiling, the
-- customer's and the agent's budgets (in the periods the reservation was made in, where it is
-- settled) and their rate limits (the extra units pass through GCRA). Concurrency is
-- unaffected: no run is added. A refusal changes no counter (it is written to the ledger, as
-- every decision is). The extra units are part of the reservation from then on: a record
-- charges what it reports and gives the whole back, a release or an expiry gives it all back.
-- The reservation's expiry is unchanged.
--
-- KEYS[1..10] the customer's keys (see _common.lua)
-- KEYS[11]    request record key: this call's reply, so that the client's retry of it (the same
--             request id) is answered the same and reserves nothing more
-- ARGV[1..5]  reap limit, retentions, ledger cap (see _common.lua)
-- ARGV[6]     the fields below, joined by \31 (one argument packs and parses far faster than a
--             dozen; ids hold no control characters):
--    1 reservation id
--    2 units to add (integer >= 1)
--    3 per-request ceiling in units, '' for none
--    4 agent id; it must match the reservation's ('' skips the check)
--    5 request record ttl, ms
-- Reply: one string, these fields packed (see packed() in _common.lua: false is ''):
--        {approved 1|0, reason|false, reservation id|false, expires_ms|false, limit|false,
--         spent, reserved, task ceiling|false, task used, task reserved, now_ms, replayed 1|0,
--         scope|false, rule limit|false, rule used|false, rule reserved|false,
--         retry_after_ms|false, period start|false, period end|false, {crossed thresholds}}
--   as preflight's: spent/reserved are the customer's in the reservation's period, limit and
--   period its current ones; on a refusal the rule numbers are those of the rule that refused
--   (for the ceiling, reserved is what the reservation holds).
-- Errors (nothing written): 'AGENTBILL not_open' when the reservation is not open (recorded,
-- released, expired or never made); 'AGENTBILL agent_mismatch'; 'AGENTBILL overflow units'
-- when a counter would pass 2^53-1.

local A = split(ARGV[6])
local rid = A[1]
local units = tonumber(A[2])
local ceiling = A[3]
local agent = A[4]
local request_ttl = tonumber(A[5])
local request_key = KEYS[11]

local now = now_ms()

-- Everything that could fail, before the first write (reaping included).
local prior = redis.call('GET', request_key)
if prior then
  return prior -- this very request landed before and its reply was lost: the same answer
end
local v = redis.call('HGET', K.res, rid)
local r = v and split(v)
if not r or tonumber(r[6]) <= now then
  return redis.error_reply('AGENTBILL not_open')
end
if agent ~= '' and r[1] ~= agent then
  return redis.error_reply('AGENTBILL agent_mismatch')
end
local est, tf, adig = tonumber(r[4]), r[3], rec(r, 9)
local ap = 'a:' .. adig .. ':'

local cs, as, task
local c, a = {}, {} -- the customer's and the agent's counter fields and values, reservation's periods

local function counters(p, rp, into)
  into.spent_f, into.reserved_f = period_fields(p, rp)
  into.spent, into.reserved = 0, 0
  if into.spent_f then
    local n = redis.call('HMGET', K.budget, into.spent_f, into.reserved_f)
    into.spent, into.reserved = tonumber(n[1] or '0'), tonumber(n[2] or '0')
  end
end

local function read_state()
  cs = scope_read('', now)
  as = scope_read(ap, now, cs)
  counters('', rec(r, 8), c)
  counters(ap, rec(r, 10), a)
  task = {used = 0, reserved = 0}
  if tf ~= '' then
    task.ceiling, task.used, task.reserved = task_state(tf)
  end
end

read_state()
-- Reaping only lowers what is reserved: counters that fit now fit after it.
if est + units > MAX or c.reserved + units > MAX or a.reserved + units > MAX
    or task.reserved + units > MAX then
  return overflow('units')
end
if reap(now) then
  read_state()
end

local function reply(approved, reason, replayed, rule, crossed)
  rule = rule or {}
  return packed({approved, reason, rid, tonumber(r[6]), cs.limit or false, c.spent, c.reserved,
                 task.ceiling or false, task.used, task.reserved, now, replayed,
                 rule.scope or false, rule.limit or false, rule.used or false,
                 rule.reserved or false, rule.retry or false, cs.pstart, cs.pend,
                 crossed or {}}, 20)
end

local function answer(text)
  redis.call('SET', request_key, text, 'PX', request_ttl)
  touch()
  return text
end

-- The reservation's new total under the ceiling; its customer's and agent's counters where it
-- counts; no run added (concurrency unaffected).
local rule, ctat, atat = refusal(units, est + units, ceiling, task, cs, c, as, a, now, 0)
if rule then
  ledger('refused', r[1], r[2], units, 0, rid, rule.reason, rule.scope, rec(r, 8))
  return answer(reply(0, rule.reason, 0, rule))
end

-- Every rule passed: the reservation, and every scope it counts in, hold `units` more.
if c.spent_f then incr(K.budget, c.reserved_f, units) end
if a.spent_f then incr(K.budget, a.reserved_f, units) end
if cs.rl_n then redis.call('HSET', K.budget, 'rl_tat', string.format('%.17g', ctat)) end
if as.rl_n then redis.call('HSET', K.budget, ap .. 'rl_tat', string.format('%.17g', atat)) end
if tf ~= '' then
  incr(K.tasks, tf .. ':r', units)
  task.reserved = task.reserved + units
  task_seen(tf, now)
end
r[4] = fmt(est + units)
redis.call('HSET', K.res, rid, table.concat(r, SEP))
c.reserved = c.reserved + units
ledger('approved', r[1], r[2], units, 0, rid, 'extended', '', rec(r, 8))
local crossed = {}
if rec(r, 8) == cs.pid then
  cs.reserved = cs.reserved + units
  check_thresholds(cs, 'customer', r[1], crossed, rid)
end
if rec(r, 10) == as.pid then
  as.reserved = as.reserved + units
  check_thresholds(as, 'agent', r[1], crossed, rid)
end
return answer(reply(1, false, 0, nil, crossed))
