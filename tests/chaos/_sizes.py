"""How big each chaos scenario is: defaults sized for a few minutes on a busy 2-core machine.

Every size can be set by an environment variable, ``AGENTBILL_CHAOS_<NAME>`` (for example
``AGENTBILL_CHAOS_LOAD_OPS=2000``); ``AGENTBILL_CHAOS_SCALE`` multiplies every count that is
not set explicitly (``0.25`` for a quick look, ``4`` for a long soak). ``AGENTBILL_CHAOS_SEED``
replays a run's random choices (kill times, estimates, ...); the seed of every run is in
RELIABILITY.md.
"""

from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass

PREFIX = "AGENTBILL_CHAOS_"


def _scale() -> float:
    return float(os.environ.get(f"{PREFIX}SCALE", "1"))


def _count(name: str, default: int, *, scaled: bool = True) -> int:
    raw = os.environ.get(PREFIX + name.upper())
    if raw is not None:
        return int(raw)
    return max(1, round(default * _scale())) if scaled else default


@dataclass(frozen=True, slots=True)
class Sizes:
    workers: int
    """Worker processes per scenario (each with its own client and connection)."""
    load_ops: int
    """Load: preflights per worker."""
    kills: int
    """Worker death: SIGKILLs at random moments, each worker replaced; then every worker left."""
    death_ttl: int
    """Worker death: the reservations' TTL, seconds."""
    restarts: int
    """Restart with appendfsync always: kill -9 and restarts of redis-server mid-load."""
    restart_ops: int
    """Restart: settled runs between two restarts (and after the last one)."""
    down_ms: int
    """Restart: how long redis-server stays down, ms (a restart alone takes a few ms, which the
    client's own retries hide; down longer, calls fail and are in doubt)."""
    churn_ops: int
    """Dropped connections: preflights per worker while connections are killed."""
    outage_threads: int
    """Outage: clients calling at once."""
    outage_calls: int
    """Outage: preflights per client against the paused server (5x as many when unreachable)."""
    failover_workers: int
    """Failover and resharding: worker processes (Sentinel set or Redis Cluster)."""
    failover_ops: int
    """Failover and resharding: runs before the failover (or migration), and again after."""
    seed: int

    @classmethod
    def from_env(cls) -> Sizes:
        seed = os.environ.get(f"{PREFIX}SEED")
        return cls(
            workers=_count("workers", 8, scaled=False),
            load_ops=_count("load_ops", 600),
            kills=_count("kills", 20),
            death_ttl=_count("death_ttl", 1, scaled=False),
            restarts=_count("restarts", 3),
            restart_ops=_count("restart_ops", 500),
            down_ms=_count("down_ms", 1000, scaled=False),
            churn_ops=_count("churn_ops", 500),
            outage_threads=_count("outage_threads", 16, scaled=False),
            outage_calls=_count("outage_calls", 2),
            failover_workers=_count("failover_workers", 4, scaled=False),
            failover_ops=_count("failover_ops", 150),
            seed=int(seed) if seed is not None else random.SystemRandom().randrange(10**6),
        )

    def settings(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
