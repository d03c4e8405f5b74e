"""The one retry policy, and the one place redis-py errors become agentbill errors.

Only transient transport failures are retried: a refused or reset connection, a timeout, a
server still loading its data. Retrying a write is safe because every write carries a request
id (a client-made reservation id, an idempotency key or an internal request id), so a call
whose reply was lost lands once. redis-py's own retries are switched off where the client builds
its connection, so this is the only layer. Refusals are answers, never retried.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis import exceptions as rx
from tenacity import (
    AsyncRetrying,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from agentbill._exceptions import (
    AgentBillError,
    AuthenticationError,
    InvalidRequestError,
    StoreError,
    StoreUnavailableError,
)

T = TypeVar("T")

_SCRIPT_ERRORS = {
    "idempotency_conflict": (
        "idempotency_key",
        "was already used with different arguments; use a new key for a new request",
    ),
    "agent_mismatch": ("agent_id", "does not match the reservation's agent_id"),
    "task_mismatch": ("task_ref", "does not match the reservation's task_ref"),
}


def is_transient(exc: BaseException) -> bool:
    """A failure where the same request, sent again, may succeed."""
    if isinstance(exc, rx.AuthenticationError | rx.AuthorizationError):
        return False
    return isinstance(exc, rx.ConnectionError | rx.TimeoutError | TimeoutError)


class RetryPolicy:
    """At most ``attempts`` attempts within ``deadline`` seconds, for transient failures only.

    The first attempt is a plain call: the retry machinery (tenacity) is built only after a
    transient failure, with what is left of the attempts and of the deadline, so the common
    case pays nothing for it. ``stop_after_delay`` is checked after each failed attempt, so with
    the default 1 s socket timeout and 1 s deadline a server that never answers costs one
    attempt (about 1 s in all), and a refused connection is tried three times within that
    second.
    """

    def __init__(self, attempts: int, deadline: float) -> None:
        self.attempts = attempts
        self.deadline = deadline

    def _rest(self, exc: BaseException, started: float) -> dict[str, object] | None:
        """tenacity's settings for the attempts after a first failure, or None: give up."""
        left = self.deadline - (time.monotonic() - started)
        if not is_transient(exc) or self.attempts < 2 or left <= 0:
            return None
        return {
            "retry": retry_if_exception(is_transient),
            "stop": stop_after_attempt(self.attempts - 1) | stop_after_delay(left),
            "wait": wait_exponential(multiplier=0.05, max=0.5) + wait_random(0, 0.05),
            "reraise": True,
        }

    def call(self, fn: Callable[[], T]) -> T:
        started = time.monotonic()
        try:
            return fn()
        except Exception as exc:
            rest = self._rest(exc, started)
            if rest is None:
                raise
        time.sleep(FIRST_WAIT + random.uniform(0, FIRST_WAIT))
        return Retrying(**rest)(fn)  # type: ignore[arg-type]

    async def acall(self, fn: Callable[[], Awaitable[T]]) -> T:
        started = time.monotonic()
        try:
            return await fn()
        except Exception as exc:
            rest = self._rest(exc, started)
            if rest is None:
                raise
        await asyncio.sleep(FIRST_WAIT + random.uniform(0, FIRST_WAIT))

        async def attempt() -> T:  # a coroutine function, so tenacity awaits it
            return await fn()

        return await AsyncRetrying(**rest)(attempt)  # type: ignore[arg-type]


FIRST_WAIT = 0.05
"""Seconds (plus up to as much again, at random) between the first attempt and the second."""


def translate(exc: Exception) -> AgentBillError:
    """The agentbill error for a redis-py (or socket) error. Callers ``raise ... from exc``."""
    if isinstance(exc, rx.ResponseError):
        message = str(exc)
        for code, (field, text) in _SCRIPT_ERRORS.items():
            if f"AGENTBILL {code}" in message:
                return InvalidRequestError(field, text)
        if "AGENTBILL overflow " in message:
            field = message.split("AGENTBILL overflow ", 1)[1].split()[0]
            return InvalidRequestError(
                field, "would take a counter past 2**53 - 1 (Lua numbers are exact to there)"
            )
        return StoreError(f"Redis refused the command: {message}")
    if isinstance(exc, rx.AuthenticationError | rx.AuthorizationError):
        # redis-py's message is the server's ("invalid username-password pair or user is
        # disabled"): it never holds the password.
        return AuthenticationError(f"Redis refused the credentials: {exc}")
    if is_transient(exc):
        return StoreUnavailableError(f"Redis is unavailable: {type(exc).__name__}: {exc}")
    return StoreError(f"Redis error: {type(exc).__name__}: {exc}")
