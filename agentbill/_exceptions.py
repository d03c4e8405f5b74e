"""Every error agentbill raises, in one tree.

    AgentBillError
    ├── RunBlockedError               a budget rule said no (a refusal, not a failure)
    │   ├── CeilingExceededError      estimate above the client's per-request ceiling
    │   ├── BudgetExhaustedError      the customer's budget cannot cover the estimate
    │   ├── TaskCeilingExceededError  the task's ceiling cannot cover the estimate
    │   ├── RateLimitedError          a rate limit cannot take it now (retry_after)
    │   └── ConcurrencyLimitedError   too many runs in flight
    ├── InvalidRequestError           bad input; also a ValueError; nothing was written
    └── StoreError                    Redis answered with an error we did not expect
        ├── AuthenticationError       Redis refused the credentials (a wrong or revoked key)
        ├── LibraryNotLoadedError     Redis lacks agentbill's Functions library and this
        │                             client may not load it (a tenant key): .library, .node
        └── StoreUnavailableError     Redis could not run the call now; nothing was approved
            ├── StoreBusyError        Redis answered "not now" (BUSY, OOM, LOADING, ...): .code;
            │                         nothing was written, so the same call may simply be
            │                         made again; never triggers the outage policy
            └── NodesUnreachableError a tenant key change missed some nodes: .nodes (KeyAdmin)

Refusals carry the numbers a handler needs (``reason``, ``limit``, ``remaining``); failures say
what failed and are always raised ``from`` the underlying redis-py exception.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agentbill._check import REFUSALS, BaseCheck, check_fields, check_from_fields

__all__ = [
    "AgentBillError",
    "AuthenticationError",
    "BudgetExhaustedError",
    "CeilingExceededError",
    "ConcurrencyLimitedError",
    "InvalidRequestError",
    "LibraryNotLoadedError",
    "NodesUnreachableError",
    "RateLimitedError",
    "RunBlockedError",
    "StoreBusyError",
    "StoreError",
    "StoreUnavailableError",
    "TaskCeilingExceededError",
]


class AgentBillError(Exception):
    """Root of every error agentbill raises."""


class RunBlockedError(AgentBillError):
    """A preflight was refused: the run must not start.

    ``check`` is the refused :class:`~agentbill.Check`; ``reason`` its machine-readable reason.
    """

    def __init__(self, check: BaseCheck | Mapping[str, Any]) -> None:
        if isinstance(check, Mapping):
            check = check_from_fields(check)
        self.check: BaseCheck = check
        self.reason: str = check.reason or "refused"
        # args is the check's fields, JSON-safe: the error pickles, and a task queue's result
        # backend that rebuilds errors as cls(*args) (Celery's) gets the typed error back.
        super().__init__(check_fields(check))

    def __str__(self) -> str:
        return self._describe()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._describe()!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), self.args)

    @property
    def limit(self) -> int | None:
        """The limit of the rule that refused (ceiling, budget or task ceiling)."""
        return self.check.limit

    @property
    def remaining(self) -> int | None:
        """The customer's units left (None when the customer has no budget)."""
        return self.check.remaining

    @property
    def retry_after(self) -> float | None:
        """Seconds after which asking again may succeed; None when waiting will not help."""
        return self.check.retry_after

    @property
    def scope(self) -> str | None:
        """Which scope's rule refused: request, task, customer or agent."""
        return self.check.scope

    def _describe(self) -> str:
        c = self.check
        return (
            f"run blocked ({self.reason}): agent {c.agent_id!r} asked {c.estimated_units} units "
            f"for customer {c.customer_id!r}; limit {c.limit}, remaining {c.remaining}"
        )


class CeilingExceededError(RunBlockedError):
    """The estimate is above the client's per-request ``ceiling``."""


class BudgetExhaustedError(RunBlockedError):
    """The customer's budget cannot cover the estimate."""

    def __init__(self, check: BaseCheck | Mapping[str, Any]) -> None:
        super().__init__(check)
        self.customer_id = self.check.customer_id


