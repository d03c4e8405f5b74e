"""Real processes racing on one budget: the scripts' atomicity is the only thing keeping order.

Every worker is a separate process (tests/_processes.py) with its own client and its own
connection; a barrier releases them together so their preflights reach Redis at once.
"""

from __future__ import annotations

import random
import threading
import traceback
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from typing import NamedTuple, TypeVar, cast

import pytest

from agentbill import AgentBillClient
from tests._processes import CTX
from tests._servers import RedisServer

T = TypeVar("T")
Outcome = tuple[int, bool, object]
"""A worker's index, whether it returned, and its return value or traceback."""

# Generous: the first wait also covers every worker's interpreter start-up on a busy machine.
BARRIER_TIMEOUT = 120.0
RESULT_TIMEOUT = 240.0
AGENT = "agent"
ROUNDS = 5


# -- running workers -----------------------------------------------------------------------------


def _entry(
    target: Callable[..., object],
    index: int,
    results: Queue[Outcome],
    args: tuple[object, ...],
) -> None:
    try:
        results.put((index, True, target(*args)))
    except BaseException:
        results.put((index, False, traceback.format_exc()))


def run_processes(target: Callable[..., T], args: Sequence[tuple[object, ...]]) -> list[T]:
    """Run ``target(*args[i])`` in one worker process per entry; their return values, in order.

    A worker that raises fails the test with its traceback.
    """
    results: Queue[Outcome] = CTX.Queue()
    procs = [
        CTX.Process(target=_entry, args=(target, i, results, a), daemon=True)
        for i, a in enumerate(args)
    ]
    for proc in procs:
        proc.start()
    collected: dict[int, T] = {}
    try:
        for _ in procs:
            index, ok, value = results.get(timeout=RESULT_TIMEOUT)
            if not ok:
                pytest.fail(f"worker {index} raised:\n{value}")
            collected[index] = cast(T, value)
        for proc in procs:
            proc.join(timeout=30)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        results.close()
        results.join_thread()
    assert all(proc.exitcode == 0 for proc in procs)
    return [collected[i] for i in range(len(procs))]


def warm_up(client: AgentBillClient) -> None:
    """Load the library into the server, so no racer's first call pays for loading it."""
    client.preflight(AGENT, 0, "warm-up").release()


# -- racing preflights ---------------------------------------------------------------------------


class Ask(NamedTuple):
    """One preflight of one round."""

    customer: str
    units: int
    task_ref: str | None = None
    task_ceiling: int | None = None


class Answer(NamedTuple):
    ask: Ask
    approved: bool
    reason: str | None
    remaining: int | None
    task_remaining: int | None
    reservation_id: str | None


Connect = Callable[[str], AbstractContextManager[AgentBillClient]]
"""Makes a worker's client for a namespace; module-level (or a partial of one), so it pickles."""


def url_client(url: str, namespace: str) -> AgentBillClient:
    return AgentBillClient(redis_url=url, namespace=namespace)


def race_worker(
    connect: Connect, namespace: str, asks: list[Ask], barrier: Barrier
) -> list[Answer]:
    """Per round: wait for every racer, then preflight once."""
    answers = []
    with connect(namespace) as client:
        client.get_budget("warm-up")  # connected before the first start signal
        for ask in asks:
            barrier.wait(timeout=BARRIER_TIMEOUT)
            check = client.preflight(
                AGENT, ask.units, ask.customer, task_ref=ask.task_ref, task_ceiling=ask.task_ceiling
            )
            answers.append(
                Answer(
                    ask,
                    check.approved,
                    check.reason,
                    check.remaining,
                    check.task_remaining,
                    check.reservation_id,
                )
            )
    return answers


def race(connect: Connect, namespace: str, racers: int, asks: list[Ask]) -> dict[Ask, list[Answer]]:
    """Every racer makes every ask, one round per ask; the answers grouped by ask."""
    barrier = CTX.Barrier(racers)
    per_worker = run_processes(race_worker, [(connect, namespace, asks, barrier)] * racers)
    by_ask: dict[Ask, list[Answer]] = {ask: [] for ask in asks}
    for answers in per_worker:
        assert [a.ask for a in answers] == asks
        for answer in answers:
            by_ask[answer.ask].append(answer)
    return by_ask


