"""The tools: each one client call, with the library's parameter names, types and rules.

A parameter's type is the library's own pydantic type (``Id``, ``Units``, ``Seconds``), so the
input schema an agent reads states the library's rules, and the SDK's validation of a call is
the library's validation: bad input is a tool error naming the field before the client is
called at all. The client validates once more (it is the boundary for every caller).
Failures become tool errors that say what failed; a refusal is a result.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated, Literal

from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations
from pydantic import Field, Strict

from agentbill._async_client import AsyncAgentBillClient
from agentbill._exceptions import (
    AuthenticationError,
    InvalidRequestError,
    StoreError,
    StoreUnavailableError,
)
from agentbill._models import Id, Seconds, Units
from agentbill.mcp_server._results import (
    BudgetResult,
    PreflightResult,
    SettlementResult,
    TaskResult,
    UsageResult,
)

AgentId = Annotated[Id, Field(description="The agent doing the work: any stable name.")]
CustomerId = Annotated[
    Id | None, Field(description="Whose budget pays; omit for the customer named 'default'.")
]
TaskRef = Annotated[
    Id | None, Field(description="The task this run belongs to (its ceiling and use are tracked).")
]
ReservationId = Annotated[Id | None, Field(description="The reservation_id a preflight returned.")]
IdempotencyKey = Annotated[
    Id | None,
    Field(
        description="The same key on a retried call makes it take effect once: derive it from "
        "the task and step (e.g. 'task-42:step-3'), never a new one per attempt."
    ),
]
AgentScope = Annotated[Id | None, Field(description="This agent's budget within the customer's.")]
Count = Annotated[int, Strict()]
"""An integer, never a bool, float or numeric string (the library's rule for every number)."""

READ = ToolAnnotations(read_only_hint=True, open_world_hint=False)
WRITE = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False)
# Releasing twice releases once: a retried release changes nothing.
RELEASE = WRITE.model_copy(update={"idempotent_hint": True})
# Setting a rule to a value twice leaves the same rule: a retried call changes nothing.
ADMIN = ToolAnnotations(
    read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=False
)

AGENT_TOOLS = {
    "preflight": WRITE,
    "record": WRITE,
    "release": RELEASE,
    "get_budget": READ,
    "get_task": READ,
    "usage": READ,
}
"""Every agent gets these."""
ADMIN_TOOLS = {
    "set_budget": ADMIN,
    "set_rate_limit": ADMIN,
    "set_concurrency_limit": ADMIN,
    "open_task": ADMIN,
}
"""The budget-changing tools: listed only when the operator starts the server with
``--allow-admin``."""


# What an agent should do when Redis could not answer, by what the call was.
READ_LATER = "Try again later."
PREFLIGHT_LATER = (
    "Budgets cannot be checked now: do not start work that needs a preflight. The reservation "
    "may or may not have been made: retry it later with the same idempotency_key (it holds "
    "one reservation)."
)
PREFLIGHT_UNKEYED = (
    "Budgets cannot be checked now: do not start work that needs a preflight. The reservation "
    "may or may not have been made, and without an idempotency_key a retry holds another one "
    "until its ttl: retry later with a key derived from the task and step."
)
SETTLE_LATER = (
    "It may or may not have landed: retry it later with the same {by} (it takes effect once)."
)
RECORD_UNKEYED = (
    "It may or may not have been charged: do not retry it as it is, since a record with no "
    "idempotency_key and no reservation_id could charge twice. Once Redis answers, read usage "
    "to see whether it was."
)


@contextlib.contextmanager
def tool_errors(unavailable: str = READ_LATER) -> Iterator[None]:
    """The client's failures as tool errors an agent can act on; ``unavailable`` says what to
    do when Redis could not answer (whether a retry is safe depends on the call)."""
    try:
        yield
    except InvalidRequestError as exc:
        raise ToolError(f"invalid {exc.field}: {exc.message} (nothing was written)") from exc
    except AuthenticationError as exc:
        raise ToolError(
            f"{str(exc).rstrip('.')}: the server's AGENTBILL_API_KEY is wrong or revoked "
            "(ask the operator)"
        ) from exc
    except StoreUnavailableError as exc:
        raise ToolError(f"{str(exc).rstrip('.')}. {unavailable}") from exc
    except StoreError as exc:
        raise ToolError(str(exc)) from exc


