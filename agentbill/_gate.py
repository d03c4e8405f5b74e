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
  once they are done.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeAlias, TypeVar, cast

from agentbill._exceptions import AgentBillError
from agentbill._models import validate_units
from agentbill._results import Settlement

logger = logging.getLogger("agentbill")

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

Units: TypeAlias = int | Callable[[T], int] | None
"""What a gate records after the body: an int, a callable of the body's result, or the estimate."""

__all__ = ["AsyncRun", "Gate", "Run", "Units"]


class Gate:
    """A decorator bound to one client and one run description; see ``AgentBillClient.gate``."""

    def __init__(
        self,
        client: Any,
        *,
        agent_id: str,
        estimated_units: int,
        customer_id: str | None,
        units: Units[Any],
        task_ref: str | None,
        task_ceiling: int | None,
        ttl: int | None,
    ) -> None:
        self._client = client
        self._is_async_client = inspect.iscoroutinefunction(client.preflight)
        self._estimated_units = estimated_units
        self._units = units
        self._preflight = {
            "agent_id": agent_id,
            "estimated_units": estimated_units,
            "customer_id": customer_id,
            "task_ref": task_ref,
            "task_ceiling": task_ceiling,
            "ttl": ttl,
        }

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

    def _units_of(self, result: object) -> int:
        if self._units is None:
            return self._estimated_units
        used = self._units(result) if callable(self._units) else self._units
        return validate_units("units", used)

    def _wrap_sync(self, fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def gated(*args: P.args, **kwargs: P.kwargs) -> R:
            check = _admit(self._client, self._preflight)
            try:
                result = fn(*args, **kwargs)
                _refuse_deferred(fn, result, awaitable=True)
            except BaseException:  # KeyboardInterrupt and SystemExit too
                _release_quietly(check.release, check.reservation_id)
                raise
            try:
                used = self._units_of(result)
            except Exception:
                check.record(self._estimated_units)  # the work happened: charge the estimate
                raise
            check.record(used)
            return result

        return gated

    def _wrap_async(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(fn)
        async def gated(*args: P.args, **kwargs: P.kwargs) -> T:
            check = await _admit_async(self._client, self._preflight)
            try:
                result = await fn(*args, **kwargs)
                _refuse_deferred(fn, result, awaitable=False)
            except BaseException:  # CancelledError, timeouts and KeyboardInterrupt too
                await _release_quietly_async(check.release, check.reservation_id)
                raise
            try:
                used = self._units_of(result)
            except Exception:
                await _completed(check.record(self._estimated_units))
                raise
            await _completed(check.record(used))
            return result

        return gated


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


def _admit(client: Any, preflight: dict[str, Any]) -> Any:
    """Preflight; the approved Check, or the typed RunBlockedError.

    An interrupt while the preflight is under way (KeyboardInterrupt, anything but the client's
    own errors) releases its reservation by the client-made id, reserved or not, and is re-raised.
    The client's errors are not: the preflight then failed before reserving, or Redis is not
    answering (see "A preflight that timed out" in the README).
    """
    plan = client._plan_preflight(**preflight)
    try:
        check = client._preflight(plan)
    except AgentBillError:
        raise
    except BaseException:
        release = functools.partial(client.release, plan.reservation_id)
        _release_quietly(release, plan.reservation_id)
        raise
    return check.raise_for_refusal()


async def _admit_async(client: Any, preflight: dict[str, Any]) -> Any:
    """:func:`_admit` for a coroutine, on either client: a cancel while the preflight is under
    way releases its reservation by id; a cancel that came with its reply and was swallowed on
    the way (``Task.cancelling()`` went up, yet the preflight returned) releases it and raises
    ``CancelledError``, before the body starts."""
    task = asyncio.current_task()
    cancelling = task.cancelling() if task is not None else 0
    plan = client._plan_preflight(**preflight)
    try:
        check = client._preflight(plan)
        if inspect.isawaitable(check):
            check = await check
    except AgentBillError:
        raise
    except BaseException:
        release = functools.partial(client.release, plan.reservation_id)
        await _release_quietly_async(release, plan.reservation_id)
        raise
    if task is not None and task.cancelling() > cancelling:
        if check.approved:
            await _release_quietly_async(check.release, check.reservation_id)
        raise asyncio.CancelledError
    return check.raise_for_refusal()


# -- settling through cancellation ---------------------------------------------------------------


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


def _release_quietly(release: Callable[[], object], reservation_id: str | None) -> None:
    """Release after the body (or the preflight) failed, never hiding its exception.

    If Redis is unreachable now, the reservation keeps its units until its TTL.
    """
    try:
        release()
    except AgentBillError as exc:
        _warn_unreleased(reservation_id, exc)


async def _release_quietly_async(release: Callable[[], object], reservation_id: str | None) -> None:
    """:func:`_release_quietly`, run to its end through cancellation (see :func:`_completed`)."""
    try:
        await _completed(release())
    except AgentBillError as exc:
        _warn_unreleased(reservation_id, exc)


# -- run blocks ----------------------------------------------------------------------------------


class _Block:
    """What ``with client.run(...)`` and ``async with`` share: one block, entered once."""

    def __init__(self, client: Any, charge_estimate: bool, **preflight: Any) -> None:
        self._client = client
        self._charge_estimate = charge_estimate
        self._preflight = preflight
        self._entered = False
        self._check: Any = None
        self.settlement: Settlement | None = None

    @property
    def check(self) -> Any:
        """The approved Check (AsyncCheck with the async client)."""
        return self._check

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
        """Settle a block that ended normally: nothing to do if it recorded."""
        if self.settlement is None:
            if self._charge_estimate:
                return self._check.record(self._check.estimated_units)
            return self._check.release()
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

    def __enter__(self) -> Run:
        self._enter()
        self._check = _admit(self._client, self._preflight)
        return self

    def record(self, units: int, **kwargs: Any) -> Settlement:
        self.settlement = self._approved().record(units, **kwargs)
        return self.settlement

    def __exit__(self, exc_type: type[BaseException] | None, exc: object, tb: object) -> None:
        if _failed(exc_type):
            _release_quietly(self._check.release, self._check.reservation_id)
            return
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

    async def __aenter__(self) -> AsyncRun:
        self._enter()
        self._check = await _admit_async(self._client, self._preflight)
        return self

    async def record(self, units: int, **kwargs: Any) -> Settlement:
        check = self._approved()
        settlement: Settlement = await _completed(check.record(units, **kwargs))
        self.settlement = settlement
        return settlement

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: object, tb: object
    ) -> None:
        if _failed(exc_type):
            await _release_quietly_async(self._check.release, self._check.reservation_id)
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