def check_budget_race(
    client: AgentBillClient, by_ask: dict[Ask, list[Answer]], racers: int, limit: int
) -> None:
    """``racers`` preflights of ``ask.units`` on a fresh budget of ``limit``: exactly as many
    approvals as fit, each seeing the state the one before it left."""
    for ask, answers in by_ask.items():
        fits = min(racers, limit // ask.units)
        approved = [a for a in answers if a.approved]
        assert len(approved) == fits, ask
        assert {a.reason for a in answers if not a.approved} <= {"budget_exhausted"}
        assert len({a.reservation_id for a in approved}) == fits
        # Distinct remainders, one per approval: the calls ran one at a time.
        assert sorted(a.remaining or 0 for a in approved) == [
            limit - ask.units * k for k in range(fits, 0, -1)
        ]
        budget = client.get_budget(ask.customer)
        assert budget.reserved == ask.units * fits
        assert budget.open_reservations == fits
        assert budget.spent + budget.reserved <= limit


RACERS = 10
LIMIT = 8


@pytest.mark.parametrize("units", [LIMIT, 1])
def test_racing_preflights_never_approve_more_than_the_budget(
    redis_server: RedisServer, client: AgentBillClient, namespace: str, units: int
) -> None:
    asks = [Ask(f"race-{units}-{i}", units) for i in range(ROUNDS)]
    for ask in asks:
        client.set_budget(ask.customer, LIMIT)
    warm_up(client)

    by_ask = race(partial(url_client, redis_server.url), namespace, RACERS, asks)

    check_budget_race(client, by_ask, RACERS, LIMIT)


TASK_CEILING = 10
TASK_UNITS = 3
TASK_RACERS = 8


@pytest.mark.parametrize("opened_by", ["open_task", "preflight"])
def test_racing_preflights_never_pass_the_task_ceiling(
    redis_server: RedisServer, client: AgentBillClient, namespace: str, opened_by: str
) -> None:
    """The task is opened beforehand, or by the racers' own preflights (``task_ceiling``)."""
    customer = "acme"
    opening = TASK_CEILING if opened_by == "preflight" else None
    asks = [Ask(customer, TASK_UNITS, f"task-{i}", opening) for i in range(ROUNDS)]
    if opened_by == "open_task":
        for ask in asks:
            assert ask.task_ref is not None
            client.open_task(ask.task_ref, TASK_CEILING, customer)
    warm_up(client)

    by_ask = race(partial(url_client, redis_server.url), namespace, TASK_RACERS, asks)

    fits = min(TASK_RACERS, TASK_CEILING // TASK_UNITS)
    for ask, answers in by_ask.items():
        assert ask.task_ref is not None
        approved = [a for a in answers if a.approved]
        assert len(approved) == fits, ask
        assert {a.reason for a in answers if not a.approved} <= {"task_ceiling_exceeded"}
        assert sorted(a.task_remaining or 0 for a in approved) == [
            TASK_CEILING - TASK_UNITS * k for k in range(fits, 0, -1)
        ]
        task = client.get_task(ask.task_ref, customer)
        assert (task.ceiling, task.reserved, task.used) == (TASK_CEILING, TASK_UNITS * fits, 0)
    assert client.get_budget(customer).reserved == TASK_UNITS * fits * ROUNDS


# -- a longer mixed run --------------------------------------------------------------------------


@dataclass
class Tally:
    """What one worker saw and did in the mixed run."""

    charged: dict[str, int]
    approvals: dict[str, int]
    refusals: dict[str, int]
    remaining_seen: list[int] = field(default_factory=list)
    """``remaining`` of every approval."""
    committed_seen: list[int] = field(default_factory=list)
    """spent + reserved of the customer right after every settlement."""


def mixed_worker(
    url: str, namespace: str, customers: list[str], ops: int, seed: int, barrier: Barrier
) -> Tally:
    """``ops`` rounds of: preflight 1..5 units, then record 0..estimate units, or release.

    Records go by reservation id or, as often, without one (closing this agent's oldest open
    reservation, which is the one just made: each worker is its own agent).
    """
    rng = random.Random(seed)
    agent = f"agent-{seed}"
    tally = Tally(
        charged=dict.fromkeys(customers, 0),
        approvals=dict.fromkeys(customers, 0),
        refusals=dict.fromkeys(customers, 0),
    )
    with AgentBillClient(redis_url=url, namespace=namespace) as client:
        client.get_budget(customers[0])
        barrier.wait(timeout=BARRIER_TIMEOUT)
        for _ in range(ops):
            customer = rng.choice(customers)
            estimate = rng.randint(1, 5)
            check = client.preflight(agent, estimate, customer)
            if not check.approved:
                tally.refusals[customer] += 1
                continue
            tally.approvals[customer] += 1
            assert check.remaining is not None
            tally.remaining_seen.append(check.remaining)
            units = rng.randint(0, estimate)
            action = rng.randrange(3)
            if action == 0:
                settled = check.record(units)
            elif action == 1:
                settled = client.record(agent, units, customer)
            else:
                settled = check.release()
            # Each reservation is closed once, by the worker that made it.
            assert settled.reservation_id == check.reservation_id
            assert not settled.replayed
            tally.charged[customer] += settled.charged
            assert settled.spent is not None  # None only for a settlement queued offline
            assert settled.reserved is not None
            tally.committed_seen.append(settled.spent + settled.reserved)
    return tally


MIXED_WORKERS = 6
MIXED_OPS = 400
MIXED_LIMIT = 500


@pytest.mark.parametrize("flushing", [False, True], ids=["", "library-flushed-meanwhile"])
def test_a_mixed_run_keeps_every_count_exact(
    redis_server: RedisServer, client: AgentBillClient, namespace: str, flushing: bool
) -> None:
    """``flushing``: FUNCTION FLUSH over and over while the workers run. A call answered
    "Function not found" ran nothing; the worker loads the library and sends it once more as
    the same request, so every count stays exact (and no settlement is a replay)."""
    customers = ["hot-1", "hot-2"]
    for customer in customers:
        client.set_budget(customer, MIXED_LIMIT)
    warm_up(client)
    barrier = CTX.Barrier(MIXED_WORKERS)
    done = threading.Event()

    def flush_until_done() -> None:
        """FUNCTION FLUSH, then again once a worker loaded the library back and a moment
        passed (a flush during a reload is retried, as the same request, too)."""
        with redis_server.client() as r:
            while not done.wait(0.02):
                if r.function_list():
                    r.function_flush()

    flusher = threading.Thread(target=flush_until_done)
    if flushing:
        flusher.start()
    try:
        tallies = run_processes(
            mixed_worker,
            [
                (redis_server.url, namespace, customers, MIXED_OPS, seed, barrier)
                for seed in range(MIXED_WORKERS)
            ],
        )
    finally:
        done.set()
        if flushing:
            flusher.join()
    if flushing:
        with redis_server.client() as r:
            reloads = r.info("commandstats").get("cmdstat_function|load", {"calls": 0})
        assert int(reloads["calls"]) > MIXED_WORKERS  # the flushes did hit the workers

    for tally in tallies:
        assert all(0 <= r <= MIXED_LIMIT for r in tally.remaining_seen)
        assert all(c <= MIXED_LIMIT for c in tally.committed_seen)
    for customer in customers:
        budget = client.get_budget(customer)
        assert (budget.reserved, budget.open_reservations) == (0, 0)
        assert budget.spent == sum(t.charged[customer] for t in tallies)
        assert budget.spent <= MIXED_LIMIT
        # Both answers happened, so the limit was actually contended.
        assert sum(t.approvals[customer] for t in tallies) > 0
        assert sum(t.refusals[customer] for t in tallies) > 0
