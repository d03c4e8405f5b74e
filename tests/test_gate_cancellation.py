"""Cancellation and interrupts around a gated call or a run block (issue 16, finding 11).

A cancelled, timed-out or interrupted gated call never runs its body after the cancel and holds
nothing once it has returned: a preflight interrupted before its reply was read is released by
its client-made reservation id, and a cancel that arrives with the preflight's reply (Python
3.11's ``asyncio.wait_for``, inside redis-py, can swallow it) is honoured before the body starts.

Nothing is faked: an interrupt or a cancel *during* the preflight's round trip, after Redis
reserved, is made by the client's own ``on_threshold`` callback, which runs between the reply
and the decision being returned; the stress tests cancel hundreds of real calls at random
points and then read Redis.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from agentbill import AgentBillClient, AsyncAgentBillClient, BudgetStatus, ThresholdCrossing
from tests._servers import RedisServer


class Interrupt(BaseException):
    """Stands for KeyboardInterrupt/SystemExit: a BaseException no client call catches."""


def _state(b: BudgetStatus) -> tuple[int, int, int]:
    return b.spent, b.reserved, b.open_reservations


@pytest.fixture
def looker(redis_server: RedisServer, namespace: str) -> Iterator[AgentBillClient]:
    """A client to look with; customers c1..c3 have a threshold at 1% of 1000, so the first
    preflight of 10 units on each crosses it (once per period) and runs ``on_threshold``."""
    with AgentBillClient(redis_url=redis_server.url, namespace=namespace) as c:
        for customer in CUSTOMERS:
            c.set_budget(customer, 1000, thresholds=[1])
        yield c


CUSTOMERS = ("c1", "c2", "c3")


def _nothing_held(looker: AgentBillClient) -> None:
    for customer in CUSTOMERS:
        assert _state(looker.get_budget(customer)) == (0, 0, 0), customer


def interrupt(crossing: ThresholdCrossing) -> None:
    raise Interrupt


def cancel_me(crossing: ThresholdCrossing) -> None:
    task = asyncio.current_task()
    assert task is not None
    task.cancel()  # requested while the preflight's reply is being read


# -- an interrupt after Redis reserved, before the decision came back ------------------------------


def test_sync_gate_interrupted_in_its_preflight_holds_nothing(
    looker: AgentBillClient, redis_server: RedisServer, namespace: str
) -> None:
    ran: list[str] = []
    with AgentBillClient(
        redis_url=redis_server.url, namespace=namespace, on_threshold=interrupt
    ) as client:

        @client.gate("agent", 10, "c1")
        def body() -> None:
            ran.append("gate")

        with pytest.raises(Interrupt):
            body()
        with pytest.raises(Interrupt), client.run("agent", 10, "c2"):
            ran.append("run")
    assert ran == []
    _nothing_held(looker)


def test_async_gate_interrupted_in_its_preflight_holds_nothing(
    looker: AgentBillClient, redis_server: RedisServer, namespace: str
) -> None:
    ran: list[str] = []

    async def main() -> None:
        async with AsyncAgentBillClient(
            redis_url=redis_server.url, namespace=namespace, on_threshold=interrupt
        ) as client:

            @client.gate("agent", 10, "c1")
            async def body() -> None:
                ran.append("gate")

            with pytest.raises(Interrupt):
                await body()
            with pytest.raises(Interrupt):
                async with client.run("agent", 10, "c2"):
                    ran.append("run")

    asyncio.run(main())
    assert ran == []
    _nothing_held(looker)


# -- a cancel that arrives with the preflight's reply ----------------------------------------------


@pytest.mark.parametrize("kind", ["sync client, async def", "async client"])
def test_a_cancel_arriving_with_the_reply_stops_the_body(
    looker: AgentBillClient, redis_server: RedisServer, namespace: str, kind: str
) -> None:
    """The cancel is requested after Redis reserved and before the gate sees the decision:
    the body must not start (it would run its code up to its first await), and the
    reservation is released."""
    ran: list[str] = []

    async def main() -> None:
        factory = AsyncAgentBillClient if kind == "async client" else AgentBillClient
        client: AgentBillClient | AsyncAgentBillClient = factory(
            redis_url=redis_server.url, namespace=namespace, on_threshold=cancel_me
        )

        @client.gate("agent", 10, "c1")
        async def body() -> None:
            ran.append("gate")
            await asyncio.sleep(0)

        async def block() -> None:
            async with client.run("agent", 10, "c2"):
                ran.append("run")
                await asyncio.sleep(0)

        for call in (body, block) if kind == "async client" else (body,):
            with pytest.raises(asyncio.CancelledError):
                await asyncio.create_task(call())
        closed = client.close()
        if closed is not None:
            await closed

    asyncio.run(main())
    assert ran == []
    _nothing_held(looker)


def test_a_timeout_during_the_record_charges_the_run_and_times_out(
    looker: AgentBillClient, redis_server: RedisServer, namespace: str
) -> None:
    """The body ran, so its record lands even though the timeout cancels it half-way; and the
    caller still gets its TimeoutError (on Python 3.11 redis-py's ``asyncio.wait_for`` could
    swallow that cancel: the timeout then silently did not happen)."""

    async def main() -> None:
        async with AsyncAgentBillClient(redis_url=redis_server.url, namespace=namespace) as client:
            ran: list[bool] = []

            @client.gate("agent", 10, "c1", units=4)
            async def body() -> None:
                ran.append(True)
                scope.reschedule(asyncio.get_running_loop().time())  # due: cancels next turn

            with pytest.raises(TimeoutError):
                async with asyncio.timeout(None) as scope:
                    await body()
            assert ran == [True]

    asyncio.run(main())
    assert _state(looker.get_budget("c1")) == (4, 0, 0)


# -- many calls cancelled at random points ---------------------------------------------------------


UNITS = 3


async def _cancel_storm(
    client: AsyncAgentBillClient, seed: int, make_call: Callable[[int, list[Any]], Awaitable[None]]
) -> tuple[int, list[int]]:
    """200 gated calls at once, most cancelled after a random number of loop turns (or by a
    random timeout). Returns how many bodies finished and the calls whose body started after
    their cancel was requested."""
    rng = random.Random(seed)
    n = 200
    cancelled = [False] * n
    late_starts: list[int] = []
    finished: list[int] = []
    ctx = [cancelled, late_starts, finished, rng]

    async def after_turns(i: int, task: asyncio.Task[None], turns: int) -> None:
        for _ in range(turns):
            await asyncio.sleep(0)
        cancelled[i] = True
        task.cancel()

    tasks: list[asyncio.Task[None]] = []
    cancellers = []
    for i in range(n):
        how = rng.random()
        if how < 0.15:  # a timeout: asyncio.wait_for (Python 3.11's has the race) or timeout
            delay = rng.uniform(0, 0.004)
            call = make_call(i, ctx)
            timed = asyncio.wait_for(call, delay) if how < 0.08 else _within(call, delay)
            tasks.append(asyncio.ensure_future(timed))
            continue
        task = asyncio.ensure_future(make_call(i, ctx))
        tasks.append(task)
        if how < 0.9:
            cancellers.append(asyncio.ensure_future(after_turns(i, task, rng.randrange(40))))
    await asyncio.gather(*tasks, *cancellers, return_exceptions=True)
    return len(finished), late_starts


async def _within(call: Awaitable[None], delay: float) -> None:
    async with asyncio.timeout(delay):
        await call


def _body_of(i: int, ctx: list[Any]) -> Callable[[], Awaitable[None]]:
    cancelled, late_starts, finished, rng = ctx
    pause = rng.choice([0, 0, 0.0005, 0.002])

    async def body() -> None:
        if cancelled[i]:
            late_starts.append(i)
        await asyncio.sleep(pause)
        finished.append(i)

    return body


@pytest.mark.parametrize("form", ["gate", "run block"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_cancelled_calls_hold_nothing_and_never_start_late(
    redis_server: RedisServer, namespace: str, form: str, seed: int
) -> None:
    async def main() -> tuple[int, list[int], BudgetStatus]:
        async with AsyncAgentBillClient(redis_url=redis_server.url, namespace=namespace) as client:

            async def gated(i: int, ctx: list[Any]) -> None:
                body = _body_of(i, ctx)
                if form == "gate":
                    await client.gate("agent", 10, "c1", units=UNITS)(body)()
                    return
                async with client.run("agent", 10, "c1") as run:
                    await body()
                    await run.record(UNITS)

            finished, late = await _cancel_storm(client, seed, gated)
            return finished, late, await client.get_budget("c1")

    finished, late, budget = asyncio.run(main())
    assert late == []  # no body started after its cancel was requested
    assert (budget.reserved, budget.open_reservations) == (0, 0)  # nothing held
    assert budget.spent == UNITS * finished  # every body that finished was charged, once
    assert 0 < finished < 200


# -- what the scripts must do for a release that overtakes its preflight ---------------------------


def test_a_preflight_landing_after_its_release_reserves_nothing(
    both_clients: AgentBillClient,
) -> None:
    """A cancelled gate releases its preflight by id at once; the preflight itself (sent on
    another connection) may reach Redis after that release. It must reserve nothing."""
    plan = both_clients._plan_preflight("agent", 10, "c1")
    both_clients.release(plan.reservation_id)  # the gate's release, first
    both_clients._preflight(plan)  # the preflight, landing late; nobody reads its reply
    assert _state(both_clients.get_budget("c1")) == (0, 0, 0)
