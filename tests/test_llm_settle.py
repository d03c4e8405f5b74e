"""A wrapped LLM call owns its reservation and settles it surely, as a gate does (issue 16).

- Its reservation is unadoptable and not in the client's book of its own: a record without a
  reservation id, from another client or from the wrapping client itself, never closes it, so
  the call's own usage is charged exactly once, next to the other record's units.
- Its record or release, when Redis cannot take it now (BUSY: another client's long script),
  is queued and delivered exactly once when Redis answers, instead of being raised out of the
  call (or only logged) with the units lost.

Real OpenAI and Anthropic SDK clients over the in-process mock (tests/_llm_mock.py), a
redis-server of this module's own (it is made busy), sync and async clients.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from agentbill import AgentBillClient, AsyncAgentBillClient, Settlement
from tests._faults import busy, wait_until
from tests._llm_mock import MockLLM
from tests._servers import RedisServer, running
from tests.test_llm import AGENT, CUSTOMER, Side, call, kwargs_for, method, reader, side

__all__ = ["reader", "side"]  # the sync/async fixtures, defined with the LLM tests

TOKENS = 1_200 + 250  # what every mock response reports, in tokens (input + output)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A server of this module's own, for test_llm's ``side`` and ``reader`` too: these tests
    make it busy (``lua-time-limit`` 20 ms)."""
    with running(extra={"lua-time-limit": "20"}) as s:
        yield s


def budget(reader: AgentBillClient) -> tuple[int, int, int]:
    b = reader.get_budget(CUSTOMER)
    return b.spent, b.reserved, b.open_reservations


def recorded(reader: AgentBillClient) -> list[int]:
    return sorted(e.units for e in reader.events(CUSTOMER) if e.type == "recorded")


def delivered(side: Side) -> None:
    """Wait until the client under test has delivered everything it queued."""

    def flushed() -> bool:
        left: int = side.run(side.client.flush, side.client.flush)
        return left == 0

    wait_until(flushed, "the queued settlements to be delivered")


@pytest.mark.parametrize(("api", "stream"), [("chat", False), ("messages", True)])
@pytest.mark.parametrize("who", ["another client", "the same client"])
def test_a_record_without_an_id_never_closes_a_wrapped_calls_reservation(
    side: Side, reader: AgentBillClient, api: str, stream: bool, who: str
) -> None:
    """While the call is under way, a worker records 1 unit the way the README's first example
    does (no reservation id). Before: it closed the call's reservation, charging 1 for it, and
    the call's own record then came back as a replay of that close: 1,450 tokens never
    charged."""
    seen: list[tuple[Settlement, tuple[int, int, int]]] = []

    def record_meanwhile() -> object:
        if who == "another client":
            seen.append((reader.record(AGENT, 1, CUSTOMER), budget(reader)))
            return None
        if isinstance(side.client, AgentBillClient):
            seen.append((side.client.record(AGENT, 1, CUSTOMER), budget(reader)))
            return None
        aclient = side.client

        async def on_its_loop() -> None:  # the mock awaits it on the client's event loop
            seen.append((await aclient.record(AGENT, 1, CUSTOMER), budget(reader)))

        return on_its_loop()

    mock = MockLLM(on_request=record_meanwhile)
    call(side, side.wrap(mock, api), api, stream)
    ((settlement, during),) = seen
    assert settlement.status == "direct"  # nothing of its own to close: charged directly
    estimate = during[1]
    assert estimate > 0
    assert during == (1, estimate, 1)  # the call's reservation still held
    assert budget(reader) == (1 + TOKENS, 0, 0)
    assert recorded(reader) == [1, TOKENS]


@pytest.mark.parametrize(("api", "stream"), [("chat", False), ("messages", True)])
def test_a_wrapped_calls_record_redis_answers_busy_is_queued_and_charged_once(
    side: Side, reader: AgentBillClient, redis_server: RedisServer, api: str, stream: bool
) -> None:
    """Redis turns busy while the provider answers. Before: the sync call raised
    StoreBusyError after the provider had been paid (the async one too), and the reservation
    expired uncharged."""
    with contextlib.ExitStack() as stack:
        mock = MockLLM(on_request=lambda: stack.enter_context(busy(redis_server)))
        call(side, side.wrap(mock, api), api, stream)  # returns: its record is queued
        assert len(mock.requests) == 1
    delivered(side)
    assert budget(reader) == (TOKENS, 0, 0)
    assert recorded(reader) == [TOKENS]


def test_a_failed_calls_release_redis_answers_busy_is_queued(
    side: Side, reader: AgentBillClient, redis_server: RedisServer
) -> None:
    """The provider fails while Redis is busy. Before: the release was only logged, and the
    call's units stayed held until the reservation's TTL (an hour by default)."""
    with contextlib.ExitStack() as stack:
        mock = MockLLM(status=500, on_request=lambda: stack.enter_context(busy(redis_server)))
        with pytest.raises(openai.InternalServerError):
            call(side, side.wrap(mock, "chat"), "chat")
    delivered(side)
    assert budget(reader) == (0, 0, 0)


def test_a_cancelled_async_stream_whose_record_meets_a_busy_redis_is_charged_once(
    redis_server: RedisServer, namespace: str, reader: AgentBillClient
) -> None:
    """The consumer is cancelled mid-stream while Redis is busy: the record (of the
    reservation: the usage never arrived) runs to its end through the cancel, is queued, and
    is delivered once Redis answers."""
    mock = MockLLM(stall_after=3)

    async def main() -> None:
        async with AsyncAgentBillClient(redis_url=redis_server.url, namespace=namespace) as ac:
            llm: Any = ac.wrap(mock.async_openai(), agent_id=AGENT, customer_id=CUSTOMER)
            started = asyncio.Event()

            async def consume() -> None:
                async for _ in await method(llm, "chat")(**kwargs_for("chat", True)):
                    started.set()

            task = asyncio.create_task(consume())
            await started.wait()
            with busy(redis_server):
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert ac.outage_stats.queued == 1
            assert await ac.flush() == 0

    asyncio.run(main())
    (estimate,) = [e.units for e in reader.events(CUSTOMER) if e.type == "approved"]
    assert budget(reader) == (estimate, 0, 0)
    assert recorded(reader) == [estimate]  # the reservation, charged once
