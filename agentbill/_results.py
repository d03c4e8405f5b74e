"""Small frozen results: what each operation returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol

from agentbill._check import BaseCheck, ThresholdCrossing
from agentbill._exceptions import InvalidRequestError

Period = Literal["hour", "day", "week", "month"]
EventType = Literal["approved", "refused", "recorded", "released", "expired", "threshold"]
SettleStatus = Literal["recorded", "released", "late", "expired", "direct", "noop", "queued"]


def open_reservation(check: BaseCheck) -> str:
    """The id of the reservation ``check`` holds; InvalidRequestError if it was refused."""
    if check.reservation_id is None:
        raise InvalidRequestError(
            "reservation_id", f"this check was refused ({check.reason}); it holds nothing"
        )
    return check.reservation_id


class CheckClient(Protocol):
    """What a :class:`Check` calls on its client (AgentBillClient): this module sits below the
    clients, so it names the methods it needs instead of importing the class."""

    def record(
        self,
        agent_id: str,
        units: int,
        customer_id: str | None = None,
        *,
        reservation_id: str | None = None,
        task_ref: str | None = None,
        success: bool = True,
        idempotency_key: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Settlement: ...

    def release(self, reservation_id: str | None = None) -> Settlement: ...

    def _extend(self, check: Check, units: object) -> Check: ...


class AsyncCheckClient(Protocol):
    """What an :class:`AsyncCheck` awaits on its client (AsyncAgentBillClient)."""

    async def record(
        self,
        agent_id: str,
        units: int,
        customer_id: str | None = None,
        *,
        reservation_id: str | None = None,
        task_ref: str | None = None,
        success: bool = True,
        idempotency_key: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Settlement: ...

    async def release(self, reservation_id: str | None = None) -> Settlement: ...

    async def _extend(self, check: AsyncCheck, units: object) -> AsyncCheck: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Check(BaseCheck):
    """A preflight's decision from :class:`AgentBillClient`; see :class:`BaseCheck`."""

    _client: CheckClient | None = field(default=None, repr=False, compare=False)

    def record(
        self,
        units: int,
        *,
        success: bool = True,
        idempotency_key: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Settlement:
        """Close this reservation, charging ``units``; see :meth:`AgentBillClient.record`."""
        rid = open_reservation(self)
        assert self._client is not None
        return self._client.record(
            self.agent_id,
            units,
            self.customer_id,
            reservation_id=rid,
            task_ref=self.task_ref,
            success=success,
            idempotency_key=idempotency_key,
            metadata=metadata,
        )

    def release(self) -> Settlement:
        """Close this reservation without charging anything."""
        rid = open_reservation(self)
        assert self._client is not None
        return self._client.release(rid)

    def extend(self, units: int) -> Check:
        """Reserve ``units`` more on this reservation, atomically, under every rule a preflight
        checks (concurrency aside: no run is added); the extra is settled with the rest. Returns
        the reservation's Check with ``estimated_units`` its new total (this Check is
        unchanged). Raises the typed RunBlockedError on refusal (nothing changed),
        InvalidRequestError (``units``; ``reservation_id`` when it is not open any more),
        StoreUnavailableError (whatever the outage policy: nothing reserved)."""
        assert self._client is not None
        return self._client._extend(self, units)


@dataclass(frozen=True, slots=True, kw_only=True)
class AsyncCheck(BaseCheck):
    """A preflight's decision from :class:`AsyncAgentBillClient`: ``record``/``release`` are
    awaited."""

    _client: AsyncCheckClient | None = field(default=None, repr=False, compare=False)

    async def record(
        self,
        units: int,
        *,
        success: bool = True,
        idempotency_key: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Settlement:
        """Close this reservation, charging ``units``; see :meth:`AgentBillClient.record`."""
        rid = open_reservation(self)
        assert self._client is not None
        return await self._client.record(
            self.agent_id,
            units,
            self.customer_id,
            reservation_id=rid,
            task_ref=self.task_ref,
            success=success,
            idempotency_key=idempotency_key,
            metadata=metadata,
        )

    async def release(self) -> Settlement:
        """Close this reservation without charging anything."""
        rid = open_reservation(self)
        assert self._client is not None
        return await self._client.release(rid)

    async def extend(self, units: int) -> AsyncCheck:
        """See :meth:`Check.extend`."""
        assert self._client is not None
        return await self._client._extend(self, units)


@dataclass(frozen=True, slots=True, kw_only=True)
class Settlement:
    """The outcome of ``record`` or ``release``.

    ``status``: ``recorded`` (closed and charged), ``released`` (closed, nothing charged),
    ``late`` (the reservation had expired, or Redis never saw it: charged now), ``expired`` (it had
    expired and nothing was charged), ``direct`` (no reservation to close: charged directly),
    ``noop`` (nothing to close and nothing to charge), ``queued`` (Redis was unreachable and
    the client's outage policy queued the call: it is delivered on the next successful round
    trip; ``spent``, ``reserved``, ``limit`` and ``remaining`` are then None).
    """

    status: SettleStatus
    reservation_id: str | None
    charged: int
    """Units charged by the close this describes (for a replay: by the first close)."""
    released: int
    """Reserved units given back by this call."""
    late: bool
    replayed: bool
    """True when the reservation was already closed (or the idempotency key already used):
    nothing changed and ``status`` and ``charged`` are those of the first close."""
    spent: int | None
    reserved: int | None
    limit: int | None
    remaining: int | None
    metadata: dict[str, Any] | None = None
    crossed: tuple[ThresholdCrossing, ...] = ()
    """Soft thresholds this call crossed."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimit:
    """Sustained ``units`` per ``per_seconds``, in bursts of up to ``burst`` units (GCRA)."""

    units: int
    per_seconds: int
    burst: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetStatus:
    """The budget of a customer, or of one of its agents (``agent_id`` set), in its current
    period. ``limit`` None means unlimited (then ``remaining`` is None)."""

    customer_id: str
    limit: int | None
    spent: int
    reserved: int
    remaining: int | None
    open_reservations: int
    agent_id: str | None = None
    period: Period | None = None
    """None: a lifetime budget."""
    period_start: datetime | None = None
    period_end: datetime | None = None
    resets_in: float | None = None
    """Seconds until the period ends and a fresh one starts (Redis clock)."""
    thresholds: tuple[int, ...] = ()
    rate_limit: RateLimit | None = None
    max_in_flight: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Usage:
    """A customer's budget and every agent's that ran or has a budget: what is left, what is
    held, and by whom."""

    customer: BudgetStatus
    agents: tuple[BudgetStatus, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """One ledger entry.

    ``units``: asked (approved, refused), charged (recorded), committed units (threshold).
    ``released``: reserved units given back (recorded, released, expired).
    """

    id: str
    """The stream id: pass it as ``since`` to read on from here."""
    type: EventType
    time: datetime
    customer_id: str
    agent_id: str | None
    task_ref: str | None
    units: int
    released: int
    reservation_id: str | None
    reason: str | None
    """A refusal's reason; how a record closed (recorded, late, direct); a threshold's percent."""
    scope: str | None
    period: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskStatus:
    """A task's ceiling and use. ``ceiling`` None means attribution only (no ceiling)."""

    task_ref: str
    customer_id: str
    ceiling: int | None
    used: int
    reserved: int
    remaining: int | None
    exists: bool


LEARN_AFTER = 20
"""Samples an agent's statistics need before ``"learned"`` reserves from them (until then, the
bound)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Estimates:
    """What one agent's runs of a customer (or, with ``model``, its LLM calls to that model)
    actually used, next to what they reserved: the records that closed a reservation among
    the last 100 to 200 (see ``AgentBillClient.estimates``).

    Percentiles come from a log-scale histogram (4 bins per power of two): each is the largest
    number of units in the bin holding that percentile, so it is at or above the true value,
    by less than 25%. None without samples.
    """

    agent_id: str
    customer_id: str
    model: str | None
    samples: int
    mean_actual: float | None
    mean_estimate: float | None
    actual_to_estimate: float | None
    """Actual units summed over estimates summed: how much of what was reserved was used."""
    p50: int | None
    p95: int | None
    p99: int | None
    histogram: tuple[tuple[int, int], ...]
    """(the most units a bin holds, its samples), ascending."""

    def learned(self, bound: int) -> int:
        """What ``"learned"`` reserves for a run that can cost at most ``bound``: the p95 of
        recent actuals, never above ``bound``; ``bound`` itself until there are
        ``LEARN_AFTER`` samples. Never below 1 unit: a reservation of 0 fits a budget spent to
        the last unit, which would then admit every run (runs that report 0 make the p95 0)."""
        if self.samples < LEARN_AFTER or self.p95 is None:
            return bound
        return min(max(self.p95, 1), bound)
