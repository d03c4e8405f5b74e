-- agentbill shared prelude: prepended to every operation script by the client that loads it.
--
-- Every script of one customer takes the same first seven KEYS, all sharing the customer's
-- {hash tag} so one script call runs on one Redis Cluster slot:
--   KEYS[1] budget   hash  limit (absent: unlimited), spent, reserved, open, seq, customer
--   KEYS[2] res      hash  reservation id -> open reservation record
--   KEYS[3] exp      zset  reservation id scored by its expiry (ms, Redis clock)
--   KEYS[4] open     zset  "<group>:<seq>:<reservation id>" (all scores 0: lexical order)
--   KEYS[5] tasks    hash  "<task digest>:c|u|r|n" -> ceiling, used, reserved, task_ref
--   KEYS[6] closed   hash  reservation id -> outcome of a closed reservation
--   KEYS[7] closedx  zset  reservation id scored by when its outcome may be forgotten
--
-- Records are fields joined by \31 (unit separator): ids never hold control characters, and
-- integers are written with %d because tostring() and cjson round to 14 significant digits.
--   reservation: agent, task_ref, task digest, estimate, created_ms, expires_ms, open member
--   outcome:     status, <the 7 reservation fields>, charged, closed_ms, request id that closed it

local SEP = '\31'

local K = {
  budget = KEYS[1], res = KEYS[2], exp = KEYS[3], open = KEYS[4],
  tasks = KEYS[5], closed = KEYS[6], closedx = KEYS[7],
}

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

local function split(s)
  local out = {}
  for field in string.gmatch(s .. SEP, '([^' .. SEP .. ']*)' .. SEP) do
    out[#out + 1] = field
  end
  return out
end

-- Milliseconds on the Redis server's clock: every worker agrees on it.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Close the open reservation `rid` (record fields `r`): release its whole estimate on every
-- scope, charge `charged` units, and remember the outcome (and the request that closed it, ''
-- for expiry) for `retention` ms.
local function close_reservation(rid, r, status, charged, now, retention, request)
  local est = tonumber(r[4])
  incr(K.budget, 'reserved', -est)
  incr(K.budget, 'open', -1)
  incr(K.budget, 'spent', charged)
  if r[3] ~= '' then
    incr(K.tasks, r[3] .. ':r', -est)
    incr(K.tasks, r[3] .. ':u', charged)
  end
  redis.call('HDEL', K.res, rid)
  redis.call('ZREM', K.exp, rid)
  redis.call('ZREM', K.open, r[7])
  local outcome = {status, r[1], r[2], r[3], r[4], r[5], r[6], r[7], fmt(charged), fmt(now), request}
  redis.call('HSET', K.closed, rid, table.concat(outcome, SEP))
  redis.call('ZADD', K.closedx, now + retention, rid)
end

-- Lazy expiry, bounded: return at most `limit` expired reservations to the budget and forget
-- at most `limit` outcomes past their retention. No cron and no sweeper process is needed.
local function reap(now, limit, retention)
  local expired = redis.call('ZRANGEBYSCORE', K.exp, '-inf', now, 'LIMIT', 0, limit)
  for _, rid in ipairs(expired) do
    local rec = redis.call('HGET', K.res, rid)
    if rec then
      close_reservation(rid, split(rec), 'expired', 0, now, retention, '')
    else
      redis.call('ZREM', K.exp, rid)
    end
  end
  local old = redis.call('ZRANGEBYSCORE', K.closedx, '-inf', now, 'LIMIT', 0, limit)
  if #old > 0 then
    redis.call('HDEL', K.closed, unpack(old))
    redis.call('ZREM', K.closedx, unpack(old))
  end
end

local function budget_state()
  local b = redis.call('HMGET', K.budget, 'limit', 'spent', 'reserved', 'open')
  return b[1] and tonumber(b[1]), tonumber(b[2] or '0'), tonumber(b[3] or '0'), tonumber(b[4] or '0')
end

local function task_state(tf)
  local t = redis.call('HMGET', K.tasks, tf .. ':c', tf .. ':u', tf .. ':r', tf .. ':n')
  return t[1] and tonumber(t[1]), tonumber(t[2] or '0'), tonumber(t[3] or '0'), t[4] ~= false
end

-- ------------------------------------------------------------------------------------------
