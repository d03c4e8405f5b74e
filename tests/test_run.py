"""``with client.run(...)`` and ``async with``: a gated block for code that is not one function."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Generator

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


# -- a run block inside a generator: how the README meters streams -------------------------------


def _tokens(client: AgentBillClient, prompt: str, fail_at: int | None = None) -> Generator[str]:
    """The README's pattern: a run block around the generator's loop, recording in `finally`
    what it yielded, whether it was exhausted, stopped early or failed."""
    with client.run("agent", 20, customer_id="c1") as run:
        used = 0
        try:
            for i, token in enumerate(prompt.split()):
                if i == fail_at:
                    raise RuntimeError("model failed")
                used += 1
                yield token
        finally:
            run.record(used)


def test_a_generator_with_a_run_block_is_charged_what_it_yielded(client: AgentBillClient) -> None:
    assert list(_tokens(client, "a b c d")) == ["a", "b", "c", "d"]  # exhausted: 4
    early = _tokens(client, "a b c d")
    assert next(early) == "a"
    early.close()  # the consumer stopped after one token: 1
    with pytest.raises(RuntimeError):
        list(_tokens(client, "a b c d", fail_at=2))  # failed after two: 2
    assert _state(client.get_budget("c1")) == (4 + 1 + 2, 0, 0)


def test_a_generator_closed_early_ends_its_block_like_a_normal_exit(
    client: AgentBillClient,
) -> None:
    """GeneratorExit is the consumer stopping, not the work failing: with charge_estimate and
    no record, the estimate is charged, as when the block ends normally."""

    def stream() -> Generator[int]:
        with client.run("agent", 20, customer_id="c1", charge_estimate=True):
            yield 1
            yield 2

    gen = stream()
    next(gen)
    gen.close()
    assert _state(client.get_budget("c1")) == (20, 0, 0)


def test_an_async_generator_with_a_run_block_is_charged_what_it_yielded(
    redis_server: RedisServer, namespace: str
) -> None:
    async def main() -> None:
        async with AsyncAgentBillClient(redis_url=redis_server.url, namespace=namespace) as c:

            async def tokens(prompt: str) -> AsyncGenerator[str]:
                async with c.run("agent", 20, customer_id="c1") as run:
                    used = 0
                    try:
                        for token in prompt.split():
                            used += 1
                            yield token
                    finally:
                        await run.record(used)

            assert [t async for t in tokens("a b c")] == ["a", "b", "c"]
            early = tokens("a b c")
            assert await anext(early) == "a"
            await early.aclose()

            async def estimated() -> AsyncGenerator[int]:
                async with c.run("agent", 20, customer_id="c1", charge_estimate=True):
                    yield 1
                    yield 2

            gen = estimated()
            await anext(gen)
            await gen.aclose()
            assert _state(await c.get_budget("c1")) == (3 + 1 + 20, 0, 0)

    asyncio.run(main())
