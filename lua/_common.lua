-- agentbill shared prelude: the top level of agentbill's Functions library (lua/library.lua,
-- built by agentbill/_scripts.py), before the function of every operation.
--
-- Every script of one customer takes the same first ten KEYS, all sharing the customer's
-- {hash tag} so one script call runs on one Redis Cluster slot:
--   KEYS[1] budget   hash  policy and counters of the customer and of each of its agents
--   KEYS[2] res      hash  reservation id -> open reservation record
--   KEYS[3] exp      zset  reservation id scored by its expiry (ms, Redis clock)
--   KEYS[4] open     zset  "<group>:<seq>:<reservation id>" (all scores 0: lexical order)
--   KEYS[5] tasks    hash  "<task digest>:c|u|r|n" -> ceiling, used, reserved, task_ref
--   KEYS[6] tasksx   zset  task digest scored by when an idle task may be forgotten (ms)
--   KEYS[7] closed   hash  reservation id -> outcome of a closed reservation
--   KEYS[8] closedx  zset  reservation id scored by when its outcome may be forgotten
--   KEYS[9] ledger   stream every decision, record, release, expiry and threshold crossing
--   KEYS[10] agents  zset  agent digest scored by when the agent may be forgotten if idle (ms)
-- and the same first five ARGV:
--   ARGV[1] reap limit (max expired reservations returned, outcomes and tasks forgotten, per call)
--   ARGV[2] outcome retention, ms
--   ARGV[3] ledger length cap (approximate, XADD MAXLEN ~)
--   ARGV[4] task retention, ms: an idle task with nothing reserved is forgotten after it
--   ARGV[5] idle retention, ms: the keys of a customer that sees no write for this long expire
--           (the budget hash and open reservations only if no budget or limit was ever set)
--
-- A scope is the customer (field prefix '') or one of its agents ('a:<agent digest>:'). Its
-- fields in the budget hash: limit, period (''|hour|day|week|month), tzt (UTC offsets of the
-- budget's time zone, '' for UTC), thr (threshold percents), rl_n/rl_per/rl_burst/rl_tat (rate
-- limit: units per rl_per ms, burst, GCRA theoretical arrival time), cc (max in flight), name
-- (agent id); counters: open (in flight), and spent and reserved of period pid (pend: its end,
-- ms, '' for none). A period id is '' for a lifetime budget, else the kind's letter and the
-- local calendar index ('d20000'), with '.<ms>' added for a wall-clock period that repeats
-- (clocks set back). Other periods' counters are kept as s:<pid> and r:<pid>, listed in arch
-- ("<pid>@<end ms>,..."), so a reservation is settled in the period it was made in whatever
-- period is current now, and a period that becomes current again (a budget's period changed
-- and back) finds its counters. An archived period is forgotten once nothing is reserved in it
-- and it ended more than a day and two hours ago (the widest spread of UTC offsets).
-- Threshold marks: thr:<pct> -> "<pid>\31<reservation id>\31<ledger entry id>". The customer
-- scope also holds: customer (its id), seq, policy ('1' once a budget or limit was set: its
-- keys then never expire on their own).
--
-- Records are fields joined by \31 (unit separator): ids never hold control characters, and
-- integers are written with %d because tostring() and cjson round to 14 significant digits.
--   reservation: agent, task_ref, task digest, estimate, created_ms, expires_ms, open member
--                ('' when no record without an id may close it), customer period id, agent
--                digest, agent period id
--   outcome:     status, <the first 7 reservation fields>, charged, closed_ms, request id that
--                closed it, customer period id, agent digest, agent period id, how it was
--                closed ('1' by a request naming it, '0' by a record without an id)
--
-- Scripts check everything that could make them fail before their first write (reaping
-- included): Redis does not roll a script back, so an error leaves Redis exactly as it was.

local SEP = '\31'
local MAX = 9007199254740991 -- 2^53 - 1: Lua numbers are doubles, exact up to here

-- The call under way: its keys and settings, set by begin() at the start of every function.
-- This file is the top level of agentbill's Functions library (lua/library.lua): it runs once,
-- at FUNCTION LOAD, and every call shares what it makes. So nothing else at the top level may
-- hold per-call state: every other top-level local is a function or a table no call changes
-- (tests/test_library.py checks).
local K, REAP_LIMIT, RETENTION, LEDGER_LEN, TASK_RETENTION, IDLE
-- The same settings as the client sent them (integers in decimal), for commands that take them
-- as they are: a Lua number handed to redis.call is formatted with '%.17g' on every call, and
-- number formatting is among the dearer steps of a script.
local REAP_LIMIT_S, RETENTION_S, LEDGER_LEN_S, IDLE_S

