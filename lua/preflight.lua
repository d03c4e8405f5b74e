-- preflight: check every rule and only if all pass reserve the estimate on every scope. One
-- call, atomic: the per-request ceiling, the task ceiling, the customer's and the agent's
-- budget in their current periods, their rate limits (GCRA) and their concurrency limits. A
-- refusal changes no counter (it is written to the ledger, as every decision is).
--
-- KEYS[1..10] the customer's keys (see _common.lua)
-- KEYS[11]    idempotency record key (same hash tag; unused when field 10 is '')
-- ARGV[1..5]  reap limit, retentions, ledger cap (see _common.lua)
-- ARGV[6]     the fields below, joined by \31 (one argument packs and parses far faster than a
--             dozen; ids hold no control characters):
--    1 reservation id to create (client-made, so a retried call finds its own reservation)
--    2 estimated units (integer >= 0)
--    3 per-request ceiling in units, '' for none
--    4 reservation ttl, ms
--    5 agent id
--    6 task_ref, '' for none
--    7 task digest, '' for none
--    8 task ceiling in units, used only if this call opens the task, '' for none
--    9 group digest of (agent, task_ref): a record without an id closes one of its group
--   10 request fingerprint when an idempotency key is given, else ''
--   11 idempotency record ttl, ms
--   12 customer id (stored once, for people reading the keys)
--   13 agent digest (the agent's scope: fields 'a:<digest>:...')
--   14 '1' a record without an id may close this reservation, '0' only a request naming it
-- Reply: one string, these fields packed (see packed() in _common.lua: false is ''):
--        {approved 1|0, reason|false, reservation id|false, expires_ms|false, limit|false,
--         spent, reserved, task ceiling|false, task used, task reserved, now_ms, replayed 1|0,
--         scope|false, rule limit|false, rule used|false, rule reserved|false,
--         retry_after_ms|false, period start|false, period end|false, {crossed thresholds}}
--   spent/reserved/limit/period are the customer's in its current period; on a refusal the
--   rule numbers are those of the rule that refused, scope one of request, task, customer,
--   agent; a crossed threshold is "<scope>:<percent>:<committed units>".
-- Errors (nothing written): 'AGENTBILL idempotency_conflict' when the key was used with other
-- arguments; 'AGENTBILL overflow estimated_units' when reserving would take a counter past 2^53-1.

local A = split(ARGV[6], 14)
local rid = A[1]
local units = tonumber(A[2])
local ceiling = A[3]
local ttl = tonumber(A[4])
local agent, task_ref, tf = A[5], A[6], A[7]
local task_ceiling = A[8]
local group = A[9]
local fingerprint = A[10]
local idem_ttl = A[11]
local customer_id = A[12]
local adig = A[13]
local adoptable = A[14] == '1'
local idem_key = KEYS[11]

local now = now_ms()
local now_s = fmt(now)

local cs, as -- the customer's and the agent's scope (cs also holds policy, customer, seq)
local task = {used = 0, reserved = 0, exists = false}

local function read_state()
  cs = scope_read('', now)
  as = scope_read('a:' .. adig .. ':', now, cs)
  task = {used = 0, reserved = 0, exists = false}
  if tf ~= '' then
    task.ceiling, task.used, task.reserved, task.exists = task_state(tf)
  end
end

local function reply(approved, reason, id, expires, replayed, rule, crossed)
  rule = rule or {}
  return packed({approved, reason, id, expires, cs.limit or false, cs.spent, cs.reserved,
                 task.ceiling or false, task.used, task.reserved, now_s, replayed,
                 rule.scope or false, rule.limit or false, rule.used or false,
                 rule.reserved or false, rule.retry or false, cs.pstart, cs.pend,
                 crossed or {}}, 20)
end

-- Everything that could fail, before the first write (reaping included).
local prior = false
if fingerprint ~= '' then
  local v = redis.call('GET', idem_key)
  if v then
    local f = split(v)
    if f[1] ~= fingerprint then
      return redis.error_reply('AGENTBILL idempotency_conflict')
    end
    prior = f[2]
  end
end
read_state()
-- A scope with a limit never reserves past it (at most 2^53-1); one without could. Reaping
-- only lowers what is reserved, so counters that fit now fit after it.
local function fits(limit, reserved)
  return limit or reserved + units <= MAX
end
local risky = not (fits(cs.limit, cs.reserved) and fits(as.limit, as.reserved)
                   and fits(task.ceiling or (task_ceiling ~= '' and not task.exists), task.reserved))
if risky and due(now) then
  return overflow('estimated_units') -- decided before reaping writes anything
end

if reap(now, 0, now_s) then
  read_state()
end

-- A repeat of an approved request (same idempotency key, or the client's retry of the same
-- call after a lost reply) returns the first decision and holds nothing more. The reservation
-- id is the call's request id: finding our own id means our first attempt's reply was lost,
-- which is not a replay for the caller. (Our own id is also found closed when it was released
-- before this call landed: a cancelled caller released it; it must not reserve now.)
if not prior and (redis.call('HEXISTS', K.res, rid) == 1 or redis.call('HEXISTS', K.closed, rid) == 1) then
  prior = rid
end
if prior then
  local expires = false
  local open = redis.call('HGET', K.res, prior)
  if open and prior ~= rid and tonumber(split(open)[6]) <= now then
    -- Due but not reaped yet (more were due than the reap limit): it holds nothing from now
    -- on, so it expires here, and the key reserves afresh below, as for any expired one.
    close_reservation(prior, split(open), 'expired', 0, now, '', '1')
    read_state()
    prior = false
  elseif open then
    expires = tonumber(split(open)[6])
  else
    local closed = redis.call('HGET', K.closed, prior)
    if closed then
      local o = split(closed)
      expires = tonumber(o[7])
      -- A key whose reservation was released or expired unused holds nothing and charged
      -- nothing: replaying it would let the run go ahead unreserved and uncharged (a retried
      -- job, say). Such a key reserves afresh below and points at the new reservation.
      if prior ~= rid and (o[1] == 'released' or o[1] == 'expired') then
        prior = false
      end
    end
  end
  if prior then
    return reply(1, false, prior, expires, prior == rid and 0 or 1)
  end
end

if tf ~= '' and not task.exists and task_ceiling ~= '' then
  task.ceiling = tonumber(task_ceiling) -- the ceiling this call would open the task with
end

local rule, ctat, atat = refusal(units, units, ceiling, task, cs, cs, as, as, now, 1)
if not rule and (cs.reserved + units > MAX or as.reserved + units > MAX or task.reserved + units > MAX) then
  return overflow('estimated_units') -- only when `risky`, with nothing reaped: nothing written
end
if rule then
  ledger('refused', agent, task_ref, units, 0, '', rule.reason, rule.scope, cs.pid)
  touch(cs.policy)
  return reply(0, rule.reason, false, false, 0, rule)
end

-- Every rule passed: reserve on every scope. The counters are written in one HSET, their new
-- values computed from those read above (nothing else runs between).
scope_roll(cs, now)
scope_roll(as, now)
local seq = num(cs.seq) + 1
local w = {'seq', fmt(seq), 'open', fmt(cs.open + 1), as.p .. 'open', fmt(as.open + 1)}
if units ~= 0 then
  w[#w + 1], w[#w + 2] = 'reserved', fmt(cs.reserved + units)
  w[#w + 1], w[#w + 2] = as.p .. 'reserved', fmt(as.reserved + units)
end
if not cs.customer then
  w[#w + 1], w[#w + 2] = 'customer', customer_id
end
if not as.name then
  w[#w + 1], w[#w + 2] = as.p .. 'name', agent
end
if cs.rl_n then
  w[#w + 1], w[#w + 2] = 'rl_tat', string.format('%.17g', ctat)
end
if as.rl_n then
  w[#w + 1], w[#w + 2] = as.p .. 'rl_tat', string.format('%.17g', atat)
end
redis.call('HSET', K.budget, unpack(w))
agent_seen(adig, now)
if tf ~= '' then
  if not task.exists then
    redis.call('HSET', K.tasks, tf .. ':n', task_ref)
    if task_ceiling ~= '' then
      redis.call('HSET', K.tasks, tf .. ':c', task_ceiling)
    end
  end
  incr(K.tasks, tf .. ':r', units)
  task.reserved = task.reserved + units
  task_seen(tf, now)
end
cs.reserved, cs.open = cs.reserved + units, cs.open + 1
as.reserved, as.open = as.reserved + units, as.open + 1
local expires = now + ttl
local expires_s = fmt(expires)
local member = ''
if adoptable then
  member = group .. ':' .. string.format('%016d', seq) .. ':' .. rid
  redis.call('ZADD', K.open, '0', member)
end
local record = {agent, task_ref, tf, fmt(units), now_s, expires_s, member, cs.pid, adig, as.pid}
redis.call('HSET', K.res, rid, table.concat(record, SEP))
redis.call('ZADD', K.exp, expires_s, rid)
if fingerprint ~= '' then
  redis.call('SET', idem_key, fingerprint .. SEP .. rid, 'PX', idem_ttl)
end
ledger('approved', agent, task_ref, units, 0, rid, '', '', cs.pid)
local crossed = {}
check_thresholds(cs, 'customer', agent, crossed, rid)
check_thresholds(as, 'agent', agent, crossed, rid)
touch(cs.policy)
return reply('1', false, rid, expires_s, '0', nil, crossed)
