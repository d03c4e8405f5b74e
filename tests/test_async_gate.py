"""The gate on AsyncAgentBillClient: awaited preflight, release on cancellation and timeouts."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from agentbill import AsyncAgentBillClient, BudgetExhaustedError, BudgetStatus
from tests._servers import RedisServer


def run_with(
    server: RedisServer, namespace: str, body: Callable[[AsyncAgentBillClient], Awaitable[None]]
) -> None:
    async def main() -> None:
        async with AsyncAgentBillClient(redis_url=server.url, namespace=namespace) as client:
            await body(client)

    asyncio.run(main())


def _state(b: BudgetStatus) -> tuple[int, int, int]:
    return b.spent, b.reserved, b.open_reservations


def test_records_after_the_body_and_refuses_before_it(
    redis_server: RedisServer, namespace: str
) -> None:
    async def body(client: AsyncAgentBillClient) -> None:
        await client.set_budget("c1", 9)
        ran: list[int] = []

        @client.gate("agent", 6, "c1", units=lambda r: r)
        async def run(x: int) -> int:
            assert (await client.get_budget("c1")).reserved == 6
            ran.append(x)
            return x

        assert await run(4) == 4
        assert _state(await client.get_budget("c1")) == (4, 0, 0)
        with pytest.raises(BudgetExhaustedError):
            await run(1)  # 4 spent + 6 asked > 9: refused, body not run
        assert ran == [4]

    run_with(redis_server, namespace, body)


def test_cancellation_and_timeout_release(redis_server: RedisServer, namespace: str) -> None:
    async def body(client: AsyncAgentBillClient) -> None:
        started = asyncio.Event()

        @client.gate("agent", 5, "c1")
        async def slow() -> None:
            started.set()
            await asyncio.sleep(30)

        task = asyncio.create_task(slow())
        await started.wait()
        assert (await client.get_budget("c1")).reserved == 5
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert _state(await client.get_budget("c1")) == (0, 0, 0)

        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await slow()
        assert _state(await client.get_budget("c1")) == (0, 0, 0)

    run_with(redis_server, namespace, body)


def test_body_exception_releases(redis_server: RedisServer, namespace: str) -> None:
    async def body(client: AsyncAgentBillClient) -> None:
        @client.gate("agent", 5, "c1")
        async def broken() -> None:
            raise RuntimeError("model call failed")

        with pytest.raises(RuntimeError):
            await broken()
        assert _state(await client.get_budget("c1")) == (0, 0, 0)

    run_with(redis_server, namespace, body)


def test_async_gate_refuses_a_plain_def(redis_server: RedisServer, namespace: str) -> None:
    async def body(client: AsyncAgentBillClient) -> None:
        with pytest.raises(TypeError, match="async def"):

            @client.gate("agent", 5, "c1")
            def plain() -> None:
                pass

    run_with(redis_server, namespace, body)
