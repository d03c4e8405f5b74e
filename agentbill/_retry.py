"""The one retry policy, and the one place redis-py errors become agentbill errors.

Only transient transport failures are retried: a refused or reset connection, a timeout, a
server still loading its data. Retrying a write is safe because every write carries a request
id (a client-made reservation id, an idempotency key or an internal request id), so a call
whose reply was lost lands once. redis-py's own retries are switched off where the client builds
its connection, so this is the only layer. Refusals are answers, never retried.
"""

from __future__ import annotations

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


def _policy(attempts: int, deadline: float) -> dict[str, object]:
    # stop_after_delay is checked after each failed attempt, so with the default 1 s socket
    # timeout and 1 s deadline a server that never answers costs one attempt: about 1 s in all,
    # and a refused connection is tried up to three times within that second.
    return {
        "retry": retry_if_exception(is_transient),
        "stop": stop_after_attempt(attempts) | stop_after_delay(deadline),
        "wait": wait_exponential(multiplier=0.05, max=0.5) + wait_random(0, 0.05),
        "reraise": True,
    }


def retrying(attempts: int, deadline: float) -> Retrying:
    return Retrying(**_policy(attempts, deadline))  # type: ignore[arg-type]


def async_retrying(attempts: int, deadline: float) -> AsyncRetrying:
    return AsyncRetrying(**_policy(attempts, deadline))  # type: ignore[arg-type]


def translate(exc: Exception) -> AgentBillError:
    """The agentbill error for a redis-py (or socket) error. Callers ``raise ... from exc``."""
    if isinstance(exc, rx.ResponseError):
        message = str(exc)
        for code, (field, text) in _SCRIPT_ERRORS.items():
            if f"AGENTBILL {code}" in message:
                return InvalidRequestError(field, text)
        return StoreError(f"Redis refused the command: {message}")
    if isinstance(exc, rx.AuthenticationError | rx.AuthorizationError):
        # redis-py's message is the server's ("invalid username-password pair or user is
        # disabled"): it never holds the password.
        return AuthenticationError(f"Redis refused the credentials: {exc}")
    if is_transient(exc):
        return StoreUnavailableError(f"Redis is unavailable: {type(exc).__name__}: {exc}")
    return StoreError(f"Redis error: {type(exc).__name__}: {exc}")
