"""@client.gate: preflight before the body, record after, release if the body raises."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Iterator

import pytest

from agentbill import (
    AgentBillClient,
    BudgetExhaustedError,
    InvalidRequestError,
    TaskCeilingExceededError,
)


def test_records_the_estimate_by_default(client: AgentBillClient) -> None:
    @client.gate("agent", 10, "c1")
    def run(x: int) -> int:
        assert client.get_budget("c1").reserved == 10  # the body runs under a reservation
        return x * 2

    assert run(21) == 42
    budget = client.get_budget("c1")
    assert (budget.spent, budget.reserved, budget.open_reservations) == (10, 0, 0)


def test_records_units_given_as_int_or_callable_of_the_result(client: AgentBillClient) -> None:
    @client.gate("agent", 10, "c1", units=3)
    def fixed() -> str:
        return "ok"

    @client.gate("agent", 10, "c1", units=len)
    def measured() -> str:
        return "twelve chars"

    fixed()
    measured()
    assert client.get_budget("c1").spent == 3 + 12


def test_refusal_does_not_run_the_body(client: AgentBillClient) -> None:
    client.set_budget("c1", 5)
    ran: list[bool] = []

    @client.gate("agent", 10, "c1")
    def run() -> None:
        ran.append(True)

    with pytest.raises(BudgetExhaustedError):
        run()
    assert ran == []
    assert client.get_budget("c1").reserved == 0


def test_task_refusal_raises_task_error(client: AgentBillClient) -> None:
    @client.gate("agent", 6, "c1", task_ref="t", task_ceiling=10)
    def run() -> None:
        pass

    run()
    with pytest.raises(TaskCeilingExceededError):
        run()


@pytest.mark.parametrize("exc", [ValueError("boom"), KeyboardInterrupt(), SystemExit(3)])
def test_body_failure_releases_and_reraises(client: AgentBillClient, exc: BaseException) -> None:
    @client.gate("agent", 10, "c1")
    def run() -> None:
        raise exc

    with pytest.raises(type(exc)):
        run()
    budget = client.get_budget("c1")
    assert (budget.spent, budget.reserved, budget.open_reservations) == (0, 0, 0)


def test_failing_units_callable_charges_the_estimate_and_raises(client: AgentBillClient) -> None:
    @client.gate("agent", 10, "c1", units=lambda r: 1 // 0)
    def run() -> int:
        return 1

    with pytest.raises(ZeroDivisionError):
        run()
    assert client.get_budget("c1").spent == 10


def test_bad_units_from_callable_is_invalid_and_charges_the_estimate(
    client: AgentBillClient,
) -> None:
    @client.gate("agent", 10, "c1", units=lambda r: -5)
    def run() -> int:
        return 1

    with pytest.raises(InvalidRequestError) as info:
        run()
    assert info.value.field == "units"
    assert client.get_budget("c1").spent == 10


def test_bad_gate_arguments_fail_at_decoration(client: AgentBillClient) -> None:
    with pytest.raises(InvalidRequestError) as info:
        client.gate("agent", -1, "c1")
    assert info.value.field == "estimated_units"


def test_keeps_name_signature_and_works_on_methods(client: AgentBillClient) -> None:
    class Agent:
        def __init__(self) -> None:
            self.calls = 0

        @client.gate("agent", 2, "c1")
        def run(self, task: str, *, depth: int = 1) -> str:
            """Docs."""
            self.calls += 1
            return task * depth

    agent = Agent()
    assert agent.run("ab", depth=2) == "abab"
    assert agent.calls == 1
    assert Agent.run.__name__ == "run"
    assert Agent.run.__doc__ == "Docs."
    assert list(inspect.signature(Agent.run).parameters) == ["self", "task", "depth"]
    assert client.get_budget("c1").spent == 2


def test_async_def_preflights_when_awaited_not_when_created(client: AgentBillClient) -> None:
    @client.gate("agent", 4, "c1")
    async def run(x: int) -> int:
        assert client.get_budget("c1").reserved == 4
        await asyncio.sleep(0)
        return x + 1

    coro = run(1)
    assert inspect.iscoroutinefunction(run)
    assert client.get_budget("c1").reserved == 0  # nothing happens until awaited
    assert asyncio.run(coro) == 2
    assert client.get_budget("c1").spent == 4


def test_async_cancellation_releases(client: AgentBillClient) -> None:
    started = asyncio.Event()

    @client.gate("agent", 4, "c1")
    async def run() -> None:
        started.set()
        await asyncio.sleep(30)

    async def main() -> None:
        task = asyncio.create_task(run())
        await started.wait()
        assert client.get_budget("c1").reserved == 4
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    budget = client.get_budget("c1")
    assert (budget.spent, budget.reserved, budget.open_reservations) == (0, 0, 0)


# -- generators: refused when decorated, never charged for being created (issue 16, 13) ----------


def test_generator_functions_are_refused_when_decorated(both_clients: AgentBillClient) -> None:
    """A generator's body runs while it is iterated, after the call returned: the gate cannot
    know when the work ends, so it refuses them (use a run block inside the generator)."""

    def tokens() -> Iterator[str]:
        yield "a"

    async def stream() -> AsyncIterator[str]:
        yield "a"

    for fn in (tokens, stream):
        with pytest.raises(TypeError, match=r"generator.*client\.run"):
            both_clients.gate("agent", 5, "c1")(fn)
    budget = both_clients.get_budget("c1")
    assert (budget.spent, budget.reserved, budget.open_reservations) == (0, 0, 0)


def test_a_body_returning_a_generator_is_released_and_refused(client: AgentBillClient) -> None:
    @client.gate("agent", 5, "c1")
    def lazy() -> Iterator[int]:
        return iter(x for x in range(3))  # a plain def whose work happens later

    with pytest.raises(TypeError, match="generator"):
        lazy()
    budget = client.get_budget("c1")
    assert (budget.spent, budget.reserved, budget.open_reservations) == (0, 0, 0)


def test_an_async_body_returning_an_async_generator_is_released_and_refused(
    client: AgentBillClient,
) -> None:
    async def stream() -> AsyncIterator[int]:
        yield 1

    @client.gate("agent", 5, "c1")
    async def lazy() -> AsyncIterator[int]:
        return stream()

    with pytest.raises(TypeError, match="generator"):
        asyncio.run(lazy())
    budget = client.get_budget("c1")
    assert (budget.spent, budget.reserved, budget.open_reservations) == (0, 0, 0)


def test_a_def_returning_a_coroutine_is_released_and_refused(client: AgentBillClient) -> None:
    """A plain def whose result is a coroutine (its work not done yet) is not metered: the
    coroutine is closed (no "never awaited" warning), the reservation released."""

    @client.gate("agent", 5, "c1")
    def lazy() -> object:
        return asyncio.sleep(0)

    with pytest.raises(TypeError, match="awaitable"):
        lazy()
    budget = client.get_budget("c1")
    assert (budget.spent, budget.reserved, budget.open_reservations) == (0, 0, 0)
