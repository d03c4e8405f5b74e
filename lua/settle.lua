-- settle: close a reservation (record() charges the actual units and releases the rest;
-- release() charges nothing), or charge directly when there is no reservation to close.
--
-- KEYS[1..7]  the customer's keys (see _common.lua)
-- KEYS[8]     idempotency record key (same hash tag; unused when ARGV[8] is '')
-- ARGV[1]  reservation id, or '' to close the oldest open reservation of ARGV[7]'s group
-- ARGV[2]  units actually used, charged in full when ARGV[3] is '1' (integer >= 0)
-- ARGV[3]  '1' charge, '0' release without charging
-- ARGV[4]  agent id; with a reservation id, it must match the reservation ('' skips the check)
-- ARGV[5]  task_ref, '' for none
-- ARGV[6]  task digest; with a reservation id, it must match when given ('' for none)
-- ARGV[7]  group digest of (agent, task_ref)
-- ARGV[8]  request fingerprint when an idempotency key or request id is given, else ''
-- ARGV[9]  idempotency record ttl, ms
-- ARGV[10] reap limit
-- ARGV[11] outcome retention, ms
-- ARGV[12] customer id (stored once, for people reading the keys), '' when not known
-- ARGV[13] request id of this call (the same on the client's retries of it)
-- ARGV[14] '1': the reservation to close is the one the preflight idempotency record KEYS[9]
--          points at (release by idempotency key); anything else: ARGV[1] names it
-- KEYS[9]  that preflight idempotency record key (only with ARGV[14] '1')
-- Reply: {status, reservation id|false, charged, released, late 1|0, replayed 1|0,
--         limit|false, spent, reserved, now_ms}
-- status: 'recorded' closed and charged; 'released' closed, nothing charged; 'late' it had
--         expired, charged now; 'expired' it had expired, nothing to release; 'direct' no
--         reservation, charged directly; 'noop' nothing to close and nothing to charge.
-- Errors: 'AGENTBILL idempotency_conflict', 'AGENTBILL agent_mismatch', 'AGENTBILL task_mismatch'

local rid = ARGV[1]
local units = tonumber(ARGV[2])
local charge = ARGV[3] == '1'
local agent, task_ref, tf = ARGV[4], ARGV[5], ARGV[6]
local group = ARGV[7]
local fingerprint = ARGV[8]
local idem_ttl = tonumber(ARGV[9])
local reap_limit = tonumber(ARGV[10])
local retention = tonumber(ARGV[11])
local customer_id = ARGV[12]
local request = ARGV[13]
local idem_key = KEYS[8]

local now = now_ms()
reap(now, reap_limit, retention)

local function reply(status, id, charged, released, late, replayed)
  local limit, spent, reserved = budget_state()
  return {status, id, charged, released, late, replayed, limit or false, spent, reserved, now}
end

if ARGV[14] == '1' then
  local v = redis.call('GET', KEYS[9])
  if not v then
    return reply('noop', false, 0, 0, 0, 0) -- that preflight reserved nothing (or long ago)
  end
  rid = split(v)[2]
end

if fingerprint ~= '' then
  local v = redis.call('GET', idem_key)
  if v then
    local f = split(v)
    if f[1] ~= fingerprint then
      return redis.error_reply('AGENTBILL idempotency_conflict')
    end
    local id = f[3] ~= '' and f[3] or false
    -- Our own request id: the first attempt's reply was lost; answer as it would have.
    local replayed = f[7] == request and 0 or 1
    return reply(f[2], id, tonumber(f[4]), tonumber(f[5]), tonumber(f[6]), replayed)
  end
end

local function remember(status, id, charged, released, late)
  if fingerprint ~= '' then
    local v = {fingerprint, status, id or '', fmt(charged), fmt(released), fmt(late), request}
    redis.call('SET', idem_key, table.concat(v, SEP), 'PX', idem_ttl)
  end
  return reply(status, id, charged, released, late, 0)
end

-- Charge `units` with no reservation to close: to the customer, and to the task if named.
local function charge_scopes()
  incr(K.budget, 'spent', units)
  if customer_id ~= '' then
    redis.call('HSETNX', K.budget, 'customer', customer_id)
  end
  if tf ~= '' then
    redis.call('HSETNX', K.tasks, tf .. ':n', task_ref)
    incr(K.tasks, tf .. ':u', units)
  end
end

local function close_open(id, r)
  if agent ~= '' and r[1] ~= agent then
    return redis.error_reply('AGENTBILL agent_mismatch')
  end
  if tf ~= '' and r[3] ~= tf then
    return redis.error_reply('AGENTBILL task_mismatch')
  end
  local charged = charge and units or 0
  close_reservation(id, r, charge and 'recorded' or 'released', charged, now, retention, request)
  return remember(charge and 'recorded' or 'released', id, charged, tonumber(r[4]), 0)
end

if rid == '' then
  local oldest = redis.call('ZRANGEBYLEX', K.open, '[' .. group .. ':', '(' .. group .. ';', 'LIMIT', 0, 1)
  if #oldest == 0 then
    if not charge or units == 0 then
      return remember('noop', false, 0, 0, 0)
    end
    charge_scopes()
    return remember('direct', false, units, 0, 0)
  end
  local id = string.match(oldest[1], '^[^:]*:[^:]*:(.*)$')
  return close_open(id, split(redis.call('HGET', K.res, id)))
end

local open = redis.call('HGET', K.res, rid)
if open then
  return close_open(rid, split(open))
end

local closed = redis.call('HGET', K.closed, rid)
if not closed then
  -- Not open and no outcome remembered (older than the retention, or made while Redis was
  -- unreachable): the work happened, so a record still charges it, flagged late, and the
  -- outcome is remembered like a close so a repeat of the record charges nothing more. A
  -- release has nothing to do.
  if not charge or units == 0 then
    return remember('noop', rid, 0, 0, 1)
  end
  charge_scopes()
  local outcome = {'late', agent, task_ref, tf, '0', fmt(now), fmt(now), '', fmt(units), fmt(now), request}
  redis.call('HSET', K.closed, rid, table.concat(outcome, SEP))
  redis.call('ZADD', K.closedx, now + retention, rid)
  return remember('late', rid, units, 0, 1)
end

local o = split(closed)
if o[1] == 'expired' and charge and units > 0 then
  -- The reservation expired before this record arrived: its estimate is already back in the
  -- budget; charge what was used, once, against the scopes it was reserved on.
  incr(K.budget, 'spent', units)
  if o[4] ~= '' then
    incr(K.tasks, o[4] .. ':u', units)
  end
  o[1] = 'late'
  o[9] = fmt(units)
  o[11] = request
  redis.call('HSET', K.closed, rid, table.concat(o, SEP))
  return remember('late', rid, units, 0, 1)
end
-- Closed before: a second close is a no-op that returns the first outcome. Closed by this very
-- request (the client's retry after a lost reply): answer exactly as the first attempt did.
local late = (o[1] == 'late' or o[1] == 'expired') and 1 or 0
if o[11] == request then
  local released = (o[1] == 'recorded' or o[1] == 'released') and tonumber(o[5]) or 0
  return reply(o[1], rid, tonumber(o[9]), released, late, 0)
end
return reply(o[1], rid, tonumber(o[9]), 0, late, 1)
