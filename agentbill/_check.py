"""A preflight's decision as plain data: the ground floor under the errors and the results.

:class:`BaseCheck` is what a refusal error carries, so the error module (``_exceptions``) must
be able to build one, from the JSON-safe fields a pickled or Celery-stored error keeps
(:func:`check_fields`, :func:`check_from_fields`). This module therefore imports nothing of
agentbill: the errors sit one floor up, and :data:`REFUSALS`, which ``raise_for_refusal`` raises
from, is filled in by them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Self

Reason = Literal[
    "ceiling_exceeded",
    "task_ceiling_exceeded",
    "budget_exhausted",
    "rate_limited",
    "concurrency_limited",
]
Scope = Literal["request", "task", "customer", "agent"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ThresholdCrossing:
    """A budget's soft threshold crossed (once per period): committed units (spent + reserved)
    reached ``percent`` of the limit. Passed to the client's ``on_threshold`` callback."""

    customer_id: str
    agent_id: str | None
    """None for the customer's own budget; else the agent whose budget it is."""
    percent: int
    committed: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BaseCheck:
    """The decision of one preflight: the fields both Check and AsyncCheck carry.

    A refusal is returned, not raised: test ``approved``, or call :meth:`raise_for_refusal`.
    When approved, the estimate is held in a reservation until it is recorded, released, or
    ``expires_at`` passes.
    """

    approved: bool
    reason: Reason | None
    """None when approved; else which rule refused."""
    reservation_id: str | None
    expires_at: datetime | None
    """When an unsettled reservation gives its units back (UTC, Redis clock)."""
    remaining: int | None
    """The customer's units left after this reservation; None when the customer is unlimited."""
    limit: int | None
    """The limit of the rule that refused; when approved, the customer's budget limit."""
    agent_id: str
    customer_id: str
    estimated_units: int
    task_ref: str | None = None
    task_ceiling: int | None = None
    task_used: int | None = None
    task_remaining: int | None = None
    replayed: bool = False
    """True when this is the remembered answer to an earlier identical request."""
    offline: bool = False
    """True when Redis was unreachable and the client's outage policy approved the run alone
    (no budget was checked; ``remaining``, ``limit`` and ``expires_at`` are None)."""
    scope: Scope | None = None
    """Which scope's rule refused: request (the ceiling), task, customer or agent."""
    used: int | None = None
    """On a refusal: what the refusing rule counts as used (spent units; runs in flight for
    concurrency)."""
    reserved: int | None = None
    """On a refusal: the units the refusing rule's scope holds in open reservations."""
    retry_after: float | None = None
    """On a rate_limited refusal: seconds until the same ask would pass (None: it never will,
    the ask is above the burst)."""
    period_end: datetime | None = None
    """When the customer's current budget period ends (None for a lifetime budget)."""
    crossed: tuple[ThresholdCrossing, ...] = ()
    """Soft thresholds this call crossed."""

    def __bool__(self) -> bool:
        return self.approved

    def raise_for_refusal(self) -> Self:
        """Return self when approved; else raise the RunBlockedError subclass for ``reason``."""
        if self.approved:
            return self
        raise REFUSALS.get(self.reason or "", REFUSALS[""])(self)


REFUSALS: dict[str, Callable[[BaseCheck], Exception]] = {}
"""The error :meth:`BaseCheck.raise_for_refusal` raises for each reason (``""``: a reason it does
not know). Filled in by ``_exceptions``, whose errors carry a BaseCheck: this module cannot
import them without an import circle."""

_TIMES = ("expires_at", "period_end")
_FIELDS = tuple(f.name for f in dataclasses.fields(BaseCheck))


def check_fields(check: BaseCheck) -> dict[str, Any]:
    """A check's fields, JSON-safe (times as ISO strings, crossings as dicts): BaseCheck's own,
    never a subclass's (a Check's client, a LeaseCheck's run)."""
    fields = {name: getattr(check, name) for name in _FIELDS}
    for name in _TIMES:
        if fields.get(name) is not None:
            fields[name] = fields[name].isoformat()
    fields["crossed"] = [dataclasses.asdict(c) for c in check.crossed]
    return fields


def check_from_fields(fields: Mapping[str, Any]) -> BaseCheck:
    """The BaseCheck :func:`check_fields` described."""
    values = dict(fields)
    for name in _TIMES:
        if isinstance(values.get(name), str):
            values[name] = datetime.fromisoformat(values[name])
    values["crossed"] = tuple(ThresholdCrossing(**c) for c in values.get("crossed", ()))
    return BaseCheck(**values)
