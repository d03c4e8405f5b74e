"""``@client.gate(...)``: preflight before a function runs, record after, release on failure.

One Gate serves both clients. With ``AgentBillClient`` it wraps ``def`` and ``async def`` (the
round trips then block the event loop briefly); with ``AsyncAgentBillClient`` it wraps
``async def`` and awaits them. An ``async def`` is preflighted when its coroutine starts, not
when it is created, so a coroutine that is never awaited holds nothing. Generator functions are
refused when decorated: their body runs while they are iterated, after the call returned, so a
gate cannot tell when their work ends (a ``client.run(...)`` block inside one can).

Interrupted and cancelled calls hold nothing once they have returned, and a cancelled call
never starts its body after the cancel:

- The preflight's reservation id is made by the client before anything is sent, so a preflight
  interrupted (cancelled, KeyboardInterrupt) before its reply was read is released by that id,
  whether or not Redis had reserved.
- A cancel that arrives with the preflight's reply may be swallowed on the way (on Python 3.11,
  ``asyncio.wait_for``, which redis-py sends through, returns the result and drops the cancel):
  the gate sees it in ``Task.cancelling()``, releases, and raises ``CancelledError`` before the
  body starts.
- Records and releases run to their end even if the call is cancelled meanwhile (a settle cut
  half-way could leave a run uncharged, or its units held until the TTL); the cancel is raised
  once they are done. With the sync client, a KeyboardInterrupt (SIGINT, in the main thread)
  that arrives while one is under way is held back the same way and raised once it is done.

The gate owns its reservation, and no caller could make its settlement again, so:

- the reservation is made unadoptable and is not in the client's book of its own: only a
  request naming it can close it, never a record without an id in the same process;
- its record or release goes through the client's ``_settle_surely``: if Redis cannot take it
  now (busy, unreachable or silent), it is queued, whatever the outage policy, and delivered
  in the background, exactly once, instead of being raised and lost.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Literal, ParamSpec, Protocol, TypeAlias, TypeVar, cast, overload

from agentbill._check import BaseCheck
from agentbill._core import Plan
from agentbill._exceptions import AgentBillError
from agentbill._interrupts import interrupts_held
from agentbill._learned import EstimatesClient, Learner
from agentbill._models import validate_units
from agentbill._results import AsyncCheck, Check, Estimates, Settlement

logger = logging.getLogger("agentbill")

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

UnitsUsed: TypeAlias = int | Callable[[T], int] | None
"""What a gate records after the body: an int, a callable of the body's result, or the estimate
(None). Not ``_models.Units``, the validated int every count of units is."""

__all__ = ["AsyncRun", "Gate", "Run", "UnitsUsed"]


class GateClient(EstimatesClient, Protocol):
    """What a gate, a run block and an LLM call's ticket call on a client, either one: this
    module sits below both, so it names the methods instead of importing the classes.
    AgentBillClient returns values, AsyncAgentBillClient awaitables."""

    def preflight(
        self,
        agent_id: str,
        estimated_units: int,
        customer_id: str | None = None,
        *,
        task_ref: str | None = None,
        task_ceiling: int | None = None,
        idempotency_key: str | None = None,
        ttl: int | None = None,
    ) -> BaseCheck | Awaitable[BaseCheck]: ...

    def _plan_preflight(
        self,
        agent_id: object,
        estimated_units: object,
        customer_id: object = None,
        task_ref: object = None,
        task_ceiling: object = None,
        idempotency_key: object = None,
        ttl: object = None,
        adoptable: bool = True,
    ) -> Plan[Any]: ...

    def _preflight(
        self, plan: Plan[Any], track: bool = True
    ) -> BaseCheck | Awaitable[BaseCheck]: ...

    def _settle_surely(
        self,
        reservation_id: str,
        units: int | None,
        agent_id: str,
        customer_id: str | None,
        task_ref: str | None,
        **options: Any,
    ) -> Settlement | Awaitable[Settlement]: ...


class SyncGateClient(GateClient, Protocol):
    """AgentBillClient, as a gate sees it: every call returns its value."""

    def estimates(
        self, agent_id: str, customer_id: str | None = None, *, model: str | None = None
    ) -> Estimates: ...

    def _preflight(self, plan: Plan[Any], track: bool = True) -> Check: ...

    def _settle_surely(
        self,
        reservation_id: str,
        units: int | None,
        agent_id: str,
        customer_id: str | None,
        task_ref: str | None,
        **options: Any,
    ) -> Settlement: ...


class Gate:
    """A decorator bound to one client and one run description; see ``AgentBillClient.gate``."""

    def __init__(
        self,
        client: GateClient,
        *,
        agent_id: str,
        estimated_units: int | Literal["learned"],
        customer_id: str | None,
        units: UnitsUsed[Any],
        task_ref: str | None,
        task_ceiling: int | None,
        ttl: int | None,
        bound: int | None = None,
    ) -> None:
        self._client = client
        self._is_async_client = inspect.iscoroutinefunction(client.preflight)
        self._units = units
        self._preflight = {
            "agent_id": agent_id,
            "estimated_units": estimated_units,
            "customer_id": customer_id,
            "task_ref": task_ref,
            "task_ceiling": task_ceiling,
            "ttl": ttl,
        }
        self._ask = _Asking(client, self._preflight, bound)

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            block = "async with" if inspect.isasyncgenfunction(fn) else "with"
            raise TypeError(
                f"{fn.__qualname__} is a generator function: its body runs while it is "
                "iterated, after the call returned, so a gate cannot tell when its work ends. "
                f"Meter it with a block inside it instead: `{block} client.run(...) as run:` "
                "around the loop, recording what it used"
            )
        if inspect.iscoroutinefunction(fn):
            return cast(Callable[P, R], self._wrap_async(fn))
        if self._is_async_client:
            raise TypeError(
                f"{fn.__qualname__} is not an async def: an AsyncAgentBillClient gate awaits "
                "the preflight, so it wraps coroutine functions only (use AgentBillClient)"
            )
        return self._wrap_sync(fn)

    def _units_of(self, result: object, check: Any) -> int:
        if self._units is None:
            return int(check.estimated_units)
        used = self._units(result) if callable(self._units) else self._units
        return validate_units("units", used)

    def _wrap_sync(self, fn: Callable[P, R]) -> Callable[P, R]:
        client = cast(SyncGateClient, self._client)  # not an async client: see __call__

        @functools.wraps(fn)
        def gated(*args: P.args, **kwargs: P.kwargs) -> R:
            check = _admit(client, self._ask.sync())
            try:
                result = fn(*args, **kwargs)
            except BaseException:  # KeyboardInterrupt and SystemExit too
                while True:  # a second Ctrl-C as the first unwinds: released all the same
                    try:
                        _release_quietly(client, check)
                        break
                    except KeyboardInterrupt:
                        continue
                raise
            # The body returned: from here to the record, SIGINT is held back. One that lands
            # before the hold begins (or a SystemExit from ``units``) still finds the run
            # settled: the work happened, so the estimate is charged.
            held = False
            try:
                with interrupts_held():
                    held = True
                    self._record_result(fn, check, result)
            except BaseException:
                if not held:
                    _close(client, check, check.estimated_units)
                raise
            return result

        return gated

    def _record_result(self, fn: Callable[..., Any], check: Any, result: object) -> None:
        """The sync gate's settle once its body returned (SIGINT held back by the caller): a
        deferred result is released (TypeError), else ``units`` of it is recorded, or the
        estimate if ``units`` fails (the work happened)."""
        client = cast(SyncGateClient, self._client)  # only _wrap_sync calls this
        try:
            _refuse_deferred(fn, result, awaitable=True)
        except TypeError:
            _release_quietly(client, check)
            raise
        try:
            used = self._units_of(result, check)
        except BaseException:
            _close(client, check, check.estimated_units)
            raise
        _close(client, check, used)

    def _wrap_async(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        client = self._client

        @functools.wraps(fn)
        async def gated(*args: P.args, **kwargs: P.kwargs) -> T:
            check = await _admit_async(client, await self._ask.any())
            try:
                result = await fn(*args, **kwargs)
                _refuse_deferred(fn, result, awaitable=False)
            except BaseException:  # CancelledError, timeouts and KeyboardInterrupt too
                await _release_quietly_async(client, check)
                raise
            try:
                used = self._units_of(result, check)
            except BaseException:  # the work happened: the estimate
                await _close_async(client, check, check.estimated_units)
                raise
            await _close_async(client, check, used)
            return result

        return gated


class _Asking:
    """A gate's or a block's preflight arguments for its next run: as given, or with
    ``estimated_units="learned"`` what the agent's recent runs used (see ``_learned``), up to
    ``bound``."""

    def __init__(self, client: GateClient, preflight: dict[str, Any], bound: int | None) -> None:
        self._preflight = preflight
        self._bound = bound
        learned = preflight["estimated_units"] == "learned"
        self._learner = Learner(client, preflight["agent_id"], preflight["customer_id"])
        self._learned = learned and bound is not None

    def sync(self) -> dict[str, Any]:
        """With AgentBillClient."""
        if not self._learned:
            return self._preflight
        return {**self._preflight, "estimated_units": self._learner.units(cast(int, self._bound))}

    async def any(self) -> dict[str, Any]:
        """With either client."""
        if not self._learned:
            return self._preflight
        units = self._learner.units(cast(int, self._bound))
        if inspect.isawaitable(units):
            units = await units
        return {**self._preflight, "estimated_units": units}


def _refuse_deferred(fn: Callable[..., Any], result: object, *, awaitable: bool) -> None:
    """A body whose result is a generator (or, for a ``def``, an awaitable) has not done its
    work yet: the gate cannot meter it (TypeError; the caller releases)."""
    if inspect.isgenerator(result) or inspect.isasyncgen(result):
        kind = "an async generator" if inspect.isasyncgen(result) else "a generator"
    elif awaitable and inspect.isawaitable(result):
        kind = "an awaitable"
        if inspect.iscoroutine(result):
            result.close()  # never awaited: closed, so it does not warn later
    else:
        return
    raise TypeError(
        f"{fn.__qualname__} returned {kind}: its work happens after the gated call returns, "
        "so the gate released its reservation. Gate the code that does the work, or meter it "
        "with a `client.run(...)` block"
    )


# -- the preflight, guarded --------------------------------------------------------------------


def _plan(client: GateClient, preflight: dict[str, Any]) -> Plan[Any]:
    """The gate's preflight, not sent: unadoptable (only a request naming it closes it), and
    its reservation id made before anything is sent."""
    return client._plan_preflight(**preflight, adoptable=False)


def _admit(client: SyncGateClient, preflight: dict[str, Any]) -> Check:
    """Preflight; the approved Check, or the typed RunBlockedError.

    An interrupt while the preflight is under way (KeyboardInterrupt, anything but the client's
    own errors) releases its reservation by the client-made id, reserved or not, and is re-raised.
    The client's errors are raised as they are: a preflight that failed in doubt (Redis
    unreachable or silent) has its release queued by the client itself (``track=False``, see
    ``_release_in_doubt``); one Redis refused or answered busy wrote nothing. The reservation
    is not put in the client's book of its own: the gate closes it by its id.
    """
    plan = _plan(client, preflight)
    try:
        # Inside the try: an interrupt landing as the approval is read is still released.
        return client._preflight(plan, track=False).raise_for_refusal()
    except AgentBillError:
        raise
    except BaseException:
        while True:  # a second Ctrl-C as the first unwinds: released all the same
            try:
                _release_quietly(client, _Reservation(plan.reservation_id, preflight))
                break
            except KeyboardInterrupt:
                continue
        raise


async def _admit_async(client: GateClient, preflight: dict[str, Any]) -> Any:
    """:func:`_admit` for a coroutine, on either client: a cancel while the preflight is under
    way releases its reservation by id; a cancel that came with its reply and was swallowed on
    the way (``Task.cancelling()`` went up, yet the preflight returned) releases it and raises
    ``CancelledError``, before the body starts."""
    task = asyncio.current_task()
    cancelling = task.cancelling() if task is not None else 0
    plan = _plan(client, preflight)
    try:
        check = client._preflight(plan, track=False)
        if inspect.isawaitable(check):
            check = await check
    except AgentBillError:
        raise
    except BaseException:
        await _release_quietly_async(client, _Reservation(plan.reservation_id, preflight))
        raise
    if task is not None and task.cancelling() > cancelling:
        if check.approved:
            await _release_quietly_async(client, check)
        raise asyncio.CancelledError
    return check.raise_for_refusal()


class _Reservation:
    """What a settle needs of a preflight whose Check never came back: its id and run."""

    def __init__(self, reservation_id: str | None, preflight: dict[str, Any]) -> None:
        self.reservation_id = reservation_id
        self.agent_id: str = preflight["agent_id"]
        self.customer_id: str | None = preflight["customer_id"]
        self.task_ref: str | None = preflight["task_ref"]


# -- settling: surely, and through cancellation and interrupts --------------------------------


@overload
def _settle(
    client: SyncGateClient, check: Any, units: int | None, **options: Any
) -> Settlement: ...


@overload
def _settle(
    client: GateClient, check: Any, units: int | None, **options: Any
) -> Settlement | Awaitable[Settlement]: ...


def _settle(
    client: GateClient, check: Any, units: int | None, **options: Any
) -> Settlement | Awaitable[Settlement]:
    """The gate's record of ``units`` (None: its release), surely (see the module docstring):
    a Settlement, or with the async client a coroutine of one. ``options``: a record's
    ``success``, ``idempotency_key``, ``metadata``."""
    return client._settle_surely(
        check.reservation_id, units, check.agent_id, check.customer_id, check.task_ref, **options
    )


def _close(client: SyncGateClient, check: Any, units: int | None, **options: Any) -> Settlement:
    """:func:`_settle` on the sync client, with SIGINT held back until it is done. An interrupt
    that lands before the hold begins (a second Ctrl-C while the first unwinds through a
    release) does not stop it either: the settle is made, then that interrupt is raised."""
    interrupted: KeyboardInterrupt | None = None
    while True:
        settlement: Settlement | None = None
        try:
            with interrupts_held():
                settlement = _settle(client, check, units, **options)
        except KeyboardInterrupt as exc:
            if settlement is not None:  # raised as the hold ended: the settle is made
                raise
            interrupted = exc
            continue
        if interrupted is not None:
            raise interrupted
        return settlement


async def _close_async(
    client: GateClient, check: Any, units: int | None, **options: Any
) -> Settlement:
    """:func:`_settle` awaited to its end through cancellation (see :func:`_completed`)."""
    settlement: Settlement = await _completed(_settle(client, check, units, **options))
    return settlement


async def _completed(outcome: Awaitable[T] | T) -> T:
    """``outcome`` (a record or release; a plain value from the sync client) awaited to its end,
    even if this task is cancelled meanwhile: a settle cut half-way could leave a run uncharged,
    or its units held until the TTL. A cancel that came meanwhile is raised once it is done (its
    own error, if it failed, wins, as in any cleanup). Bounded by the client's timeouts."""
    if not inspect.isawaitable(outcome):
        return outcome
    fut = cast("asyncio.Future[T]", asyncio.ensure_future(outcome))
    cancel: asyncio.CancelledError | None = None
    while not fut.done():
        try:
            await asyncio.wait((fut,))
        except asyncio.CancelledError as exc:
            cancel = exc
    result = fut.result()
    if cancel is not None:
        raise cancel
    return result


