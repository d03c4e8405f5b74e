-- settle: close a reservation (record() charges the actual units and releases the rest;
-- release() charges nothing), or charge directly when there is no reservation to close.
-- A reservation's units are charged to the periods it was reserved in; a direct charge to
-- the current ones.
--
-- Every unit a record reports is charged exactly once:
-- - A record naming a reservation closed before by a record naming it (or by this very
--   request: the client's retry) changes nothing and answers with that first close.
-- - A record naming a reservation that a release, its expiry or a record without an id (of
--   another worker, say) closed before charges its units now, status 'late': a release never
--   erases a record, and a record never answers with another request's outcome.
-- - A record naming an id Redis never saw (an offline run; an outcome past its retention)
--   charges its units now, 'late'.
-- - A release of a closed reservation changes nothing; a release of an id Redis never saw
--   remembers it as released (so a preflight of that id landing late reserves nothing).
-- - A record of an id Redis never saw that a preflight under an idempotency key approved
--   offline (field 16; without an id, `prefer` is that id) also writes that preflight's idempotency record naming it, as the
--   preflight would have: a later preflight with the key replays the recorded run (a job run
--   again is charged once). Unless the key already names a reservation open or charged.
-- - A record without an id closes the reservation `prefer` (the recording client's own, of
--   the same group) if it is open, else the group's oldest open one, else charges directly.
--
-- Learning: a record that closes an open reservation (status 'recorded') adds its sample
-- (estimate, actual units) to each statistics hash sent: two generations of at most
-- STATS_WINDOW samples each ('g' names the current one, '0' or '1'); per generation <g>n
-- samples, <g>a actual units summed, <g>e estimates summed, and <g>:<bin> samples per
-- log-scale bin of the actual (bin_of: -1 for 0, else 4 per power of 2, so a bin is at most
-- 25% wide). When the current generation is full, the older one is dropped and a new one
-- started: the statistics cover the last STATS_WINDOW to 2 * STATS_WINDOW samples. A sample
-- whose sums would pass 2^53-1 is not added. Each hash expires after the idle retention
-- without a sample.
--
-- KEYS[1..10] the customer's keys (see _common.lua)
-- KEYS[11]    idempotency record key (same hash tag; unused when field 8 is '')
-- KEYS[12]    with field 12 '1': the preflight idempotency record naming the reservation; with
--             field 16: the record of the preflight that approved the reservation offline (else,
--             when a later key is sent, any key of the customer's: unused)
-- KEYS[13]    the estimate statistics of (customer, agent) a record closing an open reservation
--             adds its sample to (see Learning)
-- KEYS[14]    a second statistics hash it adds the sample to (the wrapper's (customer, agent,
--             model))
-- ARGV[1..5]  reap limit, retentions, ledger cap (see _common.lua)
-- ARGV[6]     the fields below, joined by \31 (one argument packs and parses far faster than a
--             dozen; ids hold no control characters):
--    1 reservation id, or '' to close an open reservation of field 7's group
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
--   12 '1': release the reservation KEYS[12] points at (release by idempotency key)
--   13 agent digest, for a direct charge ('' when the agent is not known)
--   14 without a reservation id: the reservation to close first if it is open ('' for none)
--   15 '1': this release rolls back an approval of a failed batch (its threshold crossings
--      are taken back)
--   16 the fingerprint of the preflight that approved the reservation (without an id: field
--      14's) offline under an idempotency key (KEYS[12] its record), '' for none; without an
--      id, such a reservation Redis never saw is the one the record closes
--   17 that preflight's idempotency record ttl, ms ('' with field 16 '')
-- Reply: one string, these fields packed (see packed() in _common.lua: false is ''):
--        {status, reservation id|false, charged, released, late 1|0, replayed 1|0,
--         limit|false, spent, reserved, now_ms, {crossed thresholds}, agent id|false}
-- status: 'recorded' closed and charged; 'released' closed, nothing charged; 'late' charged
--         now although its reservation was closed or expired before (or Redis never saw it);
--         'expired' it had expired, nothing to release; 'direct' no reservation, charged
--         directly; 'noop' nothing to do. The agent id is the one whose budget an agent's
--         crossed threshold is.
-- Errors (nothing written): 'AGENTBILL idempotency_conflict', 'AGENTBILL agent_mismatch',
-- 'AGENTBILL task_mismatch', 'AGENTBILL overflow units' (a counter would pass 2^53-1).

local A = split(ARGV[6], 17)
local rid = A[1]
local units = tonumber(A[2])
local charge = A[3] == '1' and units > 0
local releasing = A[3] ~= '1'
local agent, task_ref, tf = A[4], A[5], A[6]
local group = A[7]
local fingerprint = A[8]
local idem_ttl = tonumber(A[9])
local customer_id = A[10]
local request = A[11]
local adig = A[13]
local prefer = A[14] or ''
local rollback = A[15] == '1'
local offline_fp = A[16] or ''
local offline_ttl = tonumber(A[17] or '')
local idem_key = KEYS[11]
local STATS_WINDOW = 100 -- samples per generation of the estimate statistics

-- The log-scale bin of `x` units: -1 for 0; else 4 * floor(log2 x) plus which quarter of its
-- power of two x is in (exact: frexp splits a double without rounding).
local function bin_of(x)
  if x <= 0 then
    return -1
  end
  local m, e = math.frexp(x) -- x = m * 2^e, 0.5 <= m < 1
  return (e - 1) * 4 + math.floor((2 * m - 1) * 4)
end

local now = now_ms()
local crossed = {}
local who = false     -- the agent whose budget an agent crossing is
local charged_cs = false -- the customer's state after the charge, if after_charge read it

local function reply(cs, status, id, charged, released, late, replayed)
  return packed({status, id, charged, released, late, replayed, cs.limit or false, cs.spent,
                 cs.reserved, now, crossed, who}, 12)
end

-- Every answer but an error: expired reservations are returned first (as every script call
-- does; here after deciding, so that an error leaves Redis exactly as it was).
local expired_here = 0 -- due reservations this call expired itself, before reaping
local function finish(status, id, charged, released, late, replayed)
  if reap(now, expired_here) then
    charged_cs = false
  end
  local cs = charged_cs or scope_read('', now)
  touch(cs.policy) -- read with the customer's scope: no second read of it
  return reply(cs, status, id, charged, released, late, replayed)
end

-- -- what this call does, decided before anything is written --------------------------------

if A[12] == '1' then
  local v = redis.call('GET', KEYS[12])
  if not v then
    return finish('noop', false, 0, 0, 0, 0) -- that preflight reserved nothing (or long ago)
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
    who = f[8] ~= '' and f[8] or false
    -- Our own request id: the first attempt's reply was lost; answer as it would have. Any
    -- other request gave nothing back itself: released is the first call's alone.
    if f[7] == request then
      return finish(f[2], id, tonumber(f[4]), tonumber(f[5]), tonumber(f[6]), 0)
    end
    return finish(f[2], id, tonumber(f[4]), 0, tonumber(f[6]), 1)
  end
end

-- The open reservation `id` as a record (fields), or nil.
local function open_record(id)
  local v = redis.call('HGET', K.res, id)
  return v and split(v, 10)
end

-- Whether reservation `id` (record `r`) is one this call's reaping returns: due, and among
-- the first REAP_LIMIT due. Such a one counts as expired before this call acts, as if reaping
-- came first (it runs last, so that an error leaves Redis as it was).
local reaped_now = false
local function reaped_first(id, r)
  if tonumber(r[6]) > now then
    return false
  end
  if not reaped_now then
    reaped_now = {}
    for _, due in ipairs(redis.call('ZRANGEBYSCORE', K.exp, '-inf', now, 'LIMIT', 0, REAP_LIMIT)) do
      reaped_now[due] = true
    end
  end
  return reaped_now[id] == true
end

-- The oldest open reservation of this call's group, reaping aside.
local function oldest_of_group()
  local members = redis.call('ZRANGEBYLEX', K.open, '[' .. group .. ':', '(' .. group .. ';',
    'LIMIT', 0, REAP_LIMIT + 1)
  for _, m in ipairs(members) do
    local id = string.match(m, '^[^:]*:[^:]*:(.*)$')
    local r = open_record(id)
    if r and not reaped_first(id, r) then
      return id, r
    end
  end
end

local action -- 'close', 'expire' (then as closed), 'closed', 'unknown', 'direct', 'noop'
local r, o   -- the open reservation's record, a closed reservation's outcome
local named = rid ~= ''
if named then
  r = open_record(rid)
  if r then
    if agent ~= '' and r[1] ~= agent then
      return redis.error_reply('AGENTBILL agent_mismatch')
    end
    if tf ~= '' and r[3] ~= tf then
      return redis.error_reply('AGENTBILL task_mismatch')
    end
    action = reaped_first(rid, r) and 'expire' or 'close'
  else
    local closed = redis.call('HGET', K.closed, rid)
    if closed then
      o = split(closed)
      -- A release of an id Redis had never seen left a mark ('t'): a record charges like
      -- one of an id never seen.
      action = (o[15] == 't' and charge) and 'unknown' or 'closed'
    else
      action = 'unknown'
    end
  end
else
  local unseen = false -- `prefer` was approved offline under a key and never reached Redis
  if prefer ~= '' then
    r = open_record(prefer)
    if r and r[7] ~= '' and string.sub(r[7], 1, #group + 1) == group .. ':' and not reaped_first(prefer, r) then
      rid = prefer
    else
      unseen = not r and offline_fp ~= '' and redis.call('HEXISTS', K.closed, prefer) == 0
      r = nil
    end
  end
  if unseen then
    rid, action = prefer, 'unknown'
  else
    if not r then
      rid, r = oldest_of_group()
      rid = rid or ''
    end
    if r then
      action = 'close'
    elseif charge then
      action = 'direct'
    else
      action = 'noop'
    end
  end
end

-- A record after a release, an expiry or another's close without an id charges anew.
local function charges_closed(outcome)
  return charge and (outcome[1] == 'released' or outcome[1] == 'expired' or outcome[15] == '0')
end

-- The periods a charge of this call goes to: {customer period, agent digest, agent period,
-- task digest}; the current periods for a direct charge.
local target
-- The period fields charge_fits finds, for the close or the late charge below to reuse
-- (nothing between them rolls a period; see period_fields).
local periods = {}
if charge then
  if action == 'close' or action == 'expire' then
    target = {rec(r, 8), rec(r, 9), rec(r, 10), r[3]}
  elseif action == 'closed' and charges_closed(o) then
    target = {rec(o, 12), rec(o, 13), rec(o, 14), o[4]}
  elseif action == 'unknown' or action == 'direct' then
    local cs = scope_read('', now)
    local ap = adig ~= '' and scope_read('a:' .. adig .. ':', now, cs).pid or ''
    target = {cs.pid, adig, ap, tf}
  end
end
if target then
  local fits = charge_fits('', target[1], units, periods)
    and (target[2] == '' or charge_fits('a:' .. target[2] .. ':', target[3], units, periods))
    and (target[4] == '' or tonumber(redis.call('HGET', K.tasks, target[4] .. ':u') or '0') + units <= MAX)
  if not fits then
    return overflow('units')
  end
end

-- The statistics hashes a record closing a reservation adds its sample to: those sent whose
-- sums stay exact with it (checked here, before any write).
local learn_into = {}
if action == 'close' and not releasing then
  for i = 13, 14 do
    local key = KEYS[i]
    if key then
      local v = redis.call('HMGET', key, 'g', '0n', '0a', '0e', '1n', '1a', '1e')
      local g = v[1] or '0'
      local at = g == '0' and 1 or 4 -- the current generation's fields in v, after 'g'
      local n = num(v[at + 1])
      local full = n >= STATS_WINDOW
      local a = full and 0 or num(v[at + 2])
      local e = full and 0 or num(v[at + 3])
      if a + units <= MAX and e + tonumber(r[4]) <= MAX then
        learn_into[#learn_into + 1] = {key, g, full, full and 0 or n, a, e}
      end
    end
  end
end

-- A record of an id Redis never saw, approved offline under a preflight key: whether to write
-- that key's record naming it. Not over a record naming a reservation open or charged (another
-- run of the key reserved meanwhile), nor over one made with other arguments.
local offline_key = false
if action == 'unknown' and charge and offline_fp ~= '' and offline_ttl then
  local v = redis.call('GET', KEYS[12])
  if not v then
    offline_key = true
  else
    local f = split(v)
    if f[1] == offline_fp and f[2] ~= rid and redis.call('HEXISTS', K.res, f[2]) == 0 then
      local c = redis.call('HGET', K.closed, f[2])
      local status = c and split(c)[1]
      offline_key = status == 'released' or status == 'expired'
    end
  end
end

-- -- from here on, nothing fails ---------------------------------------------------------------

-- Add the sample (estimate, actual) to statistics hash `s` ({key, current generation, full,
-- and the generation's samples, actual and estimate sums as read above}): the sums are
-- written in one HSET from the values read (nothing else ran in between).
local function learn(s, estimate, actual)
  local key, g = s[1], s[2]
  local w = {}
  if s[3] then -- the current generation is full: the older one goes, a new one starts
    g = g == '0' and '1' or '0'
    redis.call('HDEL', key, unpack(stats_fields(g)))
    w[1], w[2] = 'g', g
  end
  w[#w + 1], w[#w + 2] = g .. 'n', fmt(s[4] + 1)
  w[#w + 1], w[#w + 2] = g .. 'a', fmt(s[5] + actual)
  w[#w + 1], w[#w + 2] = g .. 'e', fmt(s[6] + estimate)
  redis.call('HSET', key, unpack(w))
  redis.call('HINCRBY', key, g .. ':' .. bin_of(actual), 1)
  redis.call('PEXPIRE', key, IDLE_S)
end

local function remember(status, id, charged, released, late)
  if fingerprint ~= '' then
    local v = {fingerprint, status, id or '', fmt(charged), fmt(released), fmt(late), request,
               who or ''}
    redis.call('SET', idem_key, table.concat(v, SEP), 'PX', idem_ttl)
  end
  return finish(status, id, charged, released, late, 0)
end

-- Thresholds the customer, and the agent `dig` (id `name`), may have crossed after a charge.
local function after_charge(dig, name, id)
  local cs = scope_read('', now)
  charged_cs = cs -- nothing after this changes the counters (but reaping): the reply reuses it
  who = name
  check_thresholds(cs, 'customer', name, crossed, id)
  -- The agent's whole scope (an HMGET of 14 fields and its period) only when it has
  -- thresholds to cross: most agents have none, and one HEXISTS is far cheaper.
  if dig ~= '' and redis.call('HEXISTS', K.budget, 'a:' .. dig .. ':thr') == 1 then
    check_thresholds(scope_read('a:' .. dig .. ':', now, cs), 'agent', name, crossed, id)
  end
end

-- Charge `units` with no reservation to close: to the customer and the agent in their
-- current periods, and to the task if named.
local function charge_now(reason, id)
  local cs = scope_read('', now)
  scope_roll(cs, now)
  incr(K.budget, 'spent', units)
  if adig ~= '' then
    local as = scope_read('a:' .. adig .. ':', now, cs)
    scope_roll(as, now)
    incr(K.budget, as.p .. 'spent', units)
    if not as.name then
      redis.call('HSET', K.budget, as.p .. 'name', agent)
    end
    agent_seen(adig, now)
  end
  if customer_id ~= '' then
    redis.call('HSETNX', K.budget, 'customer', customer_id)
  end
  if tf ~= '' then
    redis.call('HSETNX', K.tasks, tf .. ':n', task_ref)
    incr(K.tasks, tf .. ':u', units)
    task_seen(tf, now)
  end
  ledger('recorded', agent, task_ref, units, 0, id or '', reason, '', cs.pid)
  after_charge(adig, agent, id or '')
  return cs.pid
end

-- Charge this record's units to the closed reservation of outcome `o` (a release, an expiry
-- or another worker's close came first): to the periods it was reserved in, flagged late.
local function charge_closed(id)
  scope_settle('', rec(o, 12), 0, units, periods)
  if rec(o, 13) ~= '' then
    scope_settle('a:' .. o[13] .. ':', rec(o, 14), 0, units, periods)
  end
  if o[4] ~= '' then
    incr(K.tasks, o[4] .. ':u', units)
    task_seen(o[4], now)
  end
  o[1], o[9], o[11], o[15] = 'late', fmt(units), request, '1'
  redis.call('HSET', K.closed, id, table.concat(o, SEP))
  redis.call('ZADD', K.closedx, now + RETENTION, id)
  ledger('recorded', o[2], o[3], units, 0, id, 'late', '', rec(o, 12))
  after_charge(rec(o, 13), o[2], id)
  return remember('late', id, units, 0, 1)
end

if action == 'close' then
  local charged = charge and units or 0
  local status = releasing and 'released' or 'recorded'
  close_reservation(rid, r, status, charged, now, request, named and '1' or '0', periods)
  if rollback then
    uncross('', rec(r, 8), rid)
    if rec(r, 9) ~= '' then
      uncross('a:' .. r[9] .. ':', rec(r, 10), rid)
    end
  end
  who = r[1]
  if charged > 0 then
    after_charge(rec(r, 9), r[1], rid)
  end
  for _, into in ipairs(learn_into) do
    learn(into, tonumber(r[4]), units)
  end
  return remember(status, rid, charged, tonumber(r[4]), 0)
end

if action == 'expire' then
  -- Due, and returned by this call's reaping: it expires first, as if reaping came first.
  close_reservation(rid, r, 'expired', 0, now, '', '1')
  expired_here = 1
  o = split(redis.call('HGET', K.closed, rid))
  action = 'closed'
end

if action == 'direct' then
  charge_now('direct', false)
  return remember('direct', false, units, 0, 0)
end

if action == 'noop' then
  return remember('noop', false, 0, 0, 0)
end

if action == 'unknown' then
  -- Not open and no outcome remembered (made while Redis was unreachable, or older than the
  -- retention): a record charges it, flagged late (the work happened), and the outcome is
  -- remembered like a close so a repeat of the record charges nothing more. A release has
  -- nothing to give back, but is remembered too, so that the preflight of that id, should it
  -- land only now (sent before its caller gave up), reserves nothing.
  if not charge then
    local outcome = {'noop', agent, task_ref, tf, '0', fmt(now), fmt(now), '', '0',
                     fmt(now), request, '', '', '', 't'}
    redis.call('HSET', K.closed, rid, table.concat(outcome, SEP))
    redis.call('ZADD', K.closedx, now + RETENTION, rid)
    return remember('noop', rid, 0, 0, 0)
  end
  local pid = charge_now('late', rid)
  local outcome = {'late', agent, task_ref, tf, '0', fmt(now), fmt(now), '', fmt(units),
                   fmt(now), request, pid, adig, '', '1'}
  redis.call('HSET', K.closed, rid, table.concat(outcome, SEP))
  redis.call('ZADD', K.closedx, now + RETENTION, rid)
  if offline_key then
    redis.call('SET', KEYS[12], offline_fp .. SEP .. rid, 'PX', offline_ttl)
  end
  return remember('late', rid, units, 0, 1)
end

-- action == 'closed'
if charges_closed(o) then
  return charge_closed(rid)
end
-- Closed before by a request naming it: a second close is a no-op that returns the first
-- outcome. Closed by this very request (the client's retry after a lost reply): answer exactly
-- as the first attempt did.
who = o[2]
local late = (o[1] == 'late' or o[1] == 'expired') and 1 or 0
if o[11] == request then
  local released = (o[1] == 'recorded' or o[1] == 'released') and tonumber(o[5]) or 0
  return finish(o[1], rid, tonumber(o[9]), released, late, 0)
end
return finish(o[1], rid, tonumber(o[9]), 0, late, 1)
