-- events: the customer's ledger, oldest first.
-- Function flags: no-writes (it reads only, so a Redis over maxmemory still answers it)
--
-- KEYS[1..10] the customer's keys (see _common.lua)
-- ARGV[1..5]  reap limit, retentions, ledger cap (see _common.lua)
-- ARGV[6] return entries after this stream id ('-' for the oldest kept)
-- ARGV[7] at most this many entries
-- Reply: XRANGE's: {{id, {field, value, ...}}, ...}

local after, count = ARGV[6], ARGV[7]
local start = after == '-' and '-' or ('(' .. after)
return redis.call('XRANGE', K.ledger, start, '+', 'COUNT', count)
