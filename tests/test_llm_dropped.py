"""A wrapped stream created and then dropped, never read nor closed, is charged its reservation.

The request was sent (the provider bills at least its input), so the call is charged as a
stream broken off is: its reservation. Before: nothing settled such a stream; its units were
held until the reservation's TTL and then expired uncharged.

The ways a stream is dropped: an early return, an exception in the caller's code before the
loop, a raw response (``with_raw_response``) never parsed. Real OpenAI and Anthropic SDK
clients over the in-process mock, sync and async clients, a real redis-server.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Any

import pytest

from agentbill import AgentBillClient
from tests._faults import wait_until
from tests._llm_mock import MockLLM
from tests.test_llm import CUSTOMER, Side, kwargs_for, method, reader, side

__all__ = ["reader", "side"]

TOKENS = 1_200 + 250


class CallerFailed(Exception):
    """The caller's own code failed between the call and the loop."""


def start(side: Side, llm: Any, api: str, how: str) -> None:
    """Make a streamed call and drop what it returned without reading it."""
    target = method(llm.with_raw_response if how == "raw" else llm, api)
    kwargs = kwargs_for(api, True)

    def sync() -> None:
        stream = target(**kwargs)
        if how == "raises":
            raise CallerFailed(stream)
        del stream

    async def coro() -> None:
        stream = await target(**kwargs)
        if how == "raises":
            raise CallerFailed(stream)
        del stream
        gc.collect()  # on the loop, as a collection may run anywhere

    with contextlib.suppress(CallerFailed):
        side.run(sync, coro)


def settled(side: Side, reader: AgentBillClient) -> bool:
    gc.collect()
    side.run(side.client.flush, side.client.flush)
    return reader.get_budget(CUSTOMER).reserved == 0


@pytest.mark.parametrize("api", ["chat", "responses", "messages"])
@pytest.mark.parametrize("how", ["dropped", "raises", "raw"])
def test_a_stream_dropped_unread_is_charged_its_reservation(
    side: Side, reader: AgentBillClient, api: str, how: str
) -> None:
    reader.set_budget(CUSTOMER, 10**9)
    held: list[int] = []
    mock = MockLLM(on_request=lambda: held.append(reader.get_budget(CUSTOMER).reserved))
    start(side, side.wrap(mock, api), api, how)
    wait_until(lambda: settled(side, reader), "the dropped stream to be settled")
    (reserved,) = held
    assert reserved > 0
    recorded = [e for e in reader.events(CUSTOMER) if e.type == "recorded"]
    assert [e.units for e in recorded] == [reserved]
    budget = reader.get_budget(CUSTOMER)
    assert (budget.spent, budget.reserved, budget.open_reservations) == (reserved, 0, 0)


@pytest.mark.parametrize("api", ["chat", "messages"])
def test_a_stream_read_to_its_end_then_dropped_is_charged_once(
    side: Side, reader: AgentBillClient, api: str
) -> None:
    """The drop watch never charges a stream that was settled already."""
    reader.set_budget(CUSTOMER, 10**9)
    llm = side.wrap(MockLLM(), api)
    kwargs = kwargs_for(api, True)

    def sync() -> None:
        for _ in method(llm, api)(**kwargs):
            pass

    async def coro() -> None:
        async for _ in await method(llm, api)(**kwargs):
            pass

    for _ in range(3):
        side.run(sync, coro)
    gc.collect()
    side.run(side.client.flush, side.client.flush)
    recorded = [e.units for e in reader.events(CUSTOMER) if e.type == "recorded"]
    assert recorded == [TOKENS] * 3
    assert reader.get_budget(CUSTOMER).spent == 3 * TOKENS
