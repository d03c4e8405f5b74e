"""The cost of ``durability="replicated"``: preflight and the preflight+record pair with and
without a WAIT for one replica, against a primary and its replica on this machine, interleaved
in one run and reported as ratios (``make bench``'s durability section)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from agentbill import AgentBillClient
from benchmarks._timing import Op, Samples, interleave
from tests._servers import RedisServer

NAMESPACE = "bench-durability"
MODES = ("primary", "replicated")


@contextmanager
def primary_and_replica() -> Iterator[RedisServer]:
    primary = RedisServer().start()
    replica = RedisServer(extra={"replicaof": f"127.0.0.1 {primary.port}"}).start()
    try:
        with replica.client() as r:
            while r.info("replication")["master_link_status"] != "up":
                time.sleep(0.02)
        yield primary
    finally:
        replica.stop()
        primary.stop()


def measure_durability(n: int) -> dict[str, Samples]:
    """``n`` timed calls of each op, in both modes, interleaved."""
    with primary_and_replica() as primary:
        clients = {
            # A loaded machine can stall the replica for a moment: WAIT gets 2.5 s here.
            mode: AgentBillClient(
                redis_url=primary.url,
                namespace=NAMESPACE,
                durability=mode,  # type: ignore[arg-type]
                socket_timeout=5.0,
                retry_deadline=5.0,
            )
            for mode in MODES
        }
        try:
            ops = []
            for mode, client in clients.items():
                customer = f"hot-{mode}"

                def preflight(c: AgentBillClient = client, who: str = customer) -> object:
                    return c.preflight("agent", 1, who)

                def pair(c: AgentBillClient = client, who: str = customer) -> object:
                    return c.preflight("agent", 1, who).record(1)

                ops += [
                    Op(f"preflight, {mode}", preflight, after=lambda check: check.release()),
                    Op(f"preflight + record, {mode}", pair),
                ]
            with primary.client() as raw:
                ops.append(Op("PING (redis-py)", raw.ping))
                return interleave(ops, n)
        finally:
            for client in clients.values():
                client.close()


def durability_section(samples: dict[str, Samples]) -> list[str]:
    """RESULTS.md's lines for the durability rows."""

    def us(seconds: float) -> str:
        return f"{seconds * 1e6:.0f}"

    out = [
        "",
        "## Replicated durability",
        "",
        "A primary and one replica on this machine (loopback). `durability='replicated'` sends "
        "`WAIT 1` after each write in the same round trip; the ratio is replicated / primary in "
        "the same run.",
        "",
        "| operation | primary p50 (us) | replicated p50 (us) | ratio p50 | ratio p99 |",
        "|---|---|---|---|---|",
    ]
    for op in ("preflight", "preflight + record"):
        a, b = samples[f"{op}, primary"], samples[f"{op}, replicated"]
        out.append(
            f"| {op} | {us(a.p50)} | {us(b.p50)} | {b.p50 / a.p50:.2f}x | {b.p99 / a.p99:.2f}x |"
        )
    ping = samples["PING (redis-py)"]
    out += ["", f"PING p50 in the same run: {us(ping.p50)} us.", ""]
    return out
