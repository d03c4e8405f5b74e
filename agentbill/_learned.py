"""``"learned"`` estimates: reserve what an agent's runs actually used, not the most they could.

settle.lua keeps, per (customer, agent) and per (customer, agent, model) of the LLM wrapper,
statistics of the units that records closing a reservation reported (the last 100 to 200; see
"Learning" in lua/settle.lua). A :class:`Learner` reads them (``client.estimates``) and
reserves their p95 for a run whose most is ``bound``, never more than ``bound``, and ``bound``
itself until there are ``LEARN_AFTER`` samples (:meth:`agentbill.Estimates.learned`). It reads
them at most once every ``REFRESH`` seconds per statistics key; if Redis cannot answer that
read, the run reserves ``bound`` (and its preflight then meets the outage policy as any does).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import Protocol

from agentbill._exceptions import StoreUnavailableError
from agentbill._results import Estimates

REFRESH = 1.0
"""Seconds a Learner keeps the statistics it read before reading them again."""


class EstimatesClient(Protocol):
    """What a Learner calls on either client (this module sits below both): an Estimates from
    AgentBillClient, an awaitable of one from AsyncAgentBillClient."""

    def estimates(
        self, agent_id: str, customer_id: str | None = None, *, model: str | None = None
    ) -> Estimates | Awaitable[Estimates]: ...


class Learner:
    """The learned estimates of one agent of one customer, for one gate, run or wrapped client
    (either client: with AsyncAgentBillClient, :meth:`units` may return an awaitable)."""

    def __init__(self, client: EstimatesClient, agent_id: str, customer_id: str | None) -> None:
        self._client = client
        self._agent_id = agent_id
        self._customer_id = customer_id
        self._read: dict[str | None, tuple[float, Estimates]] = {}

    def units(self, bound: int, model: str | None = None) -> int | Awaitable[int]:
        """What to reserve for a run that can use at most ``bound`` (an LLM call to ``model``):
        an int, or with the async client an awaitable of one when the statistics are read."""
        read = self._read.get(model)
        if read is not None and time.monotonic() - read[0] < REFRESH:
            return read[1].learned(bound)
        try:
            reply = self._client.estimates(self._agent_id, self._customer_id, model=model)
        except StoreUnavailableError:
            return bound
        if isinstance(reply, Estimates):
            return self._learn(reply, bound, model)
        return self._learn_later(reply, bound, model)

    async def _learn_later(self, reply: Awaitable[Estimates], bound: int, model: str | None) -> int:
        try:
            estimates = await reply
        except StoreUnavailableError:
            return bound
        return self._learn(estimates, bound, model)

    def _learn(self, estimates: Estimates, bound: int, model: str | None) -> int:
        self._read[model] = (time.monotonic(), estimates)
        return estimates.learned(bound)