class TaskCeilingExceededError(RunBlockedError):
    """The task's ceiling cannot cover the estimate on top of what the task already used."""

    def __init__(self, check: BaseCheck | Mapping[str, Any]) -> None:
        super().__init__(check)
        self.task_ref = self.check.task_ref
        self.ceiling = self.check.task_ceiling
        self.used = self.check.task_used
        self.task_remaining = self.check.task_remaining

    @property
    def remaining(self) -> int | None:
        """The task's units left under its ceiling."""
        return self.check.task_remaining


class RateLimitedError(RunBlockedError):
    """A rate limit (of the customer or of the agent) cannot take the estimate now; see
    ``retry_after``."""


class ConcurrencyLimitedError(RunBlockedError):
    """The customer (or the agent) already has its maximum of runs in flight."""


REFUSALS.update(
    {
        "": RunBlockedError,
        "ceiling_exceeded": CeilingExceededError,
        "budget_exhausted": BudgetExhaustedError,
        "task_ceiling_exceeded": TaskCeilingExceededError,
        "rate_limited": RateLimitedError,
        "concurrency_limited": ConcurrencyLimitedError,
    }
)


class InvalidRequestError(AgentBillError, ValueError):
    """The request was malformed; nothing was written.

    ``field`` names the offending argument (``"estimated_units"``, ``"customer_id"``, ...).
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(field, message)  # args rebuild it: it pickles

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class StoreError(AgentBillError):
    """Redis answered with an error agentbill did not expect (permissions, memory, scripts)."""


class AuthenticationError(StoreError):
    """Redis refused the credentials: a wrong or revoked ``api_key``, or a missing one where
    Redis requires one. Never retried, and never an outage: an outage policy does not approve
    runs offline because of it. The message never holds the key.
    """


class LibraryNotLoadedError(StoreError):
    """Redis does not have agentbill's Functions library (``library``: its name) and refused
    to let this client load it (FUNCTION LOAD answered NOPERM on ``node``, ``host:port``): a
    tenant key may call the library's functions but not load them. An operator loads it once
    per Redis (it persists and replicates with the data) with ``agentbill keys load-library``
    or ``KeyAdmin.load_library()``. Nothing ran. Never retried, and never an outage.
    """

    def __init__(self, message: str, library: str, node: str) -> None:
        self.library = library
        self.node = node
        super().__init__(message, library, node)  # args rebuild it: it pickles

    def __str__(self) -> str:
        return str(self.args[0])


class StoreUnavailableError(StoreError):
    """Redis could not run the call now: it could not be reached, did not answer within the
    configured timeouts, or (the subclass :class:`StoreBusyError`) answered "not now".

    Nothing was approved: in the default fail-closed mode no run may start without Redis. This
    class itself (Redis unreachable or silent) is what an outage policy (``on_outage``) acts
    on; the call may have run before its reply was lost, so make it again as the same request
    (the same reservation id or idempotency key).
    """


class StoreBusyError(StoreUnavailableError):
    """Redis answered that it cannot run the call now: ``code`` is its error code (``BUSY``: a
    script is running; ``OOM``: maxmemory reached; ``LOADING``, ``MASTERDOWN``, ``READONLY``,
    ``TRYAGAIN``, ``CLUSTERDOWN``, ``NOREPLICAS``, ``MISCONF``).

    Redis refused every attempt before writing anything, so the same call may simply be made
    again, later (a record without a reservation id or idempotency key included). Redis is up:
    no outage policy approves a run offline or queues a settlement because of it.
    """

    def __init__(self, message: str, code: str) -> None:
        self.code = code
        super().__init__(message, code)  # args rebuild it: it pickles

    def __str__(self) -> str:
        return str(self.args[0])


class NodesUnreachableError(StoreUnavailableError):
    """A key change (or listing, or a load of the library) could not be made on every data
    node. ``nodes``: each node it did not reach (``host:port``), ``key_id``: the key's, if
    known. The message says what was done and on which nodes, and what to do: a key revoked
    while a node was down is still accepted by that node (and by a replica of it that a
    failover promotes), so run the revoke again once it is back, or remove the node from the
    cluster or Sentinel set. A create that raises this created nothing (what it had made was
    deleted again)."""

    def __init__(self, message: str, nodes: tuple[str, ...], key_id: str | None = None) -> None:
        self.nodes = nodes
        self.key_id = key_id
        super().__init__(message, nodes, key_id)  # args rebuild it: it pickles

    def __str__(self) -> str:
        return str(self.args[0])
