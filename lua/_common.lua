-- agentbill shared prelude: prepended to every operation script by the client that loads it.
--
-- Every script of one customer takes the same first eight KEYS, all sharing the customer's
-- {hash tag} so one script call runs on one Redis Cluster slot:
--   KEYS[1] budget   hash  policy and counters of the customer and of each of its agents
--   KEYS[2] res      hash  reservation id -> open reservation record
--   KEYS[3] exp      zset  reservation id scored by its expiry (ms, Redis clock)
--   KEYS[4] open     zset  "<group>:<seq>:<reservation id>" (all scores 0: lexical order)
--   KEYS[5] tasks    hash  "<task digest>:c|u|r|n" -> ceiling, used, reserved, task_ref
--   KEYS[6] closed   hash  reservation id -> outcome of a closed reservation
--   KEYS[7] closedx  zset  reservation id scored by when its outcome may be forgotten
--   KEYS[8] ledger   stream every decision, record, release, expiry and threshold crossing
-- and the same first three ARGV:
--   ARGV[1] reap limit (max expired reservations returned, and outcomes forgotten, per call)
--   ARGV[2] outcome retention, ms
--   ARGV[3] ledger length cap (approximate, XADD MAXLEN ~)
--
-- A scope is the customer (field prefix '') or one of its agents ('a:<agent digest>:'). Its
-- fields in the budget hash: limit, period (''|hour|day|week|month), tzt (UTC offsets of the
-- budget's time zone, '' for UTC), thr (threshold percents), rl_n/rl_per/rl_burst/rl_tat (rate
-- limit: units per rl_per ms, burst, GCRA theoretical arrival time), cc (max in flight), name
-- (agent id); counters open (in flight), pid (current period id, '' for a lifetime budget),
-- spent and reserved in period pid, and ppid/pspent/preserved of the period before it. A new
-- period needs no reset: counters whose pid is not the current period read as zero, and the
-- first write of the new period moves them to ppid/pspent/preserved.
--
-- Records are fields joined by \31 (unit separator): ids never hold control characters, and
-- integers are written with %d because tostring() and cjson round to 14 significant digits.
--   reservation: agent, task_ref, task digest, estimate, created_ms, expires_ms, open member,
--                customer period id, agent digest, agent period id
--   outcome:     status, <the first 7 reservation fields>, charged, closed_ms, request id that
--                closed it, customer period id, agent digest, agent period id

local SEP = '\31'

local K = {
  budget = KEYS[1], res = KEYS[2], exp = KEYS[3], open = KEYS[4],
  tasks = KEYS[5], closed = KEYS[6], closedx = KEYS[7], ledger = KEYS[8],
}
local REAP_LIMIT = tonumber(ARGV[1])
local RETENTION = tonumber(ARGV[2])
local LEDGER_LEN = tonumber(ARGV[3])

local function fmt(n)
  return string.format('%d', n)
end

-- HINCRBY with an exact integer argument. Skips zero: Lua's -0 would reach Redis as "-0",
-- which HINCRBY rejects as "not an integer".
local function incr(key, field, delta)
  if delta ~= 0 then
    return redis.call('HINCRBY', key, field, fmt(delta))
  end
end

-- A reply as one string: `n` fields joined by \31, false or nil as '', a table (of strings) as
-- its items joined by ','. One bulk string is far cheaper for a client to parse than an array.
local function packed(t, n)
  local out = {}
  for i = 1, n do
    local v = t[i]
    if v == false or v == nil then
      out[i] = ''
    elseif type(v) == 'number' then
      out[i] = string.format('%d', v)
    elseif type(v) == 'table' then
      out[i] = table.concat(v, ',')
    else
      out[i] = v
    end
  end
  return table.concat(out, SEP)
end

