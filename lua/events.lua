-- events: the customer's ledger, oldest first.
--
-- KEYS[1..8]  the customer's keys (see _common.lua)
-- ARGV[1..3]  reap limit, outcome retention (ms), ledger cap (see _common.lua)
-- ARGV[4] return entries after this stream id ('-' for the oldest kept)
-- ARGV[5] at most this many entries
-- Reply: XRANGE's: {{id, {field, value, ...}}, ...}

local after, count = ARGV[4], ARGV[5]
local start = after == '-' and '-' or ('(' .. after)
return redis.call('XRANGE', K.ledger, start, '+', 'COUNT', count)