def _warn_unreleased(reservation_id: str | None, exc: AgentBillError) -> None:
    logger.warning(
        "agentbill: could not release reservation %s after the run failed (%s); "
        "its units return when it expires",
        reservation_id,
        exc,
    )


def _release_quietly(client: SyncGateClient, check: Any) -> None:
    """Release after the body (or the preflight) failed, never hiding its exception. If Redis
    cannot take it now it is queued (see ``_settle_surely``); only a release Redis refuses
    outright is logged, and then the reservation keeps its units until its TTL."""
    try:
        _close(client, check, None)
    except AgentBillError as exc:
        _warn_unreleased(check.reservation_id, exc)


async def _release_quietly_async(client: GateClient, check: Any) -> None:
    """:func:`_release_quietly`, run to its end through cancellation (see :func:`_completed`)."""
    try:
        await _close_async(client, check, None)
    except AgentBillError as exc:
        _warn_unreleased(check.reservation_id, exc)


# -- run blocks ----------------------------------------------------------------------------------


class _Block:
    """What ``with client.run(...)`` and ``async with`` share: one block, entered once."""

    def __init__(
        self,
        client: GateClient,
        charge_estimate: bool,
        bound: int | None = None,
        **preflight: Any,
    ) -> None:
        self._client = client
        self._charge_estimate = charge_estimate
        self._preflight = preflight
        self._ask = _Asking(client, preflight, bound)
        self._entered = False
        self._check: Any = None
        self.settlement: Settlement | None = None

    def _enter(self) -> None:
        if self._entered:
            raise RuntimeError(
                "this client.run(...) block was already entered: a run is used once (its "
                "reservation is settled when the block ends); call client.run(...) again for "
                "the next block"
            )
        self._entered = True

    def _approved(self) -> Any:
        if self._check is None:
            raise RuntimeError("run.record() was called but the run block was not entered")
        return self._check

    def _finish(self) -> Any:
        """Settle a block that ended normally (surely, see the module docstring): nothing to do
        if it recorded. A Settlement, a coroutine of one (the async client), or None."""
        if self.settlement is None:
            units = self._check.estimated_units if self._charge_estimate else None
            return _settle(self._client, self._check, units)
        return None