-- The most items of one kind a call walks, whoever asks: the clients' own bound on the reap
-- limit (reap_limit in agentbill/_models.py, reapLimit in the TypeScript client), on
-- get_usage's agents and on an events page, so that no caller can make one call walk a
-- customer's whole backlog while Redis serves no one else.
local MAX_ITEMS_S = '10000'
local MAX_ITEMS = 10000 -- the same as MAX_ITEMS_S (no tonumber() at FUNCTION LOAD)
-- The longest stored value of each kind a call parses. A tenant key may write its own keys raw
-- (functions run with the caller's ACL, so it holds HSET on them): a value of millions of
-- entries made every call of that customer walk it for seconds, BUSY for every tenant, and
-- UNKILLABLE once the call had written. Each bound is far above what the clients write, and
-- checked with #s (O(1)) before the value is parsed; a longer value is an error (bounded()).
-- Zone table (tzt): agentbill/_zones.py writes a year back to YEARS_AHEAD (20) years ahead,
-- ~45 entries of '<utc_ms>:<offset_ms>' (at most 25 bytes each): ~1,100 bytes.
local MAX_TZT = 16384
-- Thresholds (thr): at most 20 percents of at most 1000 (ThresholdsSpec in _models.py): 99 bytes.
local MAX_THR = 1024
-- Archived periods (arch): '<pid>@<end ms>' (about 40 bytes), one per period that still holds
-- a reservation or ended less than SPREAD ago: a handful; thousands only for an hourly budget
-- with reservations open (TTL) across thousands of hours. Each entry costs scope_roll an HMGET.
local MAX_ARCH = 262144
-- A record split() parses (reservation, outcome, idempotency and threshold records, and the
-- packed ARGV[6]): at most 17 fields, ids at most 256 bytes (MAX_ID_LENGTH), digests and
-- integers shorter: under 5,000 bytes.
local MAX_RECORD = 65536
-- The most fields split() returns: records hold at most 17. A record of MAX_RECORD separators
-- would otherwise cost 65,536 gmatch steps per split, and one call splits thousands of records
-- (reap) or one threshold mark per listed percent: 300 such records held one call 0.7 s.
local MAX_FIELDS = 32

-- How many arguments one command is handed at most from a list: Lua's unpack() fails beyond
-- about 8,000 results ("too many results to unpack").
local CHUNK = 1000

-- HDEL of every field in `fields` (a list of any length), CHUNK at a time.
local function hdel_all(key, fields)
  for i = 1, #fields, CHUNK do
    redis.call('HDEL', key, unpack(fields, i, math.min(i + CHUNK - 1, #fields)))
  end
end

-- One of the settings (ARGV[1..5]) as a number: a decimal integer, as the clients send them,
-- else an error before anything is written. Another caller (a tenant key's own FCALL) could
-- hand in what Lua reads as a number but Redis refuses as an argument ('nan', '0x10', ' 5':
-- the call failed after its writes), or a count of '-1', which ZRANGEBYSCORE's LIMIT takes
-- for "no limit" (a reap of the whole backlog, past MAX_ITEMS).
local function setting(v, name)
  if not (v and #v <= 16 and string.find(v, '^%d+$')) then
    error({err = 'AGENTBILL bad_setting ' .. name .. ': a decimal integer, as the clients send it'})
  end
  return tonumber(v)
end

-- A count a caller asks for (ARGV, a decimal integer as for setting()): at least 1, else an
-- error before anything is written; more than MAX_ITEMS is taken as MAX_ITEMS.
local function count(v, name)
  local n = setting(v, name)
  if n < 1 then
    error({err = 'AGENTBILL bad_setting ' .. name .. ': at least 1'})
  end
  return math.min(n, MAX_ITEMS)
end

-- `v` (a stored value of `field`, false or nil when absent) if at most `max` bytes long, else
-- an error: the value is not one agentbill wrote (see MAX_TZT), and parsing it could hold Redis.
local function bounded(v, max, field)
  if v and #v > max then
    error({err = 'AGENTBILL corrupt ' .. field .. ': a stored value of ' .. #v
      .. ' bytes, longer than agentbill ever writes (' .. max .. ')'})
  end
  return v
end

local function begin(KEYS, ARGV)
  K = {
    budget = KEYS[1], res = KEYS[2], exp = KEYS[3], open = KEYS[4], tasks = KEYS[5],
    tasksx = KEYS[6], closed = KEYS[7], closedx = KEYS[8], ledger = KEYS[9], agents = KEYS[10],
  }
  REAP_LIMIT, REAP_LIMIT_S = setting(ARGV[1], 'reap_limit'), ARGV[1]
  if REAP_LIMIT > MAX_ITEMS then
    -- A caller that is not agentbill's client (a tenant key's own FCALL) asked for more.
    REAP_LIMIT, REAP_LIMIT_S = MAX_ITEMS, MAX_ITEMS_S
  end
  RETENTION = setting(ARGV[2], 'outcome_retention')
  LEDGER_LEN = setting(ARGV[3], 'ledger_max_len')
  TASK_RETENTION = setting(ARGV[4], 'task_retention')
  IDLE = setting(ARGV[5], 'idle_retention')
  RETENTION_S, LEDGER_LEN_S, IDLE_S = ARGV[2], ARGV[3], ARGV[5]
end

local function fmt(n)
  if n == 0 then return '0' end -- the commonest count, and string.format is dear
  return string.format('%d', n)
end

-- HINCRBY with an exact integer argument. Skips zero: Lua's -0 would reach Redis as "-0",
-- which HINCRBY rejects as "not an integer".
local function incr(key, field, delta)
  if delta ~= 0 then
    return redis.call('HINCRBY', key, field, fmt(delta))
  end
end

-- The error of a counter that would leave the exact range: raised before any write.
local function overflow(field)
  return redis.error_reply('AGENTBILL overflow ' .. field)
end

-- A reply as one string: `n` fields joined by \31, false or nil as '', a table (of strings) as
-- its items joined by ','. One bulk string is far cheaper for a client to parse than an array.
local function packed(t, n)
  local out = {}
  for i = 1, n do
    local v = t[i]
    if not v then -- false or nil
      out[i] = ''
    else
      local kind = type(v) -- a C call: once per field
      if kind == 'string' then
        out[i] = v
      elseif kind == 'number' then
        out[i] = fmt(v)
      else
        out[i] = table.concat(v, ',')
      end
    end
  end
  return table.concat(out, SEP)
end

-- The fields of `s` (joined by SEP). With `n`, the number of fields `s` should hold: one
-- string.match with a capture per field, far cheaper than a gmatch loop (each step of which is
-- a C call); a string of another shape is split field by field as without `n`.
local function split(s, n)
  bounded(s, MAX_RECORD, 'record')
  if n then
    local fields = {string.match(s, '^' .. string.rep('([^' .. SEP .. ']*)' .. SEP, n - 1)
      .. '([^' .. SEP .. ']*)$')}
    if fields[1] then return fields end
  end
  local out = {}
  for field in string.gmatch(s .. SEP, '([^' .. SEP .. ']*)' .. SEP) do
    out[#out + 1] = field
    if #out == MAX_FIELDS then break end
  end
  return out
end

-- Milliseconds on the Redis server's clock: every worker agrees on it.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- One ledger entry; its stream id carries the time (ms, Redis clock). Returns the entry id.
local function ledger(kind, agent, task_ref, units, released, rid, reason, scope, pid)
  return redis.call('XADD', K.ledger, 'MAXLEN', '~', LEDGER_LEN_S, '*',
    't', kind, 'a', agent, 'k', task_ref, 'u', fmt(units), 'x', fmt(released),
    'r', rid or '', 'why', reason or '', 's', scope or '', 'p', pid or '')
end

-- Keep the customer's keys for as long as they are needed, and no longer: called after the
-- writes of every script that writes. Outcomes live for the retention (the hash expires when
-- its last outcome may be forgotten), tasks and the ledger for IDLE after the last write; so do
-- the budget hash and the open reservations, unless a budget or limit was ever set (a policy
-- must never vanish on its own: then they have no TTL). `policy`: the budget hash's policy
-- field (false if absent) as read by a script that does not set it, or nil to read it here.
local function touch(policy)
  redis.call('PEXPIRE', K.closed, RETENTION_S)
  redis.call('PEXPIRE', K.closedx, RETENTION_S)
  redis.call('PEXPIRE', K.tasks, IDLE_S)
  redis.call('PEXPIRE', K.tasksx, IDLE_S)
  redis.call('PEXPIRE', K.ledger, IDLE_S)
  redis.call('PEXPIRE', K.agents, IDLE_S)
  if policy == '1' then
    -- These four keys carry no TTL already: the script that set the policy persisted them
    -- (below), and only this function ever gives them one, never once a policy is set.
    return
  end
  local keep = policy == nil and redis.call('HGET', K.budget, 'policy') == '1'
  for _, key in ipairs({K.budget, K.res, K.exp, K.open}) do
    if keep then
      redis.call('PERSIST', key)
    else
      redis.call('PEXPIRE', key, IDLE_S)
    end
  end
end

-- -- periods -----------------------------------------------------------------------------------

local DAY = 86400000
local SPREAD = 26 * 3600000 -- UTC-12 to UTC+14: how far apart two zones' calendars can be

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

-- The calendar bucket of local time `l` (ms): its id and its local start and end.
local function bucket(kind, l)
  if kind == 'hour' then
    local n = math.floor(l / 3600000)
    return 'h' .. fmt(n), n * 3600000, (n + 1) * 3600000
  elseif kind == 'day' then
    local n = math.floor(l / DAY)
    return 'd' .. fmt(n), n * DAY, (n + 1) * DAY
  elseif kind == 'week' then -- ISO weeks: Monday 00:00 (1970-01-01 was a Thursday)
    local n = math.floor((math.floor(l / DAY) + 3) / 7)
    return 'w' .. fmt(n), (n * 7 - 3) * DAY, (n * 7 + 4) * DAY
  end
  local y, m = civil(math.floor(l / DAY))
  local ny, nm = y, m + 1
  if nm == 13 then ny, nm = y + 1, 1 end
  return 'm' .. fmt(y * 12 + m - 1), days_from_civil(y, m) * DAY, days_from_civil(ny, nm) * DAY
end

-- A zone table "<utc_ms>:<offset_ms>,..." (ascending; the first entry holds since always; ''
-- is UTC) as the instants its offsets start at, and the offsets.
local function zone(tzt)
  local at, off = {}, {}
  for a, o in string.gmatch(tzt, '(-?%d+):(-?%d+)') do
    at[#at + 1], off[#off + 1] = tonumber(a), tonumber(o)
  end
  if #at == 0 or at[1] > -MAX then
    table.insert(at, 1, -MAX)
    table.insert(off, 1, 0)
  end
  return at, off
end

-- The period of a budget of `kind` in zone table `tzt` that contains `now`: its id ('' for a
-- lifetime budget), start and end (UTC ms; false, false for a lifetime budget).
--
-- A period is the longest stretch of time around `now` over which the wall clock stays in one
-- calendar bucket. Its bounds are found by walking the zone's offset segments back and forth
-- from `now`: where the clock jumps over a bucket's edge (clocks set forward at midnight, say)
-- the period starts or ends at the jump. Where clocks go back into a bucket the clock had left
-- (or, for hours, back within the same hour), the bucket's second run is a period of its own,
-- with an id of its own: a repeated hour is two periods of an hour budget.
local function period_of(kind, tzt, now)
  if kind == '' then
    return '', false, false
  end
  local at, off = zone(tzt)
  local i = 1
  while at[i + 1] and at[i + 1] <= now do i = i + 1 end
  local id, S, E = bucket(kind, now + off[i])
  local start, finish
  local j = i
  while true do
    local lo = S - off[j]
    if lo > at[j] or j == 1 then
      start = math.max(lo, at[j])
      break
    end
    local before = at[j] - 1 + off[j - 1] -- the wall clock 1 ms before the offset changed
    local after = at[j] + off[j]
    if before < S then
      start = at[j]
      break
    end
    if before >= E or (kind == 'hour' and after < before) then
      start = at[j]
      id = id .. '.' .. fmt(at[j])
      break
    end
    j = j - 1
  end
  j = i
  while true do
    local hi = E - off[j]
    local nxt = at[j + 1]
    if not nxt or hi < nxt then
      finish = hi
      break
    end
    local before = nxt - 1 + off[j]
    local after = nxt + off[j + 1]
    if after >= E or after < S or (kind == 'hour' and after < before) then
      finish = nxt
      break
    end
    j = j + 1
  end
  return id, start, finish
end

-- -- scopes ------------------------------------------------------------------------------------

local SCOPE_FIELDS = {'limit', 'period', 'tzt', 'pid', 'spent', 'reserved', 'open', 'rl_n',
                      'rl_per', 'rl_burst', 'rl_tat', 'cc', 'thr', 'name', 'arch'}
-- The customer scope's read also takes the fields only it holds (see above): policy, customer,
-- seq. Read in the same HMGET, so a script needs no second read of them (touch() takes policy).
local CUSTOMER_FIELDS = {'limit', 'period', 'tzt', 'pid', 'spent', 'reserved', 'open', 'rl_n',
                         'rl_per', 'rl_burst', 'rl_tat', 'cc', 'thr', 'name', 'arch',
                         'policy', 'customer', 'seq'}

-- The state of scope `p` at `now`. An agent without a period of its own (no budget, or a
-- budget set without one) counts in its customer's period (`fallback`: the customer's state).
-- A stored counter: 0 when the field is absent (tonumber is dear: not called for it).
local function num(v)
  if v then return tonumber(v) end
  return 0
end

-- The state of scope `p` at `now`. An agent without a period of its own (no budget, or a
-- budget set without one) counts in its customer's period (`fallback`: the customer's state).
local function scope_read(p, now, fallback)
  local names = CUSTOMER_FIELDS
  if p ~= '' then
    names = {}
    for i, f in ipairs(SCOPE_FIELDS) do names[i] = p .. f end
  end
  local v = redis.call('HMGET', K.budget, unpack(names))
  -- Every stored value this call may parse, checked before the call writes anything (the
  -- scripts read their scopes first): the zone table here, thr in check_thresholds, arch in
  -- scope_roll (which always follows this read of its scope).
  bounded(v[3], MAX_TZT, p .. 'tzt')
  bounded(v[13], MAX_THR, p .. 'thr')
  bounded(v[15], MAX_ARCH, p .. 'arch')
  local s = { -- every field named here, so the table is made at its final size
    p = p, limit = v[1] and tonumber(v[1]), period = v[2] or '', tzt = v[3] or '',
    stored = v[4] or '', open = num(v[7]),
    rl_n = v[8] and tonumber(v[8]), rl_per = num(v[9]), rl_burst = num(v[10]),
    rl_tat = num(v[11]), cc = v[12] and tonumber(v[12]), thr = v[13] or '', name = v[14],
    pid = false, pstart = false, pend = false, spent = 0, reserved = 0,
    policy = v[16] or false, customer = v[17], seq = v[18], -- the customer's alone (else nil)
  }
  if fallback and s.period == '' then
    s.period, s.tzt = fallback.period, fallback.tzt
  end
  s.pid, s.pstart, s.pend = period_of(s.period, s.tzt, now)
  if s.stored == s.pid then
    s.spent, s.reserved = num(v[5]), num(v[6])
  else -- another period is stored: this one's counters are archived, or it starts at zero
    local a = redis.call('HMGET', K.budget, p .. 's:' .. s.pid, p .. 'r:' .. s.pid)
    s.spent, s.reserved = num(a[1]), num(a[2])
  end
  return s
end

-- Before the first write of a scope's counters in a period other than the stored one: the
-- stored period's counters are archived, the current period's brought back (or started at
-- zero), and archived periods nobody can settle in any more are forgotten.
local function scope_roll(s, now)
  if s.stored == s.pid then return end
  local p = s.p
  local v = redis.call('HMGET', K.budget, p .. 'spent', p .. 'reserved', p .. 'pend', p .. 'arch',
    p .. 'pid')
  local kept, drop = {}, {}
  for entry in string.gmatch(v[4] or '', '[^,]+') do
    local pid, ends = string.match(entry, '^(.*)@(.*)$')
    local a = redis.call('HMGET', K.budget, p .. 's:' .. pid, p .. 'r:' .. pid)
    local r = tonumber(a[2] or '0')
    if pid == s.pid or (r == 0 and ends ~= '' and tonumber(ends) + SPREAD < now) then
      drop[#drop + 1] = p .. 's:' .. pid
      drop[#drop + 1] = p .. 'r:' .. pid
    else
      kept[#kept + 1] = entry
    end
  end
  -- The stored period is archived while anything could still be settled in it: it holds
  -- something, or it has not long ended (a reservation of it released or expired may still
  -- see a late record).
  local spent, reserved, ends = v[1] or '0', v[2] or '0', v[3] or ''
  if spent ~= '0' or reserved ~= '0' or (v[5] and (ends == '' or tonumber(ends) + SPREAD >= now)) then
    kept[#kept + 1] = s.stored .. '@' .. ends
    redis.call('HSET', K.budget, p .. 's:' .. s.stored, spent, p .. 'r:' .. s.stored, reserved)
  end
  hdel_all(K.budget, drop) -- thousands when an hourly budget's long reservations all closed
  redis.call('HSET', K.budget, p .. 'pid', s.pid, p .. 'pend', s.pend and fmt(s.pend) or '',
    p .. 'spent', fmt(s.spent), p .. 'reserved', fmt(s.reserved), p .. 'arch', table.concat(kept, ','))
  s.stored = s.pid
end

-- The counter fields of period `rp` of scope prefix `p`: the stored period's, an archived
-- one's, or nil when that period's counters are gone (the ledger keeps its records).
-- `known`: a table of the calling script's own (never one of this prelude's: a Functions
-- library runs the prelude once for every call) to remember the answer in, so a second ask
-- in the call reads nothing; only while no scope_roll runs in between.
local function period_fields(p, rp, known)
  local at = known and known[p .. SEP .. rp]
  if at then
    return at[1], at[2]
  end
  local v = redis.call('HMGET', K.budget, p .. 'pid', p .. 'r:' .. rp)
  local spent, reserved
  if (v[1] or '') == rp then
    spent, reserved = p .. 'spent', p .. 'reserved'
  elseif v[2] then
    spent, reserved = p .. 's:' .. rp, p .. 'r:' .. rp
  end
  if known then
    known[p .. SEP .. rp] = {spent, reserved}
  end
  return spent, reserved
end

-- Give back `est` reserved units of scope prefix `p`, reserved in period `rp`, and charge
-- `charged` to that period's counters while they exist.
local function scope_settle(p, rp, est, charged, known)
  local spent, reserved = period_fields(p, rp, known)
  if spent then
    incr(K.budget, reserved, -est)
    incr(K.budget, spent, charged)
  end
end

-- Whether charging `units` to period `rp` of scope `p` keeps its spent counter exact.
local function charge_fits(p, rp, units, known)
  local spent = period_fields(p, rp, known)
  return not spent or tonumber(redis.call('HGET', K.budget, spent) or '0') + units <= MAX
end

-- Threshold crossings of scope `s` (committed = spent + reserved, in percent of the limit),
-- each once per period: marked (with the reservation `rid` that crossed it, '' for a charge),
-- written to the ledger and added to `crossed`.
local function check_thresholds(s, scope, agent, crossed, rid)
  if not s.limit or s.limit == 0 or s.thr == '' then return end
  for pct in string.gmatch(s.thr, '%d+') do
    if (s.spent + s.reserved) * 100 >= tonumber(pct) * s.limit then
      local mark = s.p .. 'thr:' .. pct
      local v = redis.call('HGET', K.budget, mark)
      if not v or split(v)[1] ~= s.pid then
        local entry = ledger('threshold', agent, '', s.spent + s.reserved, 0, rid, pct, scope, s.pid)
        redis.call('HSET', K.budget, mark, s.pid .. SEP .. (rid or '') .. SEP .. entry)
        crossed[#crossed + 1] = scope .. ':' .. pct .. ':' .. fmt(s.spent + s.reserved)
      end
    end
  end
end

-- Undo the threshold crossings reservation `rid` made in scope prefix `p`, period `rp`, that
-- its release takes back below (a batch rolled back): the mark and its ledger entry go, so the
-- real crossing later is reported.
local function uncross(p, rp, rid)
  local thr = bounded(redis.call('HGET', K.budget, p .. 'thr'), MAX_THR, p .. 'thr')
  if not thr then return end
  local spent, reserved = period_fields(p, rp)
  if not spent then return end
  local c = redis.call('HMGET', K.budget, p .. 'limit', spent, reserved)
  if not c[1] then return end
  local committed = tonumber(c[2] or '0') + tonumber(c[3] or '0')
  for pct in string.gmatch(thr, '%d+') do
    local mark = redis.call('HGET', K.budget, p .. 'thr:' .. pct)
    if mark then
      local m = split(mark)
      if m[1] == rp and m[2] == rid and committed * 100 < tonumber(pct) * tonumber(c[1]) then
        redis.call('HDEL', K.budget, p .. 'thr:' .. pct)
        redis.call('XDEL', K.ledger, m[3])
      end
    end
  end
end

-- GCRA: scope `s` may take `units` now if its theoretical arrival time, advanced by units x the
-- emission interval, is within the burst tolerance of now. Returns the new TAT (true without a
-- rate limit), or false and the ms to wait (false: waiting never helps, the ask is above the
-- burst).
local function gcra(s, units, now)
  if not s.rl_n then
    return true
  end
  local interval = s.rl_per / s.rl_n
  local tat = math.max(s.rl_tat, now) + units * interval
  local allowed_at = tat - s.rl_burst * interval
  if allowed_at <= now then
    return tat
  end
  return false, units <= s.rl_burst and math.ceil(allowed_at - now) or false
end

-- The first rule that refuses `units` more, in the order a preflight checks them, or nil and
-- the GCRA arrival times to store: the per-request `ceiling` ('' for none) on `total` (what
-- the reservation would then hold), the task `task` ({ceiling, used, reserved}), the budgets
-- of the customer (scope `cs`, counters `c`: {spent, reserved} where the units would count)
-- and of the agent (`as`, `a`), their rate limits and, for `runs` new runs (0 or 1), their
-- concurrency limits. A refusal is {reason, scope, limit, used, reserved, retry}.
local function refusal(units, total, ceiling, task, cs, c, as, a, now, runs)
  if ceiling ~= '' and total > tonumber(ceiling) then
    return {reason = 'ceiling_exceeded', scope = 'request', limit = tonumber(ceiling), used = 0, reserved = total - units}
  elseif task.ceiling and task.used + task.reserved + units > task.ceiling then
    return {reason = 'task_ceiling_exceeded', scope = 'task', limit = task.ceiling, used = task.used, reserved = task.reserved}
  elseif cs.limit and c.spent + c.reserved + units > cs.limit then
    return {reason = 'budget_exhausted', scope = 'customer', limit = cs.limit, used = c.spent, reserved = c.reserved}
  elseif as.limit and a.spent + a.reserved + units > as.limit then
    return {reason = 'budget_exhausted', scope = 'agent', limit = as.limit, used = a.spent, reserved = a.reserved}
  end
  local ctat, wait = gcra(cs, units, now)
  if not ctat then
    return {reason = 'rate_limited', scope = 'customer', limit = cs.rl_n, retry = wait}
  end
  local atat
  atat, wait = gcra(as, units, now)
  if not atat then
    return {reason = 'rate_limited', scope = 'agent', limit = as.rl_n, retry = wait}
  elseif runs > 0 and cs.cc and cs.open + runs > cs.cc then
    return {reason = 'concurrency_limited', scope = 'customer', limit = cs.cc, used = cs.open, reserved = 0}
  elseif runs > 0 and as.cc and as.open + runs > as.cc then
    return {reason = 'concurrency_limited', scope = 'agent', limit = as.cc, used = as.open, reserved = 0}
  end
  return nil, ctat, atat
end

-- Every field generation `g` ('0' or '1') of an estimate statistics hash can have (see
-- "Learning" in settle.lua): samples, sums, and the bins of 0 to 2^53 units (-1 to 215).
local function stats_fields(g)
  local out = {g .. 'n', g .. 'a', g .. 'e'}
  for bin = -1, 215 do
    out[#out + 1] = g .. ':' .. bin
  end
  return out
end

-- -- reservations and tasks --------------------------------------------------------------------

local function rec(r, i)
  return r[i] or ''
end

-- A task was active: it is forgotten TASK_RETENTION after its last activity, once idle.
local function task_seen(tf, now)
  redis.call('ZADD', K.tasksx, now + TASK_RETENTION, tf)
end

-- An agent ran, or was given a budget or limit: it is listed by get_usage (most recent first),
-- and forgotten IDLE after this if it then has no budget or limit and nothing open.
local function agent_seen(adig, now)
  redis.call('ZADD', K.agents, now + IDLE, adig)
end

-- Forget agent `adig` of the budget hash if it holds no policy and nothing in flight: every
-- field of its scope, its archived periods' counters and threshold marks. True if forgotten.
local AGENT_POLICY = {'limit', 'rl_n', 'cc', 'thr', 'open', 'arch'}
local function forget_agent(adig)
  local p = 'a:' .. adig .. ':'
  local names = {}
  for i, f in ipairs(AGENT_POLICY) do names[i] = p .. f end
  local v = redis.call('HMGET', K.budget, unpack(names))
  if v[1] or v[2] or v[3] or v[4] or tonumber(v[5] or '0') > 0 then
    return false
  end
  local drop = {}
  for _, f in ipairs(SCOPE_FIELDS) do drop[#drop + 1] = p .. f end
  for _, f in ipairs({'pend', 'arch'}) do drop[#drop + 1] = p .. f end
  for entry in string.gmatch(bounded(v[6], MAX_ARCH, p .. 'arch') or '', '[^,]+') do
    local pid = string.match(entry, '^(.*)@')
    drop[#drop + 1] = p .. 's:' .. pid
    drop[#drop + 1] = p .. 'r:' .. pid
  end
  hdel_all(K.budget, drop)
  return true
end

-- Close the open reservation `rid` (record fields `r`): release its whole estimate on every
-- scope, charge `charged` units to the periods it was reserved in, and remember the outcome
-- (the request that closed it, '' for expiry, and whether that request named it) for the
-- retention.
local function close_reservation(rid, r, status, charged, now, request, named, known)
  local est = tonumber(r[4])
  scope_settle('', rec(r, 8), est, charged, known)
  incr(K.budget, 'open', -1)
  if rec(r, 9) ~= '' then
    scope_settle('a:' .. r[9] .. ':', rec(r, 10), est, charged, known)
    incr(K.budget, 'a:' .. r[9] .. ':open', -1)
  end
  if r[3] ~= '' then
    incr(K.tasks, r[3] .. ':r', -est)
    incr(K.tasks, r[3] .. ':u', charged)
    task_seen(r[3], now)
  end
  redis.call('HDEL', K.res, rid)
  redis.call('ZREM', K.exp, rid)
  if r[7] ~= '' then
    redis.call('ZREM', K.open, r[7])
  end
  local outcome = {status, r[1], r[2], r[3], r[4], r[5], r[6], r[7], fmt(charged), fmt(now),
                   request, rec(r, 8), rec(r, 9), rec(r, 10), named}
  redis.call('HSET', K.closed, rid, table.concat(outcome, SEP))
  redis.call('ZADD', K.closedx, now + RETENTION, rid)
  local kind = status == 'released' and 'released' or (status == 'expired' and 'expired' or 'recorded')
  ledger(kind, r[1], r[2], charged, est, rid, status, '', rec(r, 8))
end

-- Lazy expiry, bounded: return at most REAP_LIMIT expired reservations to the budget, and
-- forget at most REAP_LIMIT each of the outcomes past their retention, the idle tasks past
-- theirs and the idle agents past theirs. No cron and no sweeper process is needed. Returns true when a counter or a task changed.
-- `expired_before`: due reservations this call already expired itself (they count towards the
-- limit); `now_s`: now as a string, if the caller has it.
local function reap(now, expired_before, now_s)
  local changed = false
  now_s = now_s or fmt(now)
  local before = expired_before or 0
  local left = REAP_LIMIT - before
  local expired = left > 0 and redis.call('ZRANGEBYSCORE', K.exp, '-inf', now_s, 'LIMIT', '0',
    before == 0 and REAP_LIMIT_S or fmt(left)) or {}
  for _, rid in ipairs(expired) do
    local r = redis.call('HGET', K.res, rid)
    if r then
      close_reservation(rid, split(r, 10), 'expired', 0, now, '', '1')
      changed = true
    else
      redis.call('ZREM', K.exp, rid)
    end
  end
  local old = redis.call('ZRANGEBYSCORE', K.closedx, '-inf', now_s, 'LIMIT', '0', REAP_LIMIT_S)
  for i = 1, #old, CHUNK do
    local j = math.min(i + CHUNK - 1, #old)
    redis.call('HDEL', K.closed, unpack(old, i, j))
    redis.call('ZREM', K.closedx, unpack(old, i, j))
  end
  local idle = redis.call('ZRANGEBYSCORE', K.tasksx, '-inf', now_s, 'LIMIT', '0', REAP_LIMIT_S)
  for _, tf in ipairs(idle) do
    if tonumber(redis.call('HGET', K.tasks, tf .. ':r') or '0') == 0 then
      redis.call('HDEL', K.tasks, tf .. ':c', tf .. ':u', tf .. ':r', tf .. ':n')
      redis.call('ZREM', K.tasksx, tf)
      changed = true
    else
      task_seen(tf, now) -- a run of it is still open: it is not idle
    end
  end
  local agents = redis.call('ZRANGEBYSCORE', K.agents, '-inf', now_s, 'LIMIT', '0', REAP_LIMIT_S)
  for _, adig in ipairs(agents) do
    if forget_agent(adig) then
      redis.call('ZREM', K.agents, adig)
      changed = true
    else
      agent_seen(adig, now) -- a budget or limit, or a run in flight: not forgotten
    end
  end
  return changed
end

-- Whether reap(now) would write anything.
local function due(now)
  for _, key in ipairs({K.exp, K.closedx, K.tasksx, K.agents}) do
    if #redis.call('ZRANGEBYSCORE', key, '-inf', now, 'LIMIT', 0, 1) > 0 then
      return true
    end
  end
  return false
end

local function task_state(tf)
  local t = redis.call('HMGET', K.tasks, tf .. ':c', tf .. ':u', tf .. ':r', tf .. ':n')
  return t[1] and tonumber(t[1]), tonumber(t[2] or '0'), tonumber(t[3] or '0'), t[4] ~= false
end

-- A scope's state as scripts reply it: limit|false, spent, reserved, open, period id,
-- period start|false, period end|false, rate units|false, rate per ms, burst, max in flight|false,
-- thresholds, period kind.
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
local function name_scopes(customer_id, p, agent, adig, now)
  redis.call('HSETNX', K.budget, 'customer', customer_id)
  if agent ~= '' then
    redis.call('HSET', K.budget, p .. 'name', agent)
    agent_seen(adig, now)
  end
end
