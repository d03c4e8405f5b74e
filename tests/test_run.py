"""``with client.run(...)`` and ``async with``: a gated block for code that is not one function."""

from __future__ import annotations

import asyncio

import pytest

from agentbill import (
    AgentBillClient,
    AsyncAgentBillClient,
    BudgetExhaustedError,
    BudgetStatus,
    InvalidRequestError,
)
from tests._servers import RedisServer


def _state(b: BudgetStatus) -> tuple[int, int, int]:
    return b.spent, b.reserved, b.open_reservations


def test_block_records_what_it_says(client: AgentBillClient) -> None:
    with client.run("agent", 10, customer_id="c1") as run:
        assert client.get_budget("c1").reserved == 10
        run.record(4)
    assert run.settlement is not None
    assert run.settlement.charged == 4
    assert _state(client.get_budget("c1")) == (4, 0, 0)


def test_block_without_record_releases_or_charges_the_estimate(client: AgentBillClient) -> None:
    with client.run("agent", 10, customer_id="c1"):
        pass
    assert _state(client.get_budget("c1")) == (0, 0, 0)
    with client.run("agent", 10, customer_id="c1", charge_estimate=True):
        pass
    assert _state(client.get_budget("c1")) == (10, 0, 0)


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_block_that_raises_releases(client: AgentBillClient, exc: BaseException) -> None:
    with pytest.raises(type(exc)), client.run("agent", 10, customer_id="c1"):
        raise exc
    assert _state(client.get_budget("c1")) == (0, 0, 0)


def test_refusal_skips_the_block(client: AgentBillClient) -> None:
    client.set_budget("c1", 5)
    entered = False
    with pytest.raises(BudgetExhaustedError), client.run("agent", 10, customer_id="c1"):
        entered = True
    assert not entered


def test_bad_arguments_fail_before_the_block(client: AgentBillClient) -> None:
    with pytest.raises(InvalidRequestError) as info:
        client.run("agent", 1.5, customer_id="c1")  # type: ignore[arg-type]
    assert info.value.field == "estimated_units"


def test_async_block(redis_server: RedisServer, namespace: str) -> None:
    async def main() -> None:
        async with AsyncAgentBillClient(redis_url=redis_server.url, namespace=namespace) as c:
            async with c.run("agent", 10, customer_id="c1") as run:
                assert (await c.get_budget("c1")).reserved == 10
                await run.record(6)
            assert _state(await c.get_budget("c1")) == (6, 0, 0)

            async with c.run("agent", 10, customer_id="c1", charge_estimate=True):
                pass
            assert _state(await c.get_budget("c1")) == (16, 0, 0)

            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2), c.run("agent", 10, customer_id="c1"):
                    await asyncio.sleep(30)
            assert _state(await c.get_budget("c1")) == (16, 0, 0)

    asyncio.run(main())


# -- a run object is single-use; `with` on the async client's run is a TypeError (issue 16, 13) --


def test_a_run_object_is_single_use(client: AgentBillClient) -> None:
    run = client.run("agent", 10, customer_id="c1")
    with pytest.raises(RuntimeError, match="not entered"):
        run.record(1)
    with run:
        run.record(3)
    with pytest.raises(RuntimeError, match="once"), run:
        pass  # a second block would hold a reservation its first settlement hides
    assert _state(client.get_budget("c1")) == (3, 0, 0)


def test_an_async_run_object_is_single_use(redis_server: RedisServer, namespace: str) -> None:
    async def main() -> None:
        async with AsyncAgentBillClient(redis_url=redis_server.url, namespace=namespace) as c:
            run = c.run("agent", 10, customer_id="c1")
            with pytest.raises(RuntimeError, match="not entered"):
                await run.record(1)
            async with run:
                await run.record(3)
            with pytest.raises(RuntimeError, match="once"):
                async with run:
                    pass
            assert _state(await c.get_budget("c1")) == (3, 0, 0)

    asyncio.run(main())


def test_with_on_the_async_clients_run_says_async_with(
    redis_server: RedisServer, namespace: str
) -> None:
    async def main() -> None:
        async with AsyncAgentBillClient(redis_url=redis_server.url, namespace=namespace) as c:
            with pytest.raises(TypeError, match="async with"), c.run("agent", 10, "c1"):
                pass
            assert _state(await c.get_budget("c1")) == (0, 0, 0)

    asyncio.run(main())


def test_async_with_on_the_sync_clients_run_says_with(client: AgentBillClient) -> None:
    async def main() -> None:
        with pytest.raises(TypeError, match="AsyncAgentBillClient"):
            async with client.run("agent", 10, "c1"):
                pass

    asyncio.run(main())
    assert _state(client.get_budget("c1")) == (0, 0, 0)
