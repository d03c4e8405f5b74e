-- events: the customer's ledger, oldest first.
-- Function flags: no-writes (it reads only, so a Redis over maxmemory still answers it)
--
-- KEYS[1..10] the customer's keys (see _common.lua)
-- ARGV[1..5]  reap limit, retentions, ledger cap (see _common.lua)
-- ARGV[6] return entries after this stream id ('-' for the oldest kept)
-- ARGV[7] at most this many entries
-- Reply: XRANGE's: {{id, {field, value, ...}}, ...}

-- At most MAX_ITEMS entries (the clients ask for EVENTS_PAGE, 1,000, at a time) whoever asks: a
-- caller other than agentbill's clients (a tenant key's own FCALL_RO) could ask for a billion,
-- and the ledger is as long as the tenant's raw XADD makes it (300,000 entries held Redis 0.8 s).
local after, n = ARGV[6], count(ARGV[7], 'count')
local start = after == '-' and '-' or ('(' .. after)
return redis.call('XRANGE', K.ledger, start, '+', 'COUNT', fmt(n))