local function split(s)
  local out = {}
  for field in string.gmatch(s .. SEP, '([^' .. SEP .. ']*)' .. SEP) do
    out[#out + 1] = field
  end
  return out
end

-- Milliseconds on the Redis server's clock: every worker agrees on it. A customer's
-- '_clock_offset' field (tests only: it lets a test cross a period boundary without waiting)
-- shifts it.
local function now_ms()
  local t = redis.call('TIME')
  local shift = tonumber(redis.call('HGET', K.budget, '_clock_offset') or '0')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + shift
end

-- One ledger entry; its stream id carries the time (ms, Redis clock).
local function ledger(kind, agent, task_ref, units, released, rid, reason, scope, pid)
  redis.call('XADD', K.ledger, 'MAXLEN', '~', LEDGER_LEN, '*',
    't', kind, 'a', agent, 'k', task_ref, 'u', fmt(units), 'x', fmt(released),
    'r', rid or '', 'why', reason or '', 's', scope or '', 'p', pid or '')
end

-- -- periods -----------------------------------------------------------------------------------

local DAY = 86400000

-- Civil date from days since 1970-01-01, and back (H. Hinnant's algorithms, integers only).
local function civil(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400 + (m <= 2 and 1 or 0)
  return y, m
end

local function days_from_civil(y, m)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doy = math.floor((153 * mp + 2) / 5)
  return era * 146097 + yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy - 719468
end

-- UTC offset (ms) at UTC instant `t` from a zone table "<utc_ms>:<offset_ms>,..." (ascending;
-- the first entry applies before the second). '' is UTC.
local function offset_at(tzt, t)
  local off = 0
  for at, o in string.gmatch(tzt, '(-?%d+):(-?%d+)') do
    if tonumber(at) > t then break end
    off = tonumber(o)
  end
  return off
end

-- The period containing `now` for a budget of `kind` in zone table `tzt`:
-- id ('' for a lifetime budget), start_ms and end_ms (false, false for a lifetime budget).
local function period_of(kind, tzt, now)
  if kind == '' then
    return '', false, false
  end
  local local_now = now + offset_at(tzt, now)
  local s, e, id
  if kind == 'hour' then
    local n = math.floor(local_now / 3600000)
    s, e, id = n * 3600000, (n + 1) * 3600000, 'h' .. fmt(n)
  elseif kind == 'day' then
    local n = math.floor(local_now / DAY)
    s, e, id = n * DAY, (n + 1) * DAY, 'd' .. fmt(n)
  elseif kind == 'week' then -- ISO weeks: Monday 00:00 (1970-01-01 was a Thursday)
    local n = math.floor((math.floor(local_now / DAY) + 3) / 7)
    s, e, id = (n * 7 - 3) * DAY, (n * 7 + 4) * DAY, 'w' .. fmt(n)
  else -- month
    local y, m = civil(math.floor(local_now / DAY))
    local ny, nm = y, m + 1
    if nm == 13 then ny, nm = y + 1, 1 end
    s, e, id = days_from_civil(y, m) * DAY, days_from_civil(ny, nm) * DAY, 'm' .. fmt(y * 12 + m - 1)
  end
  -- Local boundaries back to UTC, with the offset in force at each boundary.
  local function utc(l)
    local u = l - offset_at(tzt, l - offset_at(tzt, now))
    return l - offset_at(tzt, u)
  end
  return id, utc(s), utc(e)
end

-- -- scopes ------------------------------------------------------------------------------------

local SCOPE_FIELDS = {'limit', 'period', 'tzt', 'pid', 'spent', 'reserved', 'open', 'rl_n',
                      'rl_per', 'rl_burst', 'rl_tat', 'cc', 'thr', 'name'}

-- The state of scope `p` at `now`. An agent without a period of its own (no budget, or a
-- budget set without one) counts in its customer's period (`fallback`: the customer's state).
local function scope_read(p, now, fallback)
  local names = {}
  for i, f in ipairs(SCOPE_FIELDS) do names[i] = p .. f end
  local v = redis.call('HMGET', K.budget, unpack(names))
  local s = {
    p = p, limit = v[1] and tonumber(v[1]), period = v[2] or '', tzt = v[3] or '',
    stored = v[4] or '', open = tonumber(v[7] or '0'),
    rl_n = v[8] and tonumber(v[8]), rl_per = tonumber(v[9] or '0'),
    rl_burst = tonumber(v[10] or '0'), rl_tat = tonumber(v[11] or '0'),
    cc = v[12] and tonumber(v[12]), thr = v[13] or '', name = v[14],
  }
  if fallback and s.period == '' then
    s.period, s.tzt = fallback.period, fallback.tzt
  end
  s.pid, s.pstart, s.pend = period_of(s.period, s.tzt, now)
  if s.stored == s.pid then
    s.spent, s.reserved = tonumber(v[5] or '0'), tonumber(v[6] or '0')
  else
    s.spent, s.reserved = 0, 0 -- a new period: nothing spent or held in it yet
  end
  return s
end

-- Before the first write of a scope's counters in a new period: the old period's counters
-- become the previous period's, and the new period's start at zero.
local function scope_roll(s)
  if s.stored ~= s.pid then
    local old = redis.call('HMGET', K.budget, s.p .. 'spent', s.p .. 'reserved')
    redis.call('HSET', K.budget, s.p .. 'ppid', s.stored, s.p .. 'pspent', old[1] or '0',
      s.p .. 'preserved', old[2] or '0', s.p .. 'pid', s.pid, s.p .. 'spent', '0',
      s.p .. 'reserved', '0')
    s.stored = s.pid
  end
end

-- Give back `est` reserved units of scope prefix `p`, reserved in period `rp`, and charge
-- `charged`: to that period's counters while they are the current or the previous period's
-- (older periods' counters are gone; the ledger keeps the record).
local function scope_settle(p, rp, est, charged)
  local v = redis.call('HMGET', K.budget, p .. 'pid', p .. 'ppid')
  if (v[1] or '') == rp then
    incr(K.budget, p .. 'reserved', -est)
    incr(K.budget, p .. 'spent', charged)
  elseif v[2] == rp then
    incr(K.budget, p .. 'preserved', -est)
    incr(K.budget, p .. 'pspent', charged)
  end
end

-- Threshold crossings of scope `s` (committed = spent + reserved, in percent of the limit),
-- each once per period: marked, written to the ledger and added to `crossed`.
local function check_thresholds(s, scope, agent, crossed)
  if not s.limit or s.limit == 0 or s.thr == '' then return end
  for pct in string.gmatch(s.thr, '%d+') do
    if (s.spent + s.reserved) * 100 >= tonumber(pct) * s.limit then
      local mark = s.p .. 'thr:' .. pct
      if redis.call('HGET', K.budget, mark) ~= s.pid then
        redis.call('HSET', K.budget, mark, s.pid)
        ledger('threshold', agent, '', s.spent + s.reserved, 0, '', pct, scope, s.pid)
        crossed[#crossed + 1] = scope .. ':' .. pct .. ':' .. fmt(s.spent + s.reserved)
      end
    end
  end
end

-- -- reservations ------------------------------------------------------------------------------

local function rec(r, i)
  return r[i] or ''
end

-- Close the open reservation `rid` (record fields `r`): release its whole estimate on every
-- scope, charge `charged` units to the periods it was reserved in, and remember the outcome
-- (and the request that closed it, '' for expiry) for the retention.
local function close_reservation(rid, r, status, charged, now, request)
  local est = tonumber(r[4])
  scope_settle('', rec(r, 8), est, charged)
  incr(K.budget, 'open', -1)
  if rec(r, 9) ~= '' then
    scope_settle('a:' .. r[9] .. ':', rec(r, 10), est, charged)
    incr(K.budget, 'a:' .. r[9] .. ':open', -1)
  end
  if r[3] ~= '' then
    incr(K.tasks, r[3] .. ':r', -est)
    incr(K.tasks, r[3] .. ':u', charged)
  end
  redis.call('HDEL', K.res, rid)
  redis.call('ZREM', K.exp, rid)
  redis.call('ZREM', K.open, r[7])
  local outcome = {status, r[1], r[2], r[3], r[4], r[5], r[6], r[7], fmt(charged), fmt(now),
                   request, rec(r, 8), rec(r, 9), rec(r, 10)}
  redis.call('HSET', K.closed, rid, table.concat(outcome, SEP))
  redis.call('ZADD', K.closedx, now + RETENTION, rid)
  local kind = status == 'released' and 'released' or (status == 'expired' and 'expired' or 'recorded')
  ledger(kind, r[1], r[2], charged, est, rid, status, '', rec(r, 8))
end

-- Lazy expiry, bounded: return at most REAP_LIMIT expired reservations to the budget and forget
-- at most REAP_LIMIT outcomes past their retention. No cron and no sweeper process is needed.
local function reap(now)
  local expired = redis.call('ZRANGEBYSCORE', K.exp, '-inf', now, 'LIMIT', 0, REAP_LIMIT)
  for _, rid in ipairs(expired) do
    local r = redis.call('HGET', K.res, rid)
    if r then
      close_reservation(rid, split(r), 'expired', 0, now, '')
    else
      redis.call('ZREM', K.exp, rid)
    end
  end
  local old = redis.call('ZRANGEBYSCORE', K.closedx, '-inf', now, 'LIMIT', 0, REAP_LIMIT)
  if #old > 0 then
    redis.call('HDEL', K.closed, unpack(old))
    redis.call('ZREM', K.closedx, unpack(old))
  end
end

local function task_state(tf)
  local t = redis.call('HMGET', K.tasks, tf .. ':c', tf .. ':u', tf .. ':r', tf .. ':n')
  return t[1] and tonumber(t[1]), tonumber(t[2] or '0'), tonumber(t[3] or '0'), t[4] ~= false
end

-- A scope's state as scripts reply it: limit|false, spent, reserved, open, period id,
-- period start|false, period end|false, rate units|false, rate per ms, burst, max in flight|false,
-- thresholds, period kind, time zone table.
local function scope_reply(s)
  return {s.limit or false, s.spent, s.reserved, s.open, s.pid, s.pstart, s.pend,
          s.rl_n or false, s.rl_per, s.rl_burst, s.cc or false, s.thr, s.period}
end

-- The reply of get_budget, set_budget and set_limits: {customer scope, agent scope|false,
-- now_ms}, for the agent of digest `adig` ('' for none).
local function budget_reply(adig, now)
  local cs = scope_read('', now)
  local agent = false
  if adig ~= '' then
    agent = scope_reply(scope_read('a:' .. adig .. ':', now, cs))
  end
  return {scope_reply(cs), agent, now}
end

-- Name the customer (once) and the agent ('' for none) in the budget hash, for people reading it.
local function name_scopes(customer_id, p, agent)
  redis.call('HSETNX', K.budget, 'customer', customer_id)
  if agent ~= '' then
    redis.call('HSET', K.budget, p .. 'name', agent)
  end
end

-- ------------------------------------------------------------------------------------------
