"""What the tools return: the library's results, as the models behind each tool's output schema.

Each model keeps the library's field names (a test checks them against the dataclasses in
``agentbill._results``), leaves out what only Python callers use (``crossed``, ``metadata``,
the client a ``Check`` holds), and describes each field for the agent that reads it.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from agentbill._check import Reason, Scope
from agentbill._results import Period, SettleStatus


class _Result(BaseModel):
    # from_attributes: built straight from the library's frozen dataclasses.
    model_config = ConfigDict(frozen=True, from_attributes=True)


class PreflightResult(_Result):
    """The decision of one preflight. A refusal is a normal result: ``approved`` false."""

    approved: bool = Field(
        description="True: the estimate is reserved, start the work. False: do not start it."
    )
    reason: Reason | None = Field(description="Why it was refused; null when approved.")
    scope: Scope | None = Field(
        description="Which rule refused: request (the per-run ceiling), task, customer or agent."
    )
    reservation_id: str | None = Field(
        description="The reservation holding the estimate: pass it to record or release."
    )
    expires_at: datetime | None = Field(
        description="When an unsettled reservation gives its units back (UTC, Redis clock)."
    )
    remaining: int | None = Field(
        description="The customer's units left after this reservation; null when unlimited."
    )
    retry_after: float | None = Field(
        description="On rate_limited: seconds after which the same ask would pass (null: never)."
    )


class SettlementResult(_Result):
    """The outcome of a record or a release."""

    status: SettleStatus = Field(
        description="recorded (closed and charged), released (closed, nothing charged), late "
        "(charged after the reservation had closed or expired), expired, direct (charged with "
        "no reservation), noop (nothing to close or charge)."
    )
    reservation_id: str | None = Field(description="The reservation this closed, if any.")
    charged: int = Field(description="Units charged (for a replay: by the first call).")
    released: int = Field(description="Reserved units given back by this call.")
    late: bool = Field(description="True when charged after the reservation had closed.")
    replayed: bool = Field(
        description="True when this repeats an earlier call (same reservation or key): "
        "nothing changed, and status and charged are the first call's."
    )
    spent: int | None = Field(description="The customer's units spent in the current period.")
    reserved: int | None = Field(description="The customer's units held by open reservations.")
    limit: int | None = Field(description="The customer's limit; null when unlimited.")
    remaining: int | None = Field(description="The customer's units left; null when unlimited.")


class RateLimitResult(_Result):
    """Sustained ``units`` per ``per_seconds``, in bursts of up to ``burst`` units."""

    units: int
    per_seconds: int
    burst: int


class BudgetResult(_Result):
    """A customer's budget, or one agent's (``agent_id`` set), in its current period."""

    customer_id: str
    agent_id: str | None = Field(description="Null for the customer's own budget.")
    limit: int | None = Field(description="Null when unlimited.")
    spent: int
    reserved: int = Field(description="Units held by open reservations.")
    remaining: int | None = Field(description="limit - spent - reserved; null when unlimited.")
    open_reservations: int = Field(description="Runs in flight.")
    period: Period | None = Field(description="Null for a lifetime budget.")
    period_start: datetime | None
    period_end: datetime | None
    resets_in: float | None = Field(description="Seconds until a fresh period starts.")
    thresholds: list[int] = Field(description="Percents of the limit that are reported once.")
    rate_limit: RateLimitResult | None
    max_in_flight: int | None = Field(description="Concurrency limit; null when none.")


class UsageResult(_Result):
    """A customer's budget and every agent's that ran or has a budget."""

    customer: BudgetResult
    agents: list[BudgetResult]


class TaskResult(_Result):
    """A task's ceiling and use."""

    task_ref: str
    customer_id: str
    ceiling: int | None = Field(description="Null: the task is tracked with no ceiling.")
    used: int
    reserved: int
    remaining: int | None = Field(description="ceiling - used - reserved; null with no ceiling.")
    exists: bool = Field(description="False when the task was never seen.")