def _failed(exc_type: type[BaseException] | None) -> bool:
    """A block that ends on an exception failed, unless it is GeneratorExit: the consumer of a
    generator the block is in stopped early, and the work up to there happened."""
    return exc_type is not None and not issubclass(exc_type, GeneratorExit)


class Run(_Block):
    """``with client.run(...) as run``: a gated block for code that is not one function.

    Entering preflights (raising the typed RunBlockedError on refusal, so the block does not
    run). Inside, ``run.record(units)`` records what was used. Leaving the block: on an
    exception (KeyboardInterrupt too) the reservation is released and the exception re-raised;
    without a record, the estimate is charged if ``charge_estimate`` (the work happened but
    nobody measured it), else the reservation is released. GeneratorExit (the block is in a
    generator whose consumer stopped early) ends it like a normal exit. A run object is used
    for one block.
    """

    _client: SyncGateClient

    def __init__(
        self,
        client: SyncGateClient,
        charge_estimate: bool,
        bound: int | None = None,
        **preflight: Any,
    ) -> None:
        super().__init__(client, charge_estimate, bound, **preflight)

    @property
    def check(self) -> Check:
        """The approved Check, inside the block (None before it is entered)."""
        return cast(Check, self._check)

    def __enter__(self) -> Run:
        self._enter()
        self._check = _admit(self._client, self._ask.sync())
        return self

    def extend(self, units: int) -> Check:
        """Reserve ``units`` more for this block, atomically, under every rule (see
        ``Check.extend``); the block's record, release or estimate then covers the whole.
        Raises the typed RunBlockedError on refusal (nothing changed)."""
        self._check = self._approved().extend(units)
        return cast(Check, self._check)

    def record(
        self,
        units: int,
        *,
        success: bool = True,
        idempotency_key: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Settlement:
        """Record what the block used (``success``, ``idempotency_key``, ``metadata`` as for
        ``Check.record``). It is the block's own record: if Redis cannot take it now, it is
        queued (status ``queued``) and delivered later, not raised."""
        self.settlement = _close(
            self._client,
            self._approved(),
            units,
            success=success,
            idempotency_key=idempotency_key,
            metadata=metadata,
        )
        return self.settlement

    def __exit__(self, exc_type: type[BaseException] | None, exc: object, tb: object) -> None:
        # SIGINT is held back while the block settles; one that lands before the hold begins
        # still finds it settled as the block ended.
        held = False
        try:
            with interrupts_held():
                held = True
                self._end(exc_type)
        except BaseException:
            if not held:
                with interrupts_held():
                    self._end(exc_type)
            raise

    def _end(self, exc_type: type[BaseException] | None) -> None:
        if _failed(exc_type):
            _release_quietly(self._client, self._check)
        else:
            self._finish()

    async def __aenter__(self) -> Run:
        raise TypeError(
            "AgentBillClient.run(...) is a plain context manager: use `with`, or an "
            "AsyncAgentBillClient for `async with`"
        )

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        return None  # never entered: __aenter__ raised


class AsyncRun(_Block):
    """``async with client.run(...) as run``; see :class:`Run`. ``await run.record(units)``.
    Its preflight, record and release go through cancellation like the gate's (see the module
    docstring)."""

    @property
    def check(self) -> AsyncCheck:
        """The approved AsyncCheck, inside the block (None before it is entered)."""
        return cast(AsyncCheck, self._check)

    async def __aenter__(self) -> AsyncRun:
        self._enter()
        self._check = await _admit_async(self._client, await self._ask.any())
        return self

    async def extend(self, units: int) -> AsyncCheck:
        """See :meth:`Run.extend`."""
        self._check = await self._approved().extend(units)
        return cast(AsyncCheck, self._check)

    async def record(
        self,
        units: int,
        *,
        success: bool = True,
        idempotency_key: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Settlement:
        """See :meth:`Run.record`."""
        settlement = await _close_async(
            self._client,
            self._approved(),
            units,
            success=success,
            idempotency_key=idempotency_key,
            metadata=metadata,
        )
        self.settlement = settlement
        return settlement

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: object, tb: object
    ) -> None:
        if _failed(exc_type):
            await _release_quietly_async(self._client, self._check)
            return
        outcome = self._finish()
        if outcome is not None:
            await _completed(outcome)

    def __enter__(self) -> AsyncRun:
        raise TypeError(
            "AsyncAgentBillClient.run(...) is an async context manager: use `async with`"
        )

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        return None  # never entered: __enter__ raised
