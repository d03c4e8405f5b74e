"""Leases: reserve a slice of a budget once, then decide locally, with no round trip per run.

``client.lease(agent_id, customer_id, slice_units=...)`` returns a :class:`Lease`. Its
``preflight(estimated_units)`` approves a run locally while the current *slice* (an ordinary
reservation made by one preflight, so every rule was checked for it) has room for the estimate;
when it has not, the lease reserves a new slice (one round trip) and the old one is settled
(recorded with what its runs used, releasing the rest) once its last run is settled. Runs are
recorded and released locally; slices are settled on the lease's next preflight and on
``close()``.

Overspend stays exactly what it is without leases: the units a lease approves locally are
units it holds in Redis, so no other worker can be approved against them. The cost is the
other side of that: a slice held by one worker is unavailable to the others until it is
settled. Slice size adapts: a slice is ``slice_units``, but at most half of what the refusing
rule had left when a full slice was refused, and never less than the ask.

A slice expires like any reservation (``ttl``); the lease stops deciding on it a safety margin
before that (on this process's monotonic clock), and its record then still charges what its
runs used, flagged late if it did expire. Closing a lease while runs are still open charges
their estimates (their later record or release changes nothing).

The bookkeeping lives in :class:`LeaseBook`, without I/O; :class:`Lease` and
:class:`AsyncLease` add the round trips.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agentbill._exceptions import InvalidRequestError
from agentbill._models import validate_units
from agentbill._results import BaseCheck

if TYPE_CHECKING:
    from agentbill._async_client import AsyncAgentBillClient
    from agentbill._client import AgentBillClient

__all__ = ["AsyncLease", "Lease", "LeaseCheck", "LeaseStats"]

SAFETY = 0.8
"""A slice is used for new runs during this fraction of its ttl, then settled."""


@dataclass(slots=True, eq=False)
class Slice:
    """One reservation held by a lease, and what its local runs did with it."""

    check: Any
    size: int
    usable_until: float
    used: int = 0
    held: int = 0
    open: int = 0
    runs: int = 0
    settled: bool = False

    def fits(self, units: int, now: float) -> bool:
        return (
            not self.settled
            and now < self.usable_until
            and self.used + self.held + units <= self.size
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseStats:
    """What a lease did: runs decided locally, slices reserved and settled, units charged."""

    runs: int
    refused: int
    slices: int
    settled: int
    charged: int
    held: int
    """Units the lease holds in Redis now (open slices)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseCheck(BaseCheck):
    """A run decided by a lease. ``record``/``release`` are local (no round trip): the slice
    is settled with the sum of its runs later. ``reservation_id`` is the slice's."""

    _book: LeaseBook | None = field(default=None, repr=False, compare=False)
    _slice: Slice | None = field(default=None, repr=False, compare=False)

    def record(self, units: int) -> None:
        """Count ``units`` as used by this run (the slice is charged them when settled)."""
        assert self._book is not None
        self._book.finish(self, validate_units("units", units))

    def release(self) -> None:
        """This run used nothing: its estimate is free for the lease's next runs."""
        assert self._book is not None
        self._book.finish(self, 0)


