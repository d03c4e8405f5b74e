"""What agentbill keeps in Redis: bytes per customer and per 10,000 runs, measured.

Every figure is Redis's own ``MEMORY USAGE`` of the keys a workload left (samples of every
nested value), so the server's other contents and its allocator's slack do not blur it. The
workloads go through the public client, so they leave exactly what real calls leave.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from agentbill import AgentBillClient
from agentbill._keys import KeySpace

NAMESPACE = "bench-memory"
RUNS = 10_000


@dataclass(frozen=True)
class Footprint:
    """Bytes Redis holds for one workload, and how they split by key kind."""

    name: str
    count: int
    """Customers, or runs, the bytes are divided by."""
    total: int
    by_kind: dict[str, int]

    @property
    def each(self) -> float:
        return self.total / self.count


def _usage(r: redis.Redis, pattern: str) -> tuple[int, dict[str, int]]:
    total, by_kind = 0, dict[str, int]()
    for key in r.scan_iter(match=pattern, count=1000):
        size = int(r.memory_usage(key, samples=0) or 0)
        name = key.decode() if isinstance(key, bytes) else str(key)
        kind = name.rsplit(":", 1)[-1] if "}:" in name else "other"
        if ":idem:" in name or ":req:" in name:
            kind = "idempotency and request ids"
        total += size
        by_kind[kind] = by_kind.get(kind, 0) + size
    return total, by_kind


def footprints(url: str, customers: int) -> list[Footprint]:
    """Three workloads, each in its own namespace on the server at ``url``:
    ``customers`` customers with one run each (no budget set: every key has a TTL), the same
    with a monthly budget and thresholds, and one customer's RUNS runs (preflight + record,
    half of them on a task) with their ledger, outcomes and request ids."""
    out = []
    with redis.Redis.from_url(url) as r:
        for name, budget in (
            ("a customer with one run, no budget", False),
            ("a customer with a monthly budget and one run", True),
        ):
            ns = f"{NAMESPACE}-{'budget' if budget else 'free'}"
            with AgentBillClient(redis_url=url, namespace=ns) as c:
                for i in range(customers):
                    if budget:
                        c.set_budget(f"c{i}", 1000, period="month", thresholds=(80,))
                    c.preflight("agent", 5, f"c{i}").record(3)
            total, kinds = _usage(r, f"{KeySpace(ns).prefix}:*")
            out.append(Footprint(name, customers, total, kinds))
        ns = f"{NAMESPACE}-runs"
        with AgentBillClient(redis_url=url, namespace=ns, background_settle=True) as c:
            c.set_budget("hot", 10**12)
            for i in range(RUNS):
                check = c.preflight("agent", 5, "hot", task_ref=f"t{i % 2}" if i % 2 else None)
                check.record(3)
            c.flush()
        total, kinds = _usage(r, f"{KeySpace(ns).prefix}:*")
        out.append(Footprint(f"{RUNS:,} runs of one customer", RUNS // 10_000 or 1, total, kinds))
    return out
