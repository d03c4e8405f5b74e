"""Leases: reserve a slice of a budget once, then decide locally, with no round trip per run.

``client.lease(agent_id, customer_id, slice_units=...)`` returns a :class:`Lease`. Its
``preflight(estimated_units)`` approves a run locally while the current *slice* (an ordinary
reservation made by one preflight, so every rule was checked for it) has room for the estimate;
when it has not, the lease settles the old slice once its last run is settled (recorded with
what its runs used, releasing the rest: before the next slice is reserved, if no run is open
in it, so that it never counts as a second run in flight), and reserves a new one. Runs are
recorded and released locally, once each, like a Check's reservation; slices are settled on
the lease's next preflight that needs a slice and on ``close()``.

A slice's record is the client's ``_settle_surely``: if Redis cannot take it now (busy,
unreachable or silent), it is queued, whatever the outage policy, and delivered in the
background, exactly once; a record interrupted otherwise leaves the slice owed, and the next
settle sends it again (a second record of a recorded slice charges nothing). So units a run
reported are never lost with its slice.

Overspend stays exactly what it is without leases: the units a lease approves locally are
units it holds in Redis, so no other worker can be approved against them. The cost is the
other side of that: a slice held by one worker is unavailable to the others until it is
settled.

A slice is sized to fit every rule, so a lease approves whatever a plain preflight of the run
would (on the same state): ``slice_units``, within the client's ceiling and the bursts of the
rate limits it has met, at most half of what a budget or the task ceiling had left at its last
answer, and never less than the ask. A refused slice is asked again smaller while the rule that
refused it may have room for the run (see :meth:`LeaseBook.acquire`).

A slice expires like any reservation (``ttl``); the lease stops deciding on it a safety margin
before that (on this process's monotonic clock), and its record then still charges what its
runs used, flagged late if it did expire. Closing a lease while runs are still open charges
their estimates; that is their close (their later record or release returns it, replayed). A
run released and then recorded after the lease closed is charged on its own, late (queued for
the client's background delivery: a run's record does no I/O).

The bookkeeping lives in :class:`LeaseBook`, without I/O; :class:`Lease` and
:class:`AsyncLease` add the round trips.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

from agentbill._check import BaseCheck
from agentbill._core import Plan, customer_of, new_token
from agentbill._exceptions import InvalidRequestError
from agentbill._fork import reset_at_fork
from agentbill._keys import customer_tag, reservation_id
from agentbill._models import validate_units
from agentbill._results import BudgetStatus, RateLimit, Settlement, SettleStatus, open_reservation

__all__ = ["AsyncLease", "Lease", "LeaseCheck", "LeaseStats"]

SAFETY = 0.8
"""A slice is used for new runs during this fraction of its ttl, then settled."""


@dataclass(slots=True, eq=False)
class Slice:
    """One reservation held by a lease, and what its local runs did with it."""

    check: Any  # the slice's Check (AsyncCheck on the async client)
    size: int
    usable_until: float
    used: int = 0
    held: int = 0
    open: set[LeaseRun] = field(default_factory=set)
    runs: int = 0
    settled: bool = False
    """Done with: no run is open in it or will be; its record is owed until it lands."""
    charge: int = 0
    """What its record charges, once settled."""
    sending: bool = False
    """Its record is being sent."""
    last_outcome: Settlement | None = None

    def fits(self, units: int, now: float) -> bool:
        return (
            not self.settled
            and now < self.usable_until
            and self.used + self.held + units <= self.size
        )


@dataclass(slots=True, eq=False)
class LeaseRun:
    """One run a lease approved: open until its first record or release (or the lease's close),
    whose outcome every later close returns."""

    book: LeaseBook
    slice: Slice
    estimate: int
    outcome: Settlement | None = None


@dataclass(frozen=True, slots=True)
class SliceAsk:
    """Preflight a slice of ``size`` units; answered with the Check."""

    size: int


@dataclass(frozen=True, slots=True)
class RateAsk:
    """Read the rate limit of the scope that refused a slice (the agent's, or the customer's);
    answered with that scope's BudgetStatus."""

    agent: bool


Ask = SliceAsk | RateAsk


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
    is settled with the sum of its runs later. ``reservation_id`` is the slice's.

    A run closes once, like a Check's reservation: the first ``record`` or ``release`` counts,
    and any later one changes nothing and returns that first outcome with ``replayed`` True.
    The outcomes are local: ``spent``, ``reserved``, ``limit`` and ``remaining`` are None."""

    _run: LeaseRun | None = field(default=None, repr=False, compare=False)

    def record(self, units: int) -> Settlement:
        """Count ``units`` as used by this run (its slice is charged them when settled), and
        give its estimate back to the lease's next runs."""
        open_reservation(self)
        return self._close("recorded", validate_units("units", units))

    def release(self) -> Settlement:
        """This run used nothing: its estimate is free for the lease's next runs."""
        open_reservation(self)
        return self._close("released", 0)

    def extend(self, units: int) -> LeaseCheck:
        """A lease's run has no reservation of its own (its slice is shared by many runs):
        InvalidRequestError naming ``reservation_id``, nothing changed. Make a plain preflight
        for a run that may need more than it asked."""
        raise InvalidRequestError(
            "reservation_id",
            "a lease's run cannot be extended: its slice is shared; use a plain preflight",
        )

    def _close(self, status: SettleStatus, units: int) -> Settlement:
        run = self._run
        assert run is not None  # every approved LeaseCheck has its run
        return run.book.finish(run, status, units)


def _outcome(
    s: Slice, status: SettleStatus, charged: int, released: int, *, late: bool = False
) -> Settlement:
    """A run's local outcome. Settlements are frozen, and building one costs about as much as
    the rest of a leased run: the slice's last one is reused when it is the same."""
    last = s.last_outcome
    if (
        last is not None
        and last.status == status
        and last.charged == charged
        and last.released == released
        and last.late == late
    ):
        return last
    s.last_outcome = Settlement(
        status=status,
        reservation_id=s.check.reservation_id,
        charged=charged,
        released=released,
        late=late,
        replayed=False,
        spent=None,
        reserved=None,
        limit=None,
        remaining=None,
    )
    return s.last_outcome


BudgetScope = Literal["customer", "agent", "task"]


class LeaseBook:
    """A lease's slices and runs, without I/O; every method is safe across threads.

    How big a slice may be comes from what the lease learnt from its answers: the client's
    ``ceiling``, what each budget scope (customer, agent, task) had left at its last answer, and
    the bursts of the rate limits that refused it (see :meth:`acquire`).
    """

    def __init__(
        self,
        agent_id: str,
        customer_id: str | None,
        slice_units: int,
        ttl: int,
        ceiling: int | None = None,
    ) -> None:
        self.agent_id = agent_id
        self.customer_id = customer_id
        self.slice_units = slice_units
        self.ttl = ttl
        self.ceiling = ceiling
        self.lock = threading.Lock()
        self.slices: list[Slice] = []
        self.current: Slice | None = None
        reset_at_fork(self)
        self.left: dict[BudgetScope, int] = {}
        """What each budget scope had left at its last answer."""
        self.bursts: dict[bool, int] = {}
        """The burst of the agent's (True) and the customer's (False) rate limit, once one
        refused a slice."""
        self.closed = False
        self.owed = 0
        """Units of late records whose slice was already settled: charged with the next."""
        self.charge_late: Callable[[int], object] | None = None
        """Charges alone the units of a run recorded after its release once the lease is
        closed (set by the lease: queued for the client's delivery)."""
        self.runs = 0
        self.refused = 0
        self.slice_count = 0
        self.settled_units = 0
        self.settled_count = 0

    def _after_fork(self) -> None:
        """In a forked child: a new lock, and no slices: the parent's slices are the parent's
        to decide on and settle (the child reserves its own)."""
        self.lock = threading.Lock()
        self.slices = []
        self.current = None

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
        run = LeaseRun(self, s, units)
        s.held += units
        s.open.add(run)
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
            _run=run,
        )

    def slice_size(self, units: int) -> int:
        """``slice_units``, within the ceiling and the bursts of the rate limits known, at most
        half of what any budget scope had left at its last answer, and never less than the
        ask."""
        with self.lock:
            size = self.slice_units
            for cap in (self.ceiling, *self.bursts.values()):
                if cap is not None:
                    size = min(size, cap)
            for left in self.left.values():
                size = min(size, left // 2)
            return max(size, units)

    def acquire(self, units: int) -> Generator[Ask, BaseCheck | BudgetStatus, LeaseCheck]:
        """The round trips that get a run of ``units`` a slice, as a dialogue without I/O: it
        yields what to ask Redis and is sent the answer; it returns the run's decision.

        A refused slice is asked again smaller when the rule that refused it may still have
        room for the run: a budget or the task ceiling (half of what it has left), the ceiling,
        a rate limit (what its burst allows now, from its settings and ``retry_after``). Sizes
        strictly shrink and never go below the ask, and the run is refused only when a plain
        preflight of ``units`` would be too: by a rule whose numbers leave no room for it, or
        by the answer to a slice of exactly ``units``.
        """
        size = self.slice_size(units)
        while True:
            check = yield SliceAsk(size)
            assert isinstance(check, BaseCheck)
            if check.approved:
                return self.add_slice(check, size, units)
            if check.reason == "rate_limited" and size > units:
                status = yield RateAsk(agent=check.scope == "agent")
                assert isinstance(status, BudgetStatus)
                smaller = self.rate_room(check, size, units, status.rate_limit)
            else:
                smaller = self.budget_room(check, size, units)
            if smaller is None:
                with self.lock:
                    self.refused += 1
                return _refusal(check, units)
            size = smaller

    def add_slice(self, check: BaseCheck, size: int, units: int) -> LeaseCheck:
        """A slice of ``size`` was reserved (``check``): it becomes current; approve on it."""
        with self.lock:
            s = Slice(check, size, time.monotonic() + self.ttl * SAFETY)
            self.slices.append(s)
            self.current = s
            self.slice_count += 1
            self._learn("customer", check.remaining)
            self._learn("task", check.task_remaining)
            if "agent" in self.left:  # what this slice took of it (others' use is unknown)
                self.left["agent"] = max(0, self.left["agent"] - size)
            return self._approve(s, units)

    def _learn(self, scope: BudgetScope, left: int | None) -> None:
        if left is None:
            self.left.pop(scope, None)
        else:
            self.left[scope] = max(0, left)

    def budget_room(self, check: BaseCheck, size: int, units: int) -> int | None:
        """After a refusal other than a rate limit's: a smaller size to ask for, or None (a
        preflight of ``units`` is refused too)."""
        with self.lock:
            if check.reason == "concurrency_limited":
                return None  # one more run in flight, whatever its size
            if check.reason == "ceiling_exceeded" and check.limit is not None:
                self.ceiling = check.limit
                return check.limit if units <= check.limit < size else None
            if check.reason in ("budget_exhausted", "task_ceiling_exceeded") and (
                check.limit is not None and check.scope in ("customer", "agent", "task")
            ):
                left = check.limit - (check.used or 0) - (check.reserved or 0)
                self._learn(check.scope, left)
                if units <= left < size:
                    return max(units, left // 2)  # strictly smaller than size: this ends
                return None
            return units if units < size else None  # a rule unknown here: ask for the run

    def rate_room(
        self, check: BaseCheck, size: int, units: int, rate: RateLimit | None
    ) -> int | None:
        """After a rate limit refused ``size``: the size its burst allows now, or None (a
        preflight of ``units`` is refused too). ``rate`` is the refusing scope's limit, read
        after the refusal.

        GCRA (lua/preflight.lua) takes ``n`` units now when ``n <= burst - backlog``, the backlog
        in units; a refusal of ``size <= burst`` waits ``retry_after = (size - (burst -
        backlog)) x interval``, rounded up to the ms, so what the rate allows now is at least
        ``size - ceil(retry_ms / interval)`` and less than ``size - (retry_ms - 1) / interval``.
        """
        with self.lock:
            agent = check.scope == "agent"
            if rate is None:  # removed since: ask for the run alone
                self.bursts.pop(agent, None)
                return units
            self.bursts[agent] = rate.burst
            if check.retry_after is None:  # size is above the burst
                return max(units, min(size - 1, rate.burst)) if units <= rate.burst else None
            retry_ms = round(check.retry_after * 1000)
            per_ms = rate.per_seconds * 1000
            allowed = size - math.ceil(retry_ms * rate.units / per_ms)
            if units <= allowed:
                return max(units, allowed)
            maybe = units * per_ms < size * per_ms - (retry_ms - 1) * rate.units
            return units if maybe else None

    def finish(self, run: LeaseRun, status: SettleStatus, units: int) -> Settlement:
        """Close ``run`` as a Check's reservation closes (see design of settle.lua): the first
        close counts; a record after its release is charged now, flagged late (a release never
        erases a record): with its slice if that is not settled yet, else with the next slice
        settled, or, once the lease is closed, on its own (``charge_late``); any other later
        close returns the first outcome, replayed."""
        alone = False
        with self.lock:
            first = run.outcome
            s = run.slice
            if first is None:
                s.held -= run.estimate
                s.used += units
                s.open.discard(run)
                run.outcome = _outcome(s, status, units, run.estimate)
                return run.outcome
            if status != "recorded" or first.status != "released":
                return replace(first, replayed=True)
            if not s.settled:
                s.used += units
            elif not self.closed:
                self.owed += units  # charged with the next slice settled, or on close
            else:
                alone = True
            run.outcome = outcome = _outcome(s, "late", units, 0, late=True)
        if alone and units:
            assert self.charge_late is not None  # every lease sets it
            self.charge_late(units)
        return outcome

    def to_settle(self, closing: bool = False, replacing: bool = False) -> list[Slice]:
        """The slices whose record to send now, each marked as being sent (:meth:`sent` or
        :meth:`unsent` it), with its ``charge``.

        Those are the slices settled before whose record has not landed, and the slices done
        with now: not current (or, ``replacing``, the current one too: a new slice is needed),
        or stale, and with no run open; or, when closing, every slice (its open runs charged
        their estimates, which is their close). The first one settled now also carries the late
        records of runs whose slice was already settled."""
        now = time.monotonic()
        with self.lock:
            if closing:
                self.closed = True
            for s in self.slices:
                if s.settled:
                    continue
                done = closing or replacing or s is not self.current or now >= s.usable_until
                if done and (not s.open or closing):
                    for run in s.open:
                        run.outcome = _outcome(s, "recorded", run.estimate, 0)
                    s.open.clear()
                    s.settled = True
                    s.charge = s.used + s.held + self.owed
                    self.owed = 0
            if self.current is not None and self.current.settled:
                self.current = None
            out = [s for s in self.slices if s.settled and not s.sending]
            for s in out:
                s.sending = True
            return out

    def sent(self, s: Slice) -> None:
        """``s``'s record landed (or is queued for the client's delivery)."""
        with self.lock:
            if s in self.slices:  # not a parent's slice, in a forked child
                self.slices.remove(s)
            self.settled_units += s.charge
            self.settled_count += 1

    def unsent(self, s: Slice) -> None:
        """``s``'s record was interrupted: still owed, sent again by the next settle."""
        with self.lock:
            s.sending = False

    def owed_id(self) -> str:
        """A new reservation id of this lease's customer, never issued: a record naming it
        charges its units directly (``late``), and never closes another reservation, as a
        record without an id could."""
        return reservation_id(customer_tag(customer_of(self.customer_id)), new_token())

    def take_owed(self) -> int:
        """Late records no slice was left to carry (the lease is closing): to charge alone."""
        with self.lock:
            owed, self.owed = self.owed, 0
            return owed

    def owe(self, units: int) -> None:
        """The charge of late records was interrupted: owed again."""
        with self.lock:
            self.owed += units

    def charged_alone(self, units: int) -> None:
        with self.lock:
            self.settled_units += units
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


def _refusal(check: BaseCheck, units: int) -> LeaseCheck:
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


Record = tuple[str, int, str, str | None, str | None]
"""A ``_settle_surely`` call's arguments: reservation id, units, agent, customer, task_ref."""


def _slice_record(s: Slice, task_ref: str | None) -> Record:
    """The record of a settled slice: what its runs used, on its reservation."""
    c = s.check
    return c.reservation_id, s.charge, c.agent_id, c.customer_id, task_ref


def _owed_record(book: LeaseBook, units: int, task_ref: str | None) -> Record:
    """A direct late charge of ``units`` under an id never issued, so it closes no reservation
    (see :meth:`LeaseBook.owed_id`)."""
    return book.owed_id(), units, book.agent_id, book.customer_id, task_ref


class QueuesSettlements(Protocol):
    """What a lease needs of either client to charge a late run without I/O of its own: this
    module sits below the clients, so it names the methods it calls instead of the classes."""

    def _plan_close(
        self,
        reservation_id: str,
        units: int | None,
        agent_id: str,
        customer_id: str | None,
        task_ref: str | None,
        *,
        learn: bool = True,
    ) -> Plan[Settlement]: ...

    def _settle_later(self, plan: Plan[Settlement]) -> Settlement: ...


class LeaseClient(QueuesSettlements, Protocol):
    """What a :class:`Lease` calls on AgentBillClient."""

    @property
    def ceiling(self) -> int | None: ...

    def _reserve_slice(
        self, agent_id: str, units: int, customer_id: str | None, task_ref: str | None, ttl: int
    ) -> BaseCheck: ...

    def get_budget(
        self, customer_id: str | None = None, *, agent_id: str | None = None
    ) -> BudgetStatus: ...

    def _settle_surely(
        self,
        reservation_id: str,
        units: int | None,
        agent_id: str,
        customer_id: str | None,
        task_ref: str | None,
        *,
        learn: bool = True,
    ) -> Settlement: ...


class AsyncLeaseClient(QueuesSettlements, Protocol):
    """What an :class:`AsyncLease` awaits on AsyncAgentBillClient."""

    @property
    def ceiling(self) -> int | None: ...

    async def _reserve_slice(
        self, agent_id: str, units: int, customer_id: str | None, task_ref: str | None, ttl: int
    ) -> BaseCheck: ...

    async def get_budget(
        self, customer_id: str | None = None, *, agent_id: str | None = None
    ) -> BudgetStatus: ...

    async def _settle_surely(
        self,
        reservation_id: str,
        units: int | None,
        agent_id: str,
        customer_id: str | None,
        task_ref: str | None,
        *,
        learn: bool = True,
    ) -> Settlement: ...


def _charge_later(
    client: QueuesSettlements,
    book: LeaseBook,
    task_ref: str | None,
    units: int,
) -> None:
    """Charge a run recorded after its release and after its lease closed: queued for the
    client's background delivery (a run's record does no I/O of its own), exactly once."""
    rid, units, agent_id, customer_id, task_ref = _owed_record(book, units, task_ref)
    client._settle_later(
        client._plan_close(rid, units, agent_id, customer_id, task_ref, learn=False)
    )
    book.charged_alone(units)


class Lease:
    """A lease on :class:`AgentBillClient`; see the module docstring. Use it as a context
    manager, or call :meth:`close`."""

    def __init__(
        self,
        client: LeaseClient,
        agent_id: str,
        customer_id: str | None,
        *,
        slice_units: int,
        task_ref: str | None,
        ttl: int,
    ) -> None:
        self._client = client
        self._task_ref = task_ref
        self.book = LeaseBook(agent_id, customer_id, slice_units, ttl, client.ceiling)
        self.book.charge_late = functools.partial(_charge_later, client, self.book, task_ref)

    def preflight(self, estimated_units: int) -> LeaseCheck:
        """Approve a run locally if the current slice has room, else settle the slices done
        with (the current one too, if no run is open in it) and reserve a new slice (a round
        trip; more if the slice must be smaller, see :meth:`LeaseBook.acquire`). A refusal is
        returned, with the numbers of the rule that refused: the lease refuses a run only when
        a plain preflight of it would be refused too."""
        units = validate_units("estimated_units", estimated_units)
        local = self.book.try_local(units)
        if local is not None:
            return local
        self._settle(replacing=True)
        dialogue = self.book.acquire(units)
        answer: BaseCheck | BudgetStatus | None = None
        while True:
            try:
                ask = dialogue.send(answer)  # type: ignore[arg-type]  # None starts it
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            answer = self._answer(ask)

    def _answer(self, ask: Ask) -> BaseCheck | BudgetStatus:
        book = self.book
        if isinstance(ask, SliceAsk):
            return self._client._reserve_slice(
                book.agent_id, ask.size, book.customer_id, self._task_ref, book.ttl
            )
        agent = book.agent_id if ask.agent else None
        return self._client.get_budget(book.customer_id, agent_id=agent)

    def _settle(self, closing: bool = False, replacing: bool = False) -> None:
        """Send the records of the slices done with (see :meth:`LeaseBook.to_settle`), surely
        (see the module docstring); when closing, charge alone what late records left owed."""
        book, client = self.book, self._client
        for s in book.to_settle(closing, replacing):
            try:
                client._settle_surely(*_slice_record(s, self._task_ref), learn=False)
            except BaseException:
                book.unsent(s)
                raise
            book.sent(s)
        if closing and (owed := book.take_owed()):
            try:
                client._settle_surely(*_owed_record(book, owed, self._task_ref), learn=False)
            except BaseException:
                book.owe(owed)
                raise
            book.charged_alone(owed)

    def stats(self) -> LeaseStats:
        return self.book.stats()

    def close(self) -> None:
        """Settle every slice: charge what its runs used and release the rest. A run still
        open is charged its estimate (that is its close: its later record or release returns
        that outcome, replayed)."""
        self._settle(closing=True)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> Lease:
        raise TypeError(
            "AgentBillClient.lease(...) is a plain context manager: use `with`, or an "
            "AsyncAgentBillClient for `async with`"
        )

    async def __aexit__(self, *exc_info: object) -> None:
        return None  # never entered: __aenter__ raised


class AsyncLease:
    """A lease on :class:`AsyncAgentBillClient`: ``await lease.preflight(...)``,
    ``await lease.close()``, ``async with``; runs' ``record``/``release`` stay local."""

    def __init__(
        self,
        client: AsyncLeaseClient,
        agent_id: str,
        customer_id: str | None,
        *,
        slice_units: int,
        task_ref: str | None,
        ttl: int,
    ) -> None:
        self._client = client
        self._task_ref = task_ref
        self.book = LeaseBook(agent_id, customer_id, slice_units, ttl, client.ceiling)
        self.book.charge_late = functools.partial(_charge_later, client, self.book, task_ref)

    async def preflight(self, estimated_units: int) -> LeaseCheck:
        """See :meth:`Lease.preflight`."""
        units = validate_units("estimated_units", estimated_units)
        local = self.book.try_local(units)
        if local is not None:
            return local
        await self._settle(replacing=True)
        dialogue = self.book.acquire(units)
        answer: BaseCheck | BudgetStatus | None = None
        while True:
            try:
                ask = dialogue.send(answer)  # type: ignore[arg-type]  # None starts it
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            answer = await self._answer(ask)

    async def _answer(self, ask: Ask) -> BaseCheck | BudgetStatus:
        book = self.book
        if isinstance(ask, SliceAsk):
            return await self._client._reserve_slice(
                book.agent_id, ask.size, book.customer_id, self._task_ref, book.ttl
            )
        agent = book.agent_id if ask.agent else None
        return await self._client.get_budget(book.customer_id, agent_id=agent)

    async def _settle(self, closing: bool = False, replacing: bool = False) -> None:
        """See :meth:`Lease._settle`."""
        book, client = self.book, self._client
        for s in book.to_settle(closing, replacing):
            try:
                await client._settle_surely(*_slice_record(s, self._task_ref), learn=False)
            except BaseException:
                book.unsent(s)
                raise
            book.sent(s)
        if closing and (owed := book.take_owed()):
            try:
                await client._settle_surely(*_owed_record(book, owed, self._task_ref), learn=False)
            except BaseException:
                book.owe(owed)
                raise
            book.charged_alone(owed)

    def stats(self) -> LeaseStats:
        return self.book.stats()

    async def close(self) -> None:
        """See :meth:`Lease.close`."""
        await self._settle(closing=True)

    async def __aenter__(self) -> AsyncLease:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __enter__(self) -> AsyncLease:
        raise TypeError(
            "AsyncAgentBillClient.lease(...) is an async context manager: use `async with`"
        )

    def __exit__(self, *exc_info: object) -> None:
        return None  # never entered: __enter__ raised