class LeaseBook:
    """A lease's slices and runs, without I/O; every method is safe across threads."""

    def __init__(self, agent_id: str, customer_id: str | None, slice_units: int, ttl: int) -> None:
        self.agent_id = agent_id
        self.customer_id = customer_id
        self.slice_units = slice_units
        self.ttl = ttl
        self.lock = threading.Lock()
        self.slices: list[Slice] = []
        self.current: Slice | None = None
        self.rule_left: int | None = None
        self.closed = False
        self.runs = 0
        self.refused = 0
        self.slice_count = 0
        self.settled_units = 0
        self.settled_count = 0

    def try_local(self, units: int) -> LeaseCheck | None:
        """Approve ``units`` on the current slice if it fits; None: a new slice is needed."""
        with self.lock:
            if self.closed:
                raise InvalidRequestError("lease", "is closed")
            s = self.current
            if s is None or not s.fits(units, time.monotonic()):
                return None
            return self._approve(s, units)

    def _approve(self, s: Slice, units: int) -> LeaseCheck:
        s.held += units
        s.open += 1
        s.runs += 1
        self.runs += 1
        c = s.check
        return LeaseCheck(
            approved=True,
            reason=None,
            reservation_id=c.reservation_id,
            expires_at=c.expires_at,
            remaining=s.size - s.used - s.held,
            limit=c.limit,
            agent_id=self.agent_id,
            customer_id=c.customer_id,
            estimated_units=units,
            task_ref=c.task_ref,
            period_end=c.period_end,
            _book=self,
            _slice=s,
        )

    def slice_size(self, units: int) -> int:
        """``slice_units``, but at most half of what the budget had left at the last answer,
        and never less than the ask."""
        size = self.slice_units
        if self.rule_left is not None:
            size = min(size, self.rule_left // 2)
        return max(size, units)

    def add_slice(self, check: Any, size: int, units: int) -> LeaseCheck:
        """A slice of ``size`` was reserved (``check``): it becomes current; approve on it."""
        with self.lock:
            s = Slice(check, size, time.monotonic() + self.ttl * SAFETY)
            self.slices.append(s)
            self.current = s
            self.slice_count += 1
            self.rule_left = check.remaining
            return self._approve(s, units)

    def refused_slice(self, check: BaseCheck, size: int, units: int) -> int | None:
        """A slice of ``size`` was refused: a smaller size to ask for, when the budget that
        refused has room for the ask itself; else None (the run is refused)."""
        with self.lock:
            left: int | None = None
            if check.reason == "budget_exhausted" and check.limit is not None:
                left = check.limit - (check.used or 0) - (check.reserved or 0)
            self.rule_left = left
            if left is not None and units <= left < size:
                return max(units, left // 2)  # strictly smaller than size: this ends
            self.refused += 1
            return None

    def finish(self, run: LeaseCheck, units: int) -> None:
        with self.lock:
            s = run._slice
            assert s is not None
            if s.settled:  # the lease was closed under it and charged its estimate
                return
            s.held -= run.estimated_units
            s.used += units
            s.open -= 1

    def to_settle(self, closing: bool = False) -> list[tuple[Slice, int]]:
        """Slices done with (not current, or stale) and with no run open, or, when closing,
        every slice (its open runs charged their estimates): each with the units to charge.
        They are marked settled."""
        now = time.monotonic()
        with self.lock:
            if closing:
                self.closed = True
            out = []
            for s in self.slices:
                done = closing or s is not self.current or now >= s.usable_until
                if done and (s.open == 0 or closing):
                    s.settled = True
                    out.append((s, s.used + s.held))
            self.slices = [s for s in self.slices if not s.settled]
            if self.current is not None and self.current.settled:
                self.current = None
            return out

    def settled(self, charged: int) -> None:
        with self.lock:
            self.settled_units += charged
            self.settled_count += 1

    def stats(self) -> LeaseStats:
        with self.lock:
            return LeaseStats(
                runs=self.runs,
                refused=self.refused,
                slices=self.slice_count,
                settled=self.settled_count,
                charged=self.settled_units,
                held=sum(s.size for s in self.slices),
            )


def _refusal(check: Any, units: int) -> LeaseCheck:
    """A slice refusal, as the run's refusal (the numbers of the rule that refused)."""
    return LeaseCheck(
        approved=False,
        reason=check.reason,
        reservation_id=None,
        expires_at=None,
        remaining=check.remaining,
        limit=check.limit,
        agent_id=check.agent_id,
        customer_id=check.customer_id,
        estimated_units=units,
        task_ref=check.task_ref,
        scope=check.scope,
        used=check.used,
        reserved=check.reserved,
        retry_after=check.retry_after,
        period_end=check.period_end,
    )


class Lease:
    """A lease on :class:`AgentBillClient`; see the module docstring. Use it as a context
    manager, or call :meth:`close`."""

    def __init__(
        self,
        client: AgentBillClient,
        agent_id: str,
        customer_id: str | None,
        *,
        slice_units: int,
        task_ref: str | None,
        ttl: int,
    ) -> None:
        self._client = client
        self._task_ref = task_ref
        self.book = LeaseBook(agent_id, customer_id, slice_units, ttl)

    def preflight(self, estimated_units: int) -> LeaseCheck:
        """Approve a run locally if the current slice has room, else reserve a new slice (one
        round trip). A refusal is returned, with the numbers of the rule that refused."""
        units = validate_units("estimated_units", estimated_units)
        local = self.book.try_local(units)
        if local is not None:
            return local
        self._settle()
        size = self.book.slice_size(units)
        while True:
            check = self._client.preflight(
                self.book.agent_id,
                size,
                self.book.customer_id,
                task_ref=self._task_ref,
                ttl=self.book.ttl,
            )
            if check.approved:
                return self.book.add_slice(check, size, units)
            smaller = self.book.refused_slice(check, size, units)
            if smaller is None:
                return _refusal(check, units)
            size = smaller

    def _settle(self, closing: bool = False) -> None:
        for s, charge in self.book.to_settle(closing):
            s.check.record(charge)
            self.book.settled(charge)

    def stats(self) -> LeaseStats:
        return self.book.stats()

    def close(self) -> None:
        """Settle every slice: charge what its runs used and release the rest. A run still
        open is charged directly when it records."""
        self._settle(closing=True)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncLease:
    """A lease on :class:`AsyncAgentBillClient`: ``await lease.preflight(...)``,
    ``await lease.close()``, ``async with``; runs' ``record``/``release`` stay local."""

    def __init__(
        self,
        client: AsyncAgentBillClient,
        agent_id: str,
        customer_id: str | None,
        *,
        slice_units: int,
        task_ref: str | None,
        ttl: int,
    ) -> None:
        self._client = client
        self._task_ref = task_ref
        self.book = LeaseBook(agent_id, customer_id, slice_units, ttl)

    async def preflight(self, estimated_units: int) -> LeaseCheck:
        """See :meth:`Lease.preflight`."""
        units = validate_units("estimated_units", estimated_units)
        local = self.book.try_local(units)
        if local is not None:
            return local
        await self._settle()
        size = self.book.slice_size(units)
        while True:
            check = await self._client.preflight(
                self.book.agent_id,
                size,
                self.book.customer_id,
                task_ref=self._task_ref,
                ttl=self.book.ttl,
            )
            if check.approved:
                return self.book.add_slice(check, size, units)
            smaller = self.book.refused_slice(check, size, units)
            if smaller is None:
                return _refusal(check, units)
            size = smaller

    async def _settle(self, closing: bool = False) -> None:
        for s, charge in self.book.to_settle(closing):
            await s.check.record(charge)
            self.book.settled(charge)

    def stats(self) -> LeaseStats:
        return self.book.stats()

    async def close(self) -> None:
        """See :meth:`Lease.close`."""
        await self._settle(closing=True)

    async def __aenter__(self) -> AsyncLease:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
