-- settle: close a reservation (record() charges the actual units and releases the rest;
-- release() charges nothing), or charge directly when there is no reservation to close.
-- A reservation's units are charged to the periods it was reserved in; a direct charge to
-- the current ones.
--
-- KEYS[1..8]  the customer's keys (see _common.lua)
-- KEYS[9]     idempotency record key (same hash tag; unused when field 8 is '')
-- KEYS[10]    with field 12 '1': the preflight idempotency record naming the reservation
-- ARGV[1..3]  reap limit, outcome retention (ms), ledger cap (see _common.lua)
-- ARGV[4]     the fields below, joined by \31 (one argument packs and parses far faster than a
--             dozen; ids hold no control characters):
--    1 reservation id, or '' to close the oldest open reservation of field 7's group
--    2 units actually used, charged in full when field 3 is '1' (integer >= 0)
--    3 '1' charge, '0' release without charging
--    4 agent id; with a reservation id, it must match the reservation ('' skips the check)
--    5 task_ref, '' for none
--    6 task digest; with a reservation id, it must match when given ('' for none)
--    7 group digest of (agent, task_ref)
--    8 request fingerprint when an idempotency key or request id is given, else ''
--    9 idempotency record ttl, ms
--   10 customer id (stored once, for people reading the keys), '' when not known
--   11 request id of this call (the same on the client's retries of it)
--   12 '1': release the reservation KEYS[10] points at (release by idempotency key)
--   13 agent digest, for a direct charge ('' when the agent is not known)
-- Reply: one string, these fields packed (see packed() in _common.lua: false is ''):
--        {status, reservation id|false, charged, released, late 1|0, replayed 1|0,
--         limit|false, spent, reserved, now_ms, {crossed thresholds}}
-- status: 'recorded' closed and charged; 'released' closed, nothing charged; 'late' it had
--         expired (or was never seen), charged now; 'expired' it had expired, nothing to
--         release; 'direct' no reservation, charged directly; 'noop' nothing to do.
-- Errors: 'AGENTBILL idempotency_conflict', 'AGENTBILL agent_mismatch', 'AGENTBILL task_mismatch'

local A = split(ARGV[4])
local rid = A[1]
local units = tonumber(A[2])
local charge = A[3] == '1'
local agent, task_ref, tf = A[4], A[5], A[6]
local group = A[7]
local fingerprint = A[8]
local idem_ttl = tonumber(A[9])
local customer_id = A[10]
local request = A[11]
local adig = A[13]
local idem_key = KEYS[9]

local now = now_ms()
reap(now)
local crossed = {}
local charged_cs = false -- the customer's state after the charge, if after_charge read it

local function reply(status, id, charged, released, late, replayed)
  local cs = charged_cs or scope_read('', now)
  return packed({status, id, charged, released, late, replayed, cs.limit or false, cs.spent,
                 cs.reserved, now, crossed}, 11)
end

-- Thresholds the customer, and the agent `dig`, may have crossed after a charge.
local function after_charge(dig, who)
  local cs = scope_read('', now)
  charged_cs = cs -- nothing after this changes the counters: the reply reuses it
  check_thresholds(cs, 'customer', who, crossed)
  if dig ~= '' then
    check_thresholds(scope_read('a:' .. dig .. ':', now, cs), 'agent', who, crossed)
  end
end

if A[12] == '1' then
  local v = redis.call('GET', KEYS[10])
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
    -- Our own request id: the first attempt's reply was lost; answer as it would have. Any
    -- other request gave nothing back itself: released is the first call's alone.
    if f[7] == request then
      return reply(f[2], id, tonumber(f[4]), tonumber(f[5]), tonumber(f[6]), 0)
    end
    return reply(f[2], id, tonumber(f[4]), 0, tonumber(f[6]), 1)
  end
end

local function remember(status, id, charged, released, late)
  if fingerprint ~= '' then
    local v = {fingerprint, status, id or '', fmt(charged), fmt(released), fmt(late), request}
    redis.call('SET', idem_key, table.concat(v, SEP), 'PX', idem_ttl)
  end
  return reply(status, id, charged, released, late, 0)
end

-- Charge `units` with no reservation to close: to the customer and the agent in their
-- current periods, and to the task if named.
local function charge_now(reason, id)
  local cs = scope_read('', now)
  scope_roll(cs)
  incr(K.budget, 'spent', units)
  if adig ~= '' then
    local as = scope_read('a:' .. adig .. ':', now, cs)
    scope_roll(as)
    incr(K.budget, as.p .. 'spent', units)
    if not as.name then
      redis.call('HSET', K.budget, as.p .. 'name', agent)
    end
  end
  if customer_id ~= '' then
    redis.call('HSETNX', K.budget, 'customer', customer_id)
  end
  if tf ~= '' then
    redis.call('HSETNX', K.tasks, tf .. ':n', task_ref)
    incr(K.tasks, tf .. ':u', units)
  end
  ledger('recorded', agent, task_ref, units, 0, id or '', reason, '', cs.pid)
  after_charge(adig, agent)
  return cs.pid
end

local function close_open(id, r)
  if agent ~= '' and r[1] ~= agent then
    return redis.error_reply('AGENTBILL agent_mismatch')
  end
  if tf ~= '' and r[3] ~= tf then
    return redis.error_reply('AGENTBILL task_mismatch')
  end
  local charged = charge and units or 0
  local status = charge and 'recorded' or 'released'
  close_reservation(id, r, status, charged, now, request)
  if charged > 0 then
    after_charge(r[9] or '', r[1])
  end
  return remember(status, id, charged, tonumber(r[4]), 0)
end

if rid == '' then
  local oldest = redis.call('ZRANGEBYLEX', K.open, '[' .. group .. ':', '(' .. group .. ';', 'LIMIT', 0, 1)
  if #oldest == 0 then
    if not charge or units == 0 then
      return remember('noop', false, 0, 0, 0)
    end
    charge_now('direct', false)
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
  local pid = charge_now('late', rid)
  local outcome = {'late', agent, task_ref, tf, '0', fmt(now), fmt(now), '', fmt(units),
                   fmt(now), request, pid, adig, ''}
  redis.call('HSET', K.closed, rid, table.concat(outcome, SEP))
  redis.call('ZADD', K.closedx, now + RETENTION, rid)
  return remember('late', rid, units, 0, 1)
end

local o = split(closed)
if o[1] == 'expired' and charge and units > 0 then
  -- The reservation expired before this record arrived: its estimate is already back in the
  -- budget; charge what was used, once, against the scopes and periods it was reserved in.
  scope_settle('', o[12] or '', 0, units)
  if (o[13] or '') ~= '' then
    scope_settle('a:' .. o[13] .. ':', o[14] or '', 0, units)
  end
  if o[4] ~= '' then
    incr(K.tasks, o[4] .. ':u', units)
  end
  o[1] = 'late'
  o[9] = fmt(units)
  o[11] = request
  redis.call('HSET', K.closed, rid, table.concat(o, SEP))
  ledger('recorded', o[2], o[3], units, 0, rid, 'late', '', o[12] or '')
  after_charge(o[13] or '', o[2])
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
