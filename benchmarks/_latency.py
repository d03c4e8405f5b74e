"""One process, one call at a time: agentbill's calls, their floors and the peer libraries.

Each function returns ``Op`` rows for ``_timing.interleave``; to benchmark a new call (a lease,
say), add one ``Op`` to the list that fits. ``server_time`` reads how long redis-server itself
spent on each op (INFO commandstats), to split a figure into the server's share and the
client's.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import redis

from agentbill import AgentBillClient, Check, Preflight, _core
from agentbill._check import BaseCheck
from agentbill._keys import tag_of_reservation
from benchmarks._server_cost import load_function
from benchmarks._timing import BLOCK, WARMUP, Op

NAMESPACE = "bench"
AGENT = "agent"
HOT = "hot"
BIG_LIMIT = 10**15  # a limit no run reaches: every measured preflight is approved

PING = "PING (redis-py)"
PREFLIGHT = "preflight"
PAIR = "preflight + record (pair)"
BATCH = 10
PREFLIGHT_MANY = f"preflight_many of {BATCH}, per decision"
LEASE = "lease: preflight + record, per run"
LEASE_SLICE = 1000
BATCHED = "batched"  # preflight_many's customer: its reservations are left open
RAW_PREFLIGHT = "preflight as a bare FCALL"
RAW_PAIR = "pair as two bare FCALLs"
NOOP_SCRIPT = "FCALL of `return 1`, preflight's KEYS/ARGV"
GET_BUDGET = "get_budget"
LIMITS_MOVING = "limits moving-window hit()"
LIMITS_FIXED = "limits fixed-window hit()"
THROTTLED_GCRA = "throttled-py GCRA limit()"


def ping_op(r: redis.Redis) -> Op:
    return Op(PING, r.ping)


def release_after(check: Check) -> None:
    """An ``Op.after`` for a timed preflight: give its reservation back, untimed."""
    check.release()


def agentbill_ops(client: AgentBillClient, customer: str = HOT) -> list[Op]:
    """The public calls, as a user makes them. ``preflight`` alone releases its reservation
    untimed after each call; the pair records it (the record is timed). To benchmark a new
    call (a lease, say), add an ``Op`` here."""

    def preflight() -> Check:
        return client.preflight(AGENT, 1, customer)

    def pair() -> None:
        client.preflight(AGENT, 1, customer).record(1)

    batch = [Preflight(AGENT, 1, BATCHED)] * BATCH
    # Left open for the run: one slice round trip per LEASE_SLICE runs, the rest local.
    lease = client.lease(AGENT, customer, slice_units=LEASE_SLICE, ttl=3600)

    def leased() -> None:
        lease.preflight(1).record(1)

    return [
        Op(PREFLIGHT, preflight, release_after),
        Op(PAIR, pair),
        # Left open (releasing them would cost 10 round trips per call), on their own customer:
        # open reservations barely change a preflight's cost (see the scale rows).
        Op(PREFLIGHT_MANY, lambda: client.preflight_many(batch), per_call=BATCH),
        Op(GET_BUDGET, lambda: client.get_budget(customer)),
        Op(LEASE, leased),
    ]


def floor_ops(client: AgentBillClient, r: redis.Redis, n: int, customer: str = HOT) -> list[Op]:
    """The same function calls with KEYS/ARGV built before timing and sent as bare FCALLs:
    what a preflight and a pair would cost with no agentbill Python around the round trip;
    and a function that does nothing, sent preflight's KEYS/ARGV: the cost of the call itself."""
    policy, library = client._script_settings, client._library
    pre_fn, settle_fn = library.function("preflight"), library.function("settle")
    client.preflight(AGENT, 1, customer).release()  # the library is loaded on the server

    def fcall(function: str, call: _core.Call) -> tuple[Any, ...]:
        return (function, len(call.keys), *call.keys, *call.args)

    def planned() -> tuple[tuple[Any, ...], tuple[Any, ...], str]:
        """One preflight's call (a fresh reservation id, as the client makes) and the record
        that closes it."""
        pre = _core.plan_preflight(
            policy, AGENT, 1, customer, None, None, None, None, BaseCheck
        ).call
        rid = str(pre.args[-1]).split("\x1f")[0]  # the packed fields start with it
        assert tag_of_reservation(rid)
        rec = _core.plan_record(policy, AGENT, 1, None, rid, None, True, None, None).call
        return fcall(pre_fn, pre), fcall(settle_fn, rec), rid

    count = WARMUP + n + 1
    alone = [planned() for _ in range(count)]
    pairs = [planned() for _ in range(count)]
    alone_it, pairs_it = iter(alone), iter(pairs)

    def raw_preflight() -> str:
        pre, _, rid = next(alone_it)
        r.fcall(*pre)
        return rid

    def raw_pair() -> None:
        pre, rec, _ = next(pairs_it)
        r.fcall(*pre)
        r.fcall(*rec)

    noop = (load_function(r, "bench_noop", "return 1"), *alone[-1][0][1:])

    return [
        Op(RAW_PREFLIGHT, raw_preflight, lambda rid: client.release(rid)),
        Op(RAW_PAIR, raw_pair),
        Op(NOOP_SCRIPT, lambda: r.fcall(*noop)),
    ]


