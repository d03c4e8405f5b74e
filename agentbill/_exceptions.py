"""Every error agentbill raises, in one tree.

    AgentBillError
    ├── RunBlockedError               a budget rule said no (a refusal, not a failure)
    │   ├── CeilingExceededError      estimate above the client's per-request ceiling
    │   ├── BudgetExhaustedError      the customer's budget cannot cover the estimate
    │   └── TaskCeilingExceededError  the task's ceiling cannot cover the estimate
    ├── InvalidRequestError           bad input; also a ValueError; nothing was written
    └── StoreError                    Redis answered with an error we did not expect
        └── StoreUnavailableError     Redis could not be reached or did not answer in time

Refusals carry the numbers a handler needs (``reason``, ``limit``, ``remaining``); failures say
what failed and are always raised ``from`` the underlying redis-py exception.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agentbill._results import BaseCheck

__all__ = [
    "AgentBillError",
    "BudgetExhaustedError",
    "CeilingExceededError",
    "InvalidRequestError",
    "RunBlockedError",
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

    def __init__(self, check: BaseCheck) -> None:
        self.check = check
        self.reason: str = check.reason or "refused"
        super().__init__(self._describe())

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
        return None

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

    def __init__(self, check: BaseCheck) -> None:
        self.customer_id = check.customer_id
        super().__init__(check)


class TaskCeilingExceededError(RunBlockedError):
    """The task's ceiling cannot cover the estimate on top of what the task already used."""

    def __init__(self, check: BaseCheck) -> None:
        self.task_ref = check.task_ref
        self.ceiling = check.task_ceiling
        self.used = check.task_used
        self.task_remaining = check.task_remaining
        super().__init__(check)

    @property
    def remaining(self) -> int | None:
        """The task's units left under its ceiling."""
        return self.check.task_remaining


class InvalidRequestError(AgentBillError, ValueError):
    """The request was malformed; nothing was written.

    ``field`` names the offending argument (``"estimated_units"``, ``"customer_id"``, ...).
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class StoreError(AgentBillError):
    """Redis answered with an error agentbill did not expect (permissions, memory, scripts)."""


class StoreUnavailableError(StoreError):
    """Redis could not be reached, or did not answer within the configured timeouts.

    Nothing was approved: in the default fail-closed mode no run may start without Redis.
    """
