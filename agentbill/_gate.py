"""``@client.gate(...)``: preflight before a function runs, record after, release on failure.

One Gate serves both clients. With ``AgentBillClient`` it wraps ``def`` and ``async def`` (the
round trips then block the event loop briefly); with ``AsyncAgentBillClient`` it wraps
``async def`` and awaits them. An ``async def`` is preflighted when its coroutine starts, not
when it is created, so a coroutine that is never awaited holds nothing.
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
from agentbill._results import BaseCheck, Settlement

logger = logging.getLogger("agentbill")

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

Units: TypeAlias = int | Callable[[T], int] | None
"""What a gate records after the body: an int, a callable of the body's result, or the estimate."""

__all__ = ["AsyncRun", "Gate", "Run", "Units"]


async def _resolved(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


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
        self._agent_id = agent_id
        self._estimated_units = estimated_units
        self._customer_id = customer_id
        self._units = units
        self._task_ref = task_ref
        self._task_ceiling = task_ceiling
        self._ttl = ttl

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        if inspect.iscoroutinefunction(fn):
            return cast(Callable[P, R], self._wrap_async(fn))
        if self._is_async_client:
            raise TypeError(
                f"{fn.__qualname__} is not an async def: an AsyncAgentBillClient gate awaits "
                "the preflight, so it wraps coroutine functions only (use AgentBillClient)"
            )
        return self._wrap_sync(fn)

    def _preflight(self) -> Any:
        return self._client.preflight(
            self._agent_id,
            self._estimated_units,
            self._customer_id,
            task_ref=self._task_ref,
            task_ceiling=self._task_ceiling,
            ttl=self._ttl,
        )

    def _units_of(self, result: object) -> int:
        if self._units is None:
            return self._estimated_units
        used = self._units(result) if callable(self._units) else self._units
        return validate_units("units", used)

    def _wrap_sync(self, fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def gated(*args: P.args, **kwargs: P.kwargs) -> R:
            check = self._preflight().raise_for_refusal()
            try:
                result = fn(*args, **kwargs)
            except BaseException:  # KeyboardInterrupt and SystemExit too
                _release_quietly(check)
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
            check = (await _resolved(self._preflight())).raise_for_refusal()
            try:
                result = await fn(*args, **kwargs)
            except BaseException:  # CancelledError, timeouts and KeyboardInterrupt too
                await _release_quietly_async(check)
                raise
            try:
                used = self._units_of(result)
            except Exception:
                await _resolved(check.record(self._estimated_units))
                raise
            await _resolved(check.record(used))
            return result

        return gated


def _warn_unreleased(check: BaseCheck, exc: AgentBillError) -> None:
    logger.warning(
        "agentbill: could not release reservation %s after the run failed (%s); "
        "its units return when it expires at %s",
        check.reservation_id,
        exc,
        check.expires_at,
    )


def _release_quietly(check: Any) -> None:
    """Release after the body failed, never hiding the body's own exception.

    If Redis is unreachable now, the reservation keeps its units until its TTL.
    """
    try:
        check.release()
    except AgentBillError as exc:
        _warn_unreleased(check, exc)


async def _release_quietly_async(check: Any) -> None:
    try:
        outcome = check.release()
        if inspect.isawaitable(outcome):
            # Shielded: a second cancellation must not abandon the release half-way.
            await asyncio.shield(outcome)
    except AgentBillError as exc:
        _warn_unreleased(check, exc)


class Run:
    """``with client.run(...) as run``: a gated block for code that is not one function.

    Entering preflights (raising the typed RunBlockedError on refusal, so the block does not
    run). Inside, ``run.record(units)`` records what was used. Leaving the block: on an
    exception (KeyboardInterrupt too) the reservation is released and the exception re-raised;
    without a record, the estimate is charged if ``charge_estimate`` (the work happened but
    nobody measured it), else the reservation is released.
    """

    def __init__(self, client: Any, charge_estimate: bool, **preflight: Any) -> None:
        self._client = client
        self._charge_estimate = charge_estimate
        self._preflight = preflight
        self._check: Any = None
        self.settlement: Settlement | None = None

    @property
    def check(self) -> Any:
        """The approved Check (AsyncCheck with the async client)."""
        return self._check

    def _finish(self) -> Any:
        """Settle a block that ended normally: nothing to do if it recorded."""
        if self.settlement is None:
            if self._charge_estimate:
                return self._check.record(self._check.estimated_units)
            return self._check.release()
        return None

    def __enter__(self) -> Run:
        self._check = self._client.preflight(**self._preflight).raise_for_refusal()
        return self

    def record(self, units: int, **kwargs: Any) -> Settlement:
        self.settlement = self._check.record(units, **kwargs)
        return self.settlement

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            _release_quietly(self._check)
            return
        self._finish()


class AsyncRun(Run):
    """``async with client.run(...) as run``; see :class:`Run`. ``await run.record(units)``."""

    async def __aenter__(self) -> AsyncRun:
        check = await self._client.preflight(**self._preflight)
        self._check = check.raise_for_refusal()
        return self

    async def record(self, units: int, **kwargs: Any) -> Settlement:  # type: ignore[override]
        self.settlement = await self._check.record(units, **kwargs)
        return self.settlement

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            await _release_quietly_async(self._check)
            return
        outcome = self._finish()
        if outcome is not None:
            await asyncio.shield(outcome)
