"""What the task-queue integrations share: a budget for a job function, resolved per call.

A :class:`JobBudget` describes the run a job makes: its agent, estimate, customer, task. Each
value is a constant, or a callable of the :class:`JobCall` (the job's id, attempt, arguments
bound to the function's parameters, and headers), such as :func:`param` and :func:`header`.

:class:`JobRun` is one run of one job. Every run of a job (a redelivery, a retry, the same job
id enqueued again) preflights with one idempotency key made from the job id alone, and the
server's rules for a preflight key make each of them right:

- the key's reservation is open (another delivery of the job is running, or died unsettled):
  the run shares it and reserves nothing more; the first to settle decides, and a record after
  a release is still charged (late), so a success is never lost;
- it was recorded: the approval is replayed and the run's record charges nothing more, so a
  job is charged once however often it runs;
- it was released or expired (the run before failed, or was killed): the run reserves afresh;
- the key is unknown, or forgotten after the client's ``idempotency_ttl``: the run reserves.

A run that fails releases the reservation it holds, by its id: by then the key may name a later
run's reservation (a retry that reserved afresh). Only a process that holds no reservation id
(a worker's main process, for a child that died) releases by the key.

A run's reservation is its own: it is made unadoptable and kept out of the client's book of its
own, so a record without an id elsewhere in the process never closes it. Its record and release
are the client's ``_settle_surely``: a body that succeeded while Redis cannot take its record
now (busy, unreachable or silent) does not fail; the record is queued, whatever the outage
policy, logged as a warning and delivered, exactly once, when Redis can take it.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeAlias, TypeVar

from agentbill._client import AgentBillClient
from agentbill._exceptions import AgentBillError, InvalidRequestError
from agentbill._gate import UnitsUsed
from agentbill._install import pip_install
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
            f"agentbill.contrib.{extra} needs {module}: {pip_install(extra)}"
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
    units: UnitsUsed[Any] = None
    """What to record after the job returns: an int, a callable of its result, or the
    estimate (None)."""
    ttl: int | None = None
    """Seconds an unsettled reservation holds its units (a worker killed mid-job)."""

    def start(self, call: JobCall, idempotency_key: str) -> JobRun:
        """Resolve this budget against one call, whose runs share ``idempotency_key``
        (InvalidRequestError if a value is bad)."""
        return JobRun(
            self,
            call,
            idempotency_key=idempotency_key,
            agent_id=_value(self.agent_id, call),
            estimated_units=_value(self.estimated_units, call),
            customer_id=_value(self.customer_id, call),
            task_ref=_value(self.task_ref, call),
        )


class JobRun:
    """One run of one budgeted job: preflight, then record or release, charged once however
    often the job runs (see the module's docstring)."""

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
        """Reserve the estimate (or share or replay the job's reservation, by the key), or raise
        the typed RunBlockedError. The reservation is unadoptable and untracked (see the module
        docstring)."""
        client = self.budget.client
        plan = client._plan_preflight(
            self.agent_id,
            self.estimated_units,
            self.customer_id,
            self.task_ref,
            self.budget.task_ceiling,
            self.idempotency_key,
            self.budget.ttl,
            adoptable=False,
        )
        self.check = client._preflight(plan, track=False).raise_for_refusal()
        return self.check

    def units_of(self, result: object) -> int:
        units = self.budget.units
        if units is None:
            return self.estimated_units
        used = units(result) if callable(units) else units
        return validate_units("units", used)

    def record(self, result: object) -> Settlement:
        """Charge what the job used (the estimate if ``units`` cannot be computed) on the
        reservation this run holds: once, whichever run of the job closes it first. If Redis
        cannot take it now, it is queued (status ``queued``) rather than raised."""
        try:
            used = self.units_of(result)
        except Exception:
            self._settle(self.estimated_units)
            raise
        return self._settle(used)

    def release(self) -> Settlement | None:
        """Give back the reservation this run holds, by its id: never one a later run of the
        job reserved under the same key. None if this run holds none (its preflight did not
        return). Queued if Redis cannot take it now. Never raises an AgentBillError: if Redis
        refuses it, the units return when the reservation expires."""
        if self.check is None or self.check.reservation_id is None:
            return None
        return self._release(functools.partial(self._settle, None))

    def _settle(self, units: int | None) -> Settlement:
        check = self.check
        assert check is not None
        assert check.reservation_id is not None
        return self.budget.client._settle_surely(
            check.reservation_id, units, check.agent_id, check.customer_id, check.task_ref
        )

    def release_by_key(self) -> Settlement | None:
        """Give back the reservation the job's key names now, from a process that holds no
        reservation id (a worker's main process, for a child that died): a ``noop`` if it holds
        nothing. Never raises an AgentBillError."""
        return self._release(
            functools.partial(
                self.budget.client.release,
                idempotency_key=self.idempotency_key,
                customer_id=self.customer_id,
            )
        )

    def _release(self, release: Callable[[], Settlement]) -> Settlement | None:
        try:
            return release()
        except AgentBillError as exc:
            logger.warning(
                "agentbill: could not release job %s (%s); its units return when the "
                "reservation expires",
                self.call.job_id,
                exc,
            )
            return None
