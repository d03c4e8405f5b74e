"""``@client.gate(...)``: preflight before a function runs, record after, release on failure."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeAlias, TypeVar, cast

from agentbill._exceptions import AgentBillError
from agentbill._models import validate_units

if TYPE_CHECKING:
    from agentbill._client import AgentBillClient
    from agentbill._results import Check

logger = logging.getLogger("agentbill")

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

Units: TypeAlias = int | Callable[[T], int] | None
"""What a gate records after the body: an int, a callable of the body's result, or the estimate."""

__all__ = ["Gate", "Units"]


class Gate:
    """A decorator bound to one client and one run description; see AgentBillClient.gate."""

    def __init__(
        self,
        client: AgentBillClient,
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
        return self._wrap_sync(fn)

    def _preflight(self) -> Check:
        check = self._client.preflight(
            self._agent_id,
            self._estimated_units,
            self._customer_id,
            task_ref=self._task_ref,
            task_ceiling=self._task_ceiling,
            ttl=self._ttl,
        )
        return check.raise_for_refusal()

    def _settle(self, check: Check, result: object) -> None:
        try:
            used = self._units_of(result)
        except Exception:
            # The work happened: charge what was reserved rather than nothing.
            check.record(self._estimated_units)
            raise
        check.record(used)

    def _units_of(self, result: object) -> int:
        if self._units is None:
            return self._estimated_units
        used = self._units(result) if callable(self._units) else self._units
        return validate_units("units", used)

    def _wrap_sync(self, fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def gated(*args: P.args, **kwargs: P.kwargs) -> R:
            check = self._preflight()
            try:
                result = fn(*args, **kwargs)
            except BaseException:
                _release_quietly(check)
                raise
            self._settle(check, result)
            return result

        return gated

    def _wrap_async(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        # The preflight runs when the coroutine starts, not when it is created, and the record
        # after it finishes: a coroutine that is never awaited holds nothing.
        @functools.wraps(fn)
        async def gated(*args: P.args, **kwargs: P.kwargs) -> T:
            check = self._preflight()
            try:
                result = await fn(*args, **kwargs)
            except BaseException:  # CancelledError and KeyboardInterrupt too
                _release_quietly(check)
                raise
            self._settle(check, result)
            return result

        return gated


def _release_quietly(check: Check) -> None:
    """Release after the body failed, never hiding the body's own exception.

    If Redis is unreachable now, the reservation keeps its units until its TTL.
    """
    try:
        check.release()
    except AgentBillError as exc:
        logger.warning(
            "agentbill: could not release reservation %s after the run failed (%s); "
            "its units return when it expires at %s",
            check.reservation_id,
            exc,
            check.expires_at,
        )
