-- preflight: check the per-request ceiling, the task ceiling and the customer budget, and only
-- if all pass reserve the estimate on every scope. One call, atomic; a refusal writes nothing.
--
-- KEYS[1..7]  the customer's keys (see _common.lua)
-- KEYS[8]     idempotency record key (same hash tag; unused when ARGV[10] is '')
-- ARGV[1]  reservation id to create (client-made, so a retried call finds its own reservation)
-- ARGV[2]  estimated units (integer >= 0)
-- ARGV[3]  per-request ceiling in units, '' for none
-- ARGV[4]  reservation ttl, ms
-- ARGV[5]  agent id
-- ARGV[6]  task_ref, '' for none
-- ARGV[7]  task digest, '' for none
-- ARGV[8]  task ceiling in units, used only if this call opens the task, '' for none
-- ARGV[9]  group digest of (agent, task_ref): record() without an id closes its oldest
-- ARGV[10] request fingerprint when an idempotency key is given, else ''
-- ARGV[11] idempotency record ttl, ms
-- ARGV[12] reap limit (max expired reservations returned by this call)
-- ARGV[13] outcome retention, ms
-- ARGV[14] customer id (stored once, for people reading the keys)
-- Reply: {approved 1|0, reason|false, reservation id|false, expires_ms|false, limit|false,
--         spent, reserved, task ceiling|false, task used, task reserved, now_ms, replayed 1|0}
-- Error: 'AGENTBILL idempotency_conflict' when the key was used with other arguments.

local rid = ARGV[1]
local units = tonumber(ARGV[2])
local ceiling = ARGV[3]
local ttl = tonumber(ARGV[4])
local agent, task_ref, tf = ARGV[5], ARGV[6], ARGV[7]
local task_ceiling = ARGV[8]
local group = ARGV[9]
local fingerprint = ARGV[10]
local idem_ttl = tonumber(ARGV[11])
local reap_limit = tonumber(ARGV[12])
local retention = tonumber(ARGV[13])
local customer_id = ARGV[14]
local idem_key = KEYS[8]

local now = now_ms()
reap(now, reap_limit, retention)

-- The counters this call reads once: budget, and the task when there is one.
local function read_state()
  local st = {tused = 0, tres = 0, task_exists = false}
  st.limit, st.spent, st.reserved = budget_state()
  if tf ~= '' then
    st.tceil, st.tused, st.tres, st.task_exists = task_state(tf)
  end
  return st
end

local function reply(approved, reason, id, expires, replayed, st)
  return {approved, reason, id, expires, st.limit or false, st.spent, st.reserved,
          st.tceil or false, st.tused, st.tres, now, replayed}
end

-- A repeat of an approved request (same idempotency key, or the client's retry of the same
-- call after a lost reply) returns the first decision and holds nothing more. The reservation
-- id is the call's request id: finding our own id means our first attempt's reply was lost,
-- which is not a replay for the caller.
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
if not prior and (redis.call('HEXISTS', K.res, rid) == 1 or redis.call('HEXISTS', K.closed, rid) == 1) then
  prior = rid
end
if prior then
  local expires = false
  local open = redis.call('HGET', K.res, prior)
  if open then
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
    return reply(1, false, prior, expires, prior == rid and 0 or 1, read_state())
  end
end

-- Check every rule before writing anything.
local st = read_state()
if tf ~= '' and not st.task_exists and task_ceiling ~= '' then
  st.tceil = tonumber(task_ceiling) -- the ceiling this call would open the task with
end
local reason = false
if ceiling ~= '' and units > tonumber(ceiling) then
  reason = 'ceiling_exceeded'
elseif st.tceil and st.tused + st.tres + units > st.tceil then
  reason = 'task_ceiling_exceeded'
elseif st.limit and st.spent + st.reserved + units > st.limit then
  reason = 'budget_exhausted'
end
if reason then
  return reply(0, reason, false, false, 0, st)
end

-- Every rule passed: reserve on every scope.
local seq = incr(K.budget, 'seq', 1)
incr(K.budget, 'reserved', units)
incr(K.budget, 'open', 1)
redis.call('HSETNX', K.budget, 'customer', customer_id)
if tf ~= '' then
  if not st.task_exists then
    redis.call('HSET', K.tasks, tf .. ':n', task_ref)
    if task_ceiling ~= '' then
      redis.call('HSET', K.tasks, tf .. ':c', task_ceiling)
    end
  end
  incr(K.tasks, tf .. ':r', units)
  st.tres = st.tres + units
end
st.reserved = st.reserved + units
local expires = now + ttl
local member = group .. ':' .. string.format('%016d', seq) .. ':' .. rid
local record = {agent, task_ref, tf, fmt(units), fmt(now), fmt(expires), member}
redis.call('HSET', K.res, rid, table.concat(record, SEP))
redis.call('ZADD', K.exp, expires, rid)
redis.call('ZADD', K.open, 0, member)
if fingerprint ~= '' then
  redis.call('SET', idem_key, fingerprint .. SEP .. rid, 'PX', idem_ttl)
end
return reply(1, false, rid, expires, 0, st)