def _accepted(ok: object) -> None:
    if ok is not True:
        raise RuntimeError(f"a peer's hit was refused ({ok!r}): raise its limit")


def peer_ops(url: str) -> list[Op]:
    """What a user would pick instead, on the same server, each on its own key, with limits so
    high that every hit is accepted (the path comparable to an approved preflight).

    limits' moving window keeps one list entry per hit within the window (capped at the
    limit); with 1,000,000/hour it holds every hit of this run.
    """
    from limits import parse
    from limits.storage import RedisStorage
    from limits.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter
    from throttled import RateLimiterType, RedisStore, Throttled, per_sec

    storage = RedisStorage(url)
    item = parse("1000000/hour")
    moving = MovingWindowRateLimiter(storage)
    fixed = FixedWindowRateLimiter(storage)
    gcra = Throttled(
        key="bench-gcra",
        using=RateLimiterType.GCRA.value,
        quota=per_sec(1_000_000),
        store=RedisStore(server=url),
    )

    def gcra_accepted(result: Any) -> None:
        _accepted(not result.limited)

    return [
        Op(LIMITS_MOVING, lambda: moving.hit(item, "bench-moving"), _accepted),
        Op(LIMITS_FIXED, lambda: fixed.hit(item, "bench-fixed"), _accepted),
        Op(THROTTLED_GCRA, gcra.limit, gcra_accepted),
    ]


SCRIPT_CALLS = ("evalsha", "eval", "eval_ro", "evalsha_ro", "fcall", "fcall_ro")
BOOKKEEPING = ("config", "info")


def _server_usec(stats: dict[str, Any]) -> float:
    """Microseconds the server spent on the calls since CONFIG RESETSTAT: the script calls
    (their time includes the commands they run, which commandstats also lists on their own),
    else every command; the benchmark's own CONFIG and INFO left out."""
    usec: dict[str, float] = {}
    for key, value in stats.items():
        name = key.removeprefix("cmdstat_")
        if not name.startswith(BOOKKEEPING):
            usec[name] = float(value["usec"])
    scripts = [v for k, v in usec.items() if k in SCRIPT_CALLS]
    return sum(scripts) if scripts else sum(usec.values())


def server_time(
    r: redis.Redis, ops: Sequence[Op], count: int, block: int = BLOCK
) -> dict[str, float]:
    """Seconds redis-server spends per call of each op: the ops run interleaved in blocks as
    in ``interleave``, INFO commandstats is read after each block (reset before it), and an
    op's figure is the median over its blocks of the block's server time per call. ``after``
    runs once a block is read out."""
    per_block: dict[str, list[float]] = {op.name: [] for op in ops}
    for turn in range(-(-count // block)):
        k = turn % len(ops)
        for op in (*ops[k:], *ops[:k]):
            r.config_resetstat()
            results = [op.call() for _ in range(block)]
            stats: Any = r.info("commandstats")
            per_block[op.name].append(_server_usec(stats) * 1e-6 / block / op.per_call)
            if op.after is not None:
                for result in results:
                    op.after(result)
    return {name: statistics.median(times) for name, times in per_block.items()}
