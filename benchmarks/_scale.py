"""Large states, written fast: a million customers, a hundred thousand open reservations.

Customers are written straight into Redis as the smallest budget record the scripts read (a
budget hash holding only ``limit``: every counter absent reads as zero), with the key names of
``agentbill._keys``. Open reservations are made by the scripts themselves, through the public
``preflight_many`` (one round trip per thousand), so they are exactly what real preflights leave.
Both are checked through the public client afterwards, so a change of layout fails loudly
instead of measuring the wrong thing.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from agentbill import AgentBillClient, Preflight
from agentbill._keys import KeySpace
from benchmarks._server_cost import load_function

BATCH = 2000  # customers per loader call
OPEN_BATCH = 1000  # preflights per preflight_many call
OPEN_TTL = 24 * 3600  # seconds: far beyond the run, so the reaper never touches them

# Benchmark-only loader (a function of its own): a budget hash with a limit for each declared
# key (KEYS[1] of the library's functions; see lua/_common.lua).
LOADER = """
for _, key in ipairs(KEYS) do
  redis.call('HSET', key, 'limit', ARGV[1])
end
return #KEYS
"""


def add_customers(r: redis.Redis, client: AgentBillClient, count: int, limit: int) -> float:
    """``count`` customers (``c0``, ``c1``, ...) with a budget of ``limit`` each and nothing
    spent or reserved, in ``client``'s namespace. Returns the seconds it took."""
    t0 = time.perf_counter()
    space = KeySpace(client.namespace)
    loader = load_function(r, "scale_loader", LOADER)
    with r.pipeline(transaction=False) as pipe:
        for first in range(0, count, BATCH):
            keys = [space.customer(f"c{i}").budget for i in range(first, min(count, first + BATCH))]
            pipe.fcall(loader, len(keys), *keys, limit)
            if len(pipe) >= 8:
                pipe.execute()
        pipe.execute()
    took = time.perf_counter() - t0
    for customer in ("c0", f"c{count - 1}"):
        status = client.get_budget(customer)
        if status.limit != limit or status.remaining != limit:
            raise RuntimeError(f"customers written in a layout the scripts do not read: {status}")
    return took


def add_open_reservations(client: AgentBillClient, customer: str, agent: str, count: int) -> float:
    """``count`` open, unexpired reservations of 1 unit each by ``agent`` for ``customer``,
    made by approved preflights. Returns the seconds it took."""
    t0 = time.perf_counter()
    made = 0
    while made < count:
        size = min(OPEN_BATCH, count - made)
        checks = client.preflight_many([Preflight(agent, 1, customer, ttl=OPEN_TTL)] * size)
        if not all(check.approved for check in checks):
            raise RuntimeError("a preflight making an open reservation was refused")
        made += size
    took = time.perf_counter() - t0
    status = client.get_budget(customer)
    if status.open_reservations != count:
        raise RuntimeError(f"expected {count} open reservations: {status}")
    return took


def memory(r: redis.Redis) -> str:
    info: Any = r.info("memory")
    return str(info["used_memory_human"])
