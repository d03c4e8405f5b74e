"""What the task-queue integrations share: a budget for a job function, resolved per call.

A :class:`JobBudget` describes the run a job makes: its agent, estimate, customer, task. Each
value is a constant, or a callable of the :class:`JobCall` (the job's id, attempt, arguments
bound to the function's parameters, and headers), such as :func:`param` and :func:`header`.

:class:`JobRun` is one attempt of one job: it preflights with an idempotency key made from the
job id and the attempt number, so a redelivered attempt replays its first approval (reserving
nothing more) and its record charges once, while a retry (a new attempt) reserves afresh.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeAlias, TypeVar

from agentbill._client import AgentBillClient
from agentbill._exceptions import AgentBillError, InvalidRequestError
from agentbill._gate import Units
from agentbill._models import validate_units
from agentbill._results import Check, Settlement

logger = logging.getLogger("agentbill")

T = TypeVar("T")


def require(module: str, extra: str) -> None:
    """Raise an ImportError naming the extra to install when ``module`` is missing."""
    try:
        __import__(module)
    except ImportError as exc:
        raise ImportError(
            f"agentbill.contrib.{extra} needs {module}: pip install 'agentbill[{extra}]'"
        ) from exc


@dataclass(frozen=True, slots=True)
class JobCall:
    """One attempt of one job, as the values of a :class:`JobBudget` see it."""

    job_id: str
    attempt: int
    """0 for the first run; a retry is the next attempt (a redelivery is the same attempt)."""
    arguments: Mapping[str, Any]
    """The job function's arguments by parameter name (positional ones too)."""
    headers: Mapping[str, Any]
    """Celery message headers, or RQ ``job.meta``."""


From: TypeAlias = T | Callable[[JobCall], T]
"""A constant, or a callable computing the value from the job's call."""


@dataclass(frozen=True, slots=True)
class param(Generic[T]):  # lowercase: used like a function
    """The value of the job function's parameter ``name``, passed positionally or by keyword."""

    name: str

    def __call__(self, call: JobCall) -> T:
        try:
            value: T = call.arguments[self.name]
        except KeyError:
            raise InvalidRequestError(
                self.name, f"the job {call.job_id} was called without argument {self.name!r}"
            ) from None
        return value


@dataclass(frozen=True, slots=True)
class header(Generic[T]):  # lowercase: used like a function
    """The value of the message header (Celery) or ``job.meta`` key (RQ) ``name``."""

    name: str
    default: T | None = None

    def __call__(self, call: JobCall) -> T | None:
        value: T | None = call.headers.get(self.name, self.default)
        return value


def _value(value: From[T], call: JobCall) -> T:
    return value(call) if callable(value) else value


def bind_arguments(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """The call's arguments by parameter name; the raw kwargs if they do not fit ``fn``."""
    try:
        bound = inspect.signature(fn).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return dict(kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


@dataclass(frozen=True, slots=True, kw_only=True)
class JobBudget:
    """The run a budgeted job makes; see the Celery and RQ integrations."""

    client: AgentBillClient
    agent_id: From[str]
    estimated_units: From[int]
    customer_id: From[str | None] = None
    task_ref: From[str | None] = None
    task_ceiling: int | None = None
    units: Units[Any] = None
    """What to record after the job returns: an int, a callable of its result, or the
    estimate (None)."""
    ttl: int | None = None
    """Seconds an unsettled reservation holds its units (a worker killed mid-job)."""

    def start(self, call: JobCall, namespace: str) -> JobRun:
        """Resolve this budget against one call (InvalidRequestError if a value is bad)."""
        return JobRun(
            self,
            call,
            idempotency_key=f"{namespace}:{call.job_id}:{call.attempt}",
            agent_id=_value(self.agent_id, call),
            estimated_units=_value(self.estimated_units, call),
            customer_id=_value(self.customer_id, call),
            task_ref=_value(self.task_ref, call),
        )


class JobRun:
    """One attempt of one budgeted job: preflight, then record or release, each at most once
    in effect however often the attempt is delivered."""

    def __init__(
        self,
        budget: JobBudget,
        call: JobCall,
        *,
        idempotency_key: str,
        agent_id: str,
        estimated_units: int,
        customer_id: str | None,
        task_ref: str | None,
    ) -> None:
        self.budget = budget
        self.call = call
        self.idempotency_key = idempotency_key
        self.agent_id = agent_id
        self.estimated_units = estimated_units
        self.customer_id = customer_id
        self.task_ref = task_ref
        self.check: Check | None = None

    def preflight(self) -> Check:
        """Reserve the estimate, or raise the typed RunBlockedError; a redelivery of this
        attempt gets its first approval back."""
        check = self.budget.client.preflight(
            self.agent_id,
            self.estimated_units,
            self.customer_id,
            task_ref=self.task_ref,
            task_ceiling=self.budget.task_ceiling,
            idempotency_key=self.idempotency_key,
            ttl=self.budget.ttl,
        )
        self.check = check.raise_for_refusal()
        return self.check

    def units_of(self, result: object) -> int:
        units = self.budget.units
        if units is None:
            return self.estimated_units
        used = units(result) if callable(units) else units
        return validate_units("units", used)

    def record(self, result: object) -> Settlement:
        """Charge what the job used (the estimate if ``units`` cannot be computed). A
        redelivered attempt closes the same reservation, which charges once."""
        assert self.check is not None
        try:
            used = self.units_of(result)
        except Exception:
            self.check.record(self.estimated_units)
            raise
        return self.check.record(used)

    def release(self) -> Settlement | None:
        """Give the reservation of this attempt back, found by its idempotency key (so it works
        from another process, and is a no-op if nothing was reserved). Never raises an
        AgentBillError: on failure, the units return when the reservation expires."""
        try:
            return self.budget.client.release(
                idempotency_key=self.idempotency_key, customer_id=self.customer_id
            )
        except AgentBillError as exc:
            logger.warning(
                "agentbill: could not release job %s attempt %s (%s); its units return when "
                "the reservation expires",
                self.call.job_id,
                self.call.attempt,
                exc,
            )
            return None