def settle_advice(idempotency_key: str | None, reservation_id: str | None) -> str:
    """What to do about a record or release Redis may or may not have applied."""
    if idempotency_key is not None:
        return SETTLE_LATER.format(by="idempotency_key")
    if reservation_id is not None:
        return SETTLE_LATER.format(by="reservation_id")
    return RECORD_UNKEYED


class Tools:
    """The tool bodies over one client. Each method's docstring is what the agent reads."""

    def __init__(self, client: AsyncAgentBillClient) -> None:
        self._client = client

    async def preflight(
        self,
        agent_id: AgentId,
        estimated_units: Annotated[
            Units, Field(description="Units the work is expected to use: reserved if approved.")
        ],
        customer_id: CustomerId = None,
        task_ref: TaskRef = None,
        task_ceiling: Annotated[
            Units | None,
            Field(description="Opens an unknown task_ref with this ceiling; ignored after that."),
        ] = None,
        idempotency_key: IdempotencyKey = None,
        ttl: Annotated[
            Seconds | None,
            Field(description="Seconds an unsettled reservation holds its units (default 3600)."),
        ] = None,
    ) -> PreflightResult:
        """Before starting work, check every budget rule and, only if all pass, reserve
        estimated_units for it: one atomic step, shared with every other worker.

        approved false is a normal answer: do not start the work (reason and scope say which
        rule refused; retry_after, when set, when asking again can pass). When approved, call
        record (units used) or release (work abandoned) with the reservation_id. A retry with
        the same idempotency_key and arguments returns the same approval and holds one
        reservation."""
        with tool_errors(PREFLIGHT_LATER if idempotency_key else PREFLIGHT_UNKEYED):
            check = await self._client.preflight(
                agent_id,
                estimated_units,
                customer_id,
                task_ref=task_ref,
                task_ceiling=task_ceiling,
                idempotency_key=idempotency_key,
                ttl=ttl,
            )
        return PreflightResult.model_validate(check)

    async def record(
        self,
        agent_id: AgentId,
        units: Annotated[Units, Field(description="Units the work actually used.")],
        customer_id: CustomerId = None,
        reservation_id: ReservationId = None,
        task_ref: TaskRef = None,
        success: Annotated[
            bool, Strict(), Field(description="False: the work failed; release, charge nothing.")
        ] = True,
        idempotency_key: IdempotencyKey = None,
    ) -> SettlementResult:
        """After the work, charge the units it actually used, in full (even above the
        estimate), and give back the reservation's estimate.

        With reservation_id: closes that reservation. Without it: closes an open reservation
        of the same agent and task_ref, else charges directly. A retried record with the same
        reservation_id or idempotency_key is charged once (replayed true)."""
        with tool_errors(settle_advice(idempotency_key, reservation_id)):
            settlement = await self._client.record(
                agent_id,
                units,
                customer_id,
                reservation_id=reservation_id,
                task_ref=task_ref,
                success=success,
                idempotency_key=idempotency_key,
            )
        return SettlementResult.model_validate(settlement)

    async def release(
        self,
        reservation_id: ReservationId = None,
        idempotency_key: Annotated[
            Id | None,
            Field(
                description="Instead of reservation_id: the idempotency_key of the preflight "
                "that made the reservation (give that preflight's customer_id too)."
            ),
        ] = None,
        customer_id: CustomerId = None,
    ) -> SettlementResult:
        """Give a reservation's units back without charging anything: the work was abandoned
        or never started. Name it by reservation_id, or by the preflight's idempotency_key and
        customer_id (this works even when that preflight's answer never arrived; status noop
        if it reserved nothing). Releasing twice releases once; a release never undoes a
        record."""
        # A release is named by its reservation or its key: retrying it releases once.
        with tool_errors(settle_advice(idempotency_key, reservation_id)):
            settlement = await self._client.release(
                reservation_id, idempotency_key=idempotency_key, customer_id=customer_id
            )
        return SettlementResult.model_validate(settlement)

    async def get_budget(
        self, customer_id: CustomerId = None, agent_id: AgentScope = None
    ) -> BudgetResult:
        """The customer's budget (or one agent's) in its current period: limit, spent,
        reserved, remaining, runs in flight, the period's bounds and the other limits."""
        with tool_errors():
            status = await self._client.get_budget(customer_id, agent_id=agent_id)
        return BudgetResult.model_validate(status)

    async def get_task(
        self,
        task_ref: Annotated[Id, Field(description="The task, as passed to preflight.")],
        customer_id: CustomerId = None,
    ) -> TaskResult:
        """A task's ceiling and its used, reserved and remaining units (exists false if the
        task was never seen)."""
        with tool_errors():
            status = await self._client.get_task(task_ref, customer_id)
        return TaskResult.model_validate(status)

    async def usage(self, customer_id: CustomerId = None) -> UsageResult:
        """The customer's budget and every agent's: what is left, what is held, by whom."""
        with tool_errors():
            result = await self._client.get_usage(customer_id)
        return UsageResult.model_validate(result)

    # -- admin: listed only with --allow-admin -------------------------------------------------

    async def set_budget(
        self,
        limit: Annotated[Units | None, Field(description="Units per period; null: unlimited.")],
        customer_id: CustomerId = None,
        period: Annotated[
            Literal["hour", "day", "week", "month"] | None,
            Field(description="Calendar period after which a fresh budget starts; null: never."),
        ] = None,
        tz: Annotated[str, Field(description="IANA time zone of the period.")] = "UTC",
        agent_id: AgentScope = None,
        thresholds: Annotated[
            tuple[Count, ...], Field(description="Percents of the limit reported once a period.")
        ] = (),
    ) -> BudgetResult:
        """Operator tool: set the customer's (or one agent's) budget. It applies from the next
        preflight of every worker; lowering it below what is used only refuses new runs."""
        with tool_errors():
            status = await self._client.set_budget(
                customer_id, limit, period=period, tz=tz, agent_id=agent_id, thresholds=thresholds
            )
        return BudgetResult.model_validate(status)

    async def set_rate_limit(
        self,
        units: Annotated[Count | None, Field(description="Units per window; null: no limit.")],
        per_seconds: Annotated[Count | None, Field(description="The window in seconds.")],
        customer_id: CustomerId = None,
        burst: Annotated[
            Count | None, Field(description="Largest burst in units (default: units).")
        ] = None,
        agent_id: AgentScope = None,
    ) -> BudgetResult:
        """Operator tool: limit the units preflights may reserve per window (GCRA)."""
        with tool_errors():
            status = await self._client.set_rate_limit(
                customer_id, units, per_seconds, burst=burst, agent_id=agent_id
            )
        return BudgetResult.model_validate(status)

    async def set_concurrency_limit(
        self,
        max_in_flight: Annotated[
            Count | None, Field(description="Runs (open reservations) at once; null: no limit.")
        ],
        customer_id: CustomerId = None,
        agent_id: AgentScope = None,
    ) -> BudgetResult:
        """Operator tool: limit the runs in flight (open reservations)."""
        with tool_errors():
            status = await self._client.set_concurrency_limit(
                customer_id, max_in_flight, agent_id=agent_id
            )
        return BudgetResult.model_validate(status)

    async def open_task(
        self,
        task_ref: Annotated[Id, Field(description="The task.")],
        ceiling: Annotated[Units | None, Field(description="Units; null: no ceiling.")],
        customer_id: CustomerId = None,
    ) -> TaskResult:
        """Operator tool: open a task with a ceiling on everything its runs use, or change
        its ceiling."""
        with tool_errors():
            status = await self._client.open_task(task_ref, ceiling, customer_id)
        return TaskResult.model_validate(status)
