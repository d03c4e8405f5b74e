"""The logic of every operation, without I/O.

Each operation is three steps: validate the arguments (``_models``), build the script's KEYS and
ARGV (``*_call``), and decode the script's reply into a result (``decode_*``). The sync and async
clients only add the round trip in between, so they cannot drift apart.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, NamedTuple, TypeVar, cast

from pydantic import SecretStr
from redis.exceptions import NoScriptError

from agentbill._exceptions import AgentBillError, InvalidRequestError
from agentbill._keys import CustomerKeys, KeySpace, digest, reservation_id, tag_of_reservation
from agentbill._models import (
    BudgetRequest,
    ClientSettings,
    CustomerRef,
    Preflight,
    PreflightRequest,
    RecordRequest,
    ReleaseRequest,
    TaskRequest,
    validate,
)
from agentbill._results import (
    BaseCheck,
    BudgetStatus,
    Reason,
    Settlement,
    SettleStatus,
    TaskStatus,
)
from agentbill._tenants import parse_api_key, tenant_namespace

DEFAULT_CUSTOMER = "default"
# A retry of a record() without a reservation id is recognised by an internal request id;
# retries finish within seconds, so it need not be remembered as long as a user's key.
REQUEST_ID_TTL_MS = 10 * 60 * 1000

Reply = Sequence[Any]
T = TypeVar("T")
C = TypeVar("C", bound=BaseCheck)


class Call(NamedTuple):
    """One script invocation: which script, its KEYS and its ARGV."""

    script: str
    keys: tuple[str, ...]
    args: tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Policy:
    """The client's settings in the units the scripts take (ms, plain ints)."""

    keys: KeySpace
    ceiling: int | None
    reservation_ttl_ms: int
    idempotency_ttl_ms: int
    retention_ms: int
    reap_limit: int

    @classmethod
    def from_settings(cls, s: ClientSettings) -> Policy:
        return cls(
            keys=KeySpace(s.namespace),
            ceiling=s.ceiling,
            reservation_ttl_ms=s.reservation_ttl * 1000,
            idempotency_ttl_ms=s.idempotency_ttl * 1000,
            retention_ms=s.outcome_retention * 1000,
            reap_limit=s.reap_limit,
        )


def new_token() -> str:
    """A random token for reservation and request ids (96 bits)."""
    return os.urandom(12).hex()


def fingerprint(*parts: object) -> str:
    """What makes two requests under one idempotency key "the same request"."""
    text = "\x1f".join("" if p is None else str(p) for p in parts)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _opt(value: int | None) -> str | int:
    return "" if value is None else value


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _remaining(limit: int | None, used: int) -> int | None:
    return None if limit is None else max(0, limit - used)


def _datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def customer_of(customer_id: T | None) -> T | str:
    """``customer_id``, or the customer named "default" when it is None."""
    return DEFAULT_CUSTOMER if customer_id is None else customer_id


# -- preflight ---------------------------------------------------------------------------------


def preflight_call(p: Policy, req: PreflightRequest, token: str) -> tuple[Call, str]:
    """KEYS/ARGV for preflight.lua, and the id of the reservation it would create."""
    ck = p.keys.customer(req.customer_id)
    rid = reservation_id(ck.tag, token)
    task_digest = digest(req.task_ref) if req.task_ref is not None else ""
    if req.idempotency_key is not None:
        idem_key = ck.idempotency("preflight", req.idempotency_key)
        fp = fingerprint(
            "preflight", req.agent_id, req.estimated_units, req.task_ref, req.task_ceiling, req.ttl
        )
    else:
        # Unused by the script, but every key a script may touch is declared (Redis Cluster).
        idem_key, fp = ck.idempotency("preflight", rid), ""
    ttl_ms = req.ttl * 1000 if req.ttl is not None else p.reservation_ttl_ms
    args: tuple[str | int, ...] = (
        rid,
        req.estimated_units,
        _opt(p.ceiling),
        ttl_ms,
        req.agent_id,
        req.task_ref or "",
        task_digest,
        _opt(req.task_ceiling),
        digest(req.agent_id, req.task_ref or ""),
        fp,
        p.idempotency_ttl_ms,
        p.reap_limit,
        p.retention_ms,
        req.customer_id,
    )
    return Call("preflight", (*ck.fixed, idem_key), args), rid


def decode_preflight(reply: Reply, req: PreflightRequest, p: Policy, make: Callable[..., C]) -> C:
    """preflight.lua's reply as a decision, built by ``make`` (a Check bound to its client)."""
    approved = int(reply[0]) == 1
    reason = cast(Reason, _text(reply[1])) if reply[1] is not None else None
    limit = _int_or_none(reply[4])
    spent, reserved = int(reply[5]), int(reply[6])
    task_ceiling = _int_or_none(reply[7])
    task_used, task_reserved = int(reply[8]), int(reply[9])
    if task_ceiling is None and req.task_ceiling is not None and not approved:
        task_ceiling = req.task_ceiling  # the ceiling this refused call would have opened
    rule_limit = {
        "ceiling_exceeded": p.ceiling,
        "task_ceiling_exceeded": task_ceiling,
    }.get(reason or "", limit)
    has_task = req.task_ref is not None
    return make(
        approved=approved,
        reason=reason,
        reservation_id=_text(reply[2]) if reply[2] is not None else None,
        expires_at=_datetime(int(reply[3])) if reply[3] is not None else None,
        remaining=_remaining(limit, spent + reserved),
        limit=rule_limit,
        agent_id=req.agent_id,
        customer_id=req.customer_id,
        estimated_units=req.estimated_units,
        task_ref=req.task_ref,
        task_ceiling=task_ceiling,
        task_used=task_used if has_task else None,
        task_remaining=_remaining(task_ceiling, task_used + task_reserved) if has_task else None,
        replayed=int(reply[11]) == 1,
    )


def offline_decision(p: Policy, req: PreflightRequest, rid: str, make: Callable[..., C]) -> C:
    """The decision a client makes alone while Redis is unreachable (outage policies
    ``fail_open`` and ``allowance``): only the per-request ceiling can be checked; anything
    within it is approved offline, as reservation ``rid`` that Redis has not seen."""
    refused = p.ceiling is not None and req.estimated_units > p.ceiling
    return make(
        approved=not refused,
        reason="ceiling_exceeded" if refused else None,
        reservation_id=None if refused else rid,
        expires_at=None,
        remaining=None,
        limit=p.ceiling if refused else None,
        agent_id=req.agent_id,
        customer_id=req.customer_id,
        estimated_units=req.estimated_units,
        task_ref=req.task_ref,
        task_ceiling=req.task_ceiling,
        offline=True,
    )


def queued_settlement(rid: str | None, status: SettleStatus = "queued") -> Settlement:
    """What record()/release() return when their call waits for Redis (or, for a release of
    an offline run, needed none): nothing is known of the budget yet."""
    return Settlement(
        status=status,
        reservation_id=rid,
        charged=0,
        released=0,
        late=False,
        replayed=False,
        spent=None,
        reserved=None,
        limit=None,
        remaining=None,
    )


# -- record / release --------------------------------------------------------------------------


def settle_keys(p: Policy, req: RecordRequest) -> tuple[CustomerKeys, str]:
    """The customer keys a record touches, and the customer id to store ('' if unknown).

    With a reservation id, its embedded tag decides; a customer_id that names another customer
    contradicts it and is refused before anything is written.
    """
    if req.reservation_id is None:
        customer = customer_of(req.customer_id)
        return p.keys.customer(customer), customer
    ck = reservation_keys(p, req.reservation_id)
    if req.customer_id is not None and p.keys.customer(req.customer_id).tag != ck.tag:
        raise InvalidRequestError(
            "customer_id", "contradicts reservation_id (it belongs to another customer)"
        )
    return ck, req.customer_id or ""


def reservation_keys(p: Policy, rid: str) -> CustomerKeys:
    tag = tag_of_reservation(rid)
    if tag is None:
        raise InvalidRequestError("reservation_id", "is not a reservation id issued by agentbill")
    return p.keys.by_tag(tag)


def record_call(p: Policy, req: RecordRequest, token: str) -> Call:
    """KEYS/ARGV for settle.lua, as record() calls it."""
    ck, customer = settle_keys(p, req)
    task_ref = req.task_ref or ""
    if req.idempotency_key is not None:
        idem_key = ck.idempotency("record", req.idempotency_key)
        fp = fingerprint(
            "record", req.reservation_id, req.agent_id, req.units, req.task_ref, req.success
        )
        ttl = p.idempotency_ttl_ms
    elif req.reservation_id is None:
        # Without an id a retried call could close a second reservation or charge twice:
        # the request id makes the client's own retries land once.
        idem_key, fp, ttl = ck.request(token), "request", REQUEST_ID_TTL_MS
    else:
        idem_key, fp, ttl = ck.request(token), "", REQUEST_ID_TTL_MS
    args: tuple[str | int, ...] = (
        req.reservation_id or "",
        req.units,
        1 if req.success else 0,
        req.agent_id,
        task_ref,
        digest(task_ref) if req.task_ref is not None else "",
        digest(req.agent_id, task_ref),
        fp,
        ttl,
        p.reap_limit,
        p.retention_ms,
        customer,
        token,
    )
    return Call("settle", (*ck.fixed, idem_key), args)


def release_call(p: Policy, req: ReleaseRequest, token: str) -> Call:
    """KEYS/ARGV for settle.lua, as release() calls it: by reservation id, or by the
    idempotency key of the preflight that reserved."""
    if req.reservation_id is not None:
        ck = reservation_keys(p, req.reservation_id)
        if req.customer_id is not None and p.keys.customer(req.customer_id).tag != ck.tag:
            raise InvalidRequestError(
                "customer_id", "contradicts reservation_id (it belongs to another customer)"
            )
        keys: tuple[str, ...] = (*ck.fixed, ck.request(token))
        by_key = 0
    elif req.idempotency_key is not None:
        ck = p.keys.customer(customer_of(req.customer_id))
        keys = (*ck.fixed, ck.request(token), ck.idempotency("preflight", req.idempotency_key))
        by_key = 1
    else:
        raise InvalidRequestError(
            "reservation_id", "give a reservation_id or the preflight's idempotency_key"
        )
    args: tuple[str | int, ...] = (
        req.reservation_id or "",
        0,
        0,
        "",
        "",
        "",
        "",
        "",
        REQUEST_ID_TTL_MS,
        p.reap_limit,
        p.retention_ms,
        "",
        token,
        by_key,
    )
    return Call("settle", keys, args)


def decode_settle(reply: Reply, metadata: dict[str, Any] | None = None) -> Settlement:
    limit = _int_or_none(reply[6])
    spent, reserved = int(reply[7]), int(reply[8])
    return Settlement(
        status=cast(SettleStatus, _text(reply[0])),
        reservation_id=_text(reply[1]) if reply[1] is not None else None,
        charged=int(reply[2]),
        released=int(reply[3]),
        late=int(reply[4]) == 1,
        replayed=int(reply[5]) == 1,
        spent=spent,
        reserved=reserved,
        limit=limit,
        remaining=_remaining(limit, spent + reserved),
        metadata=metadata,
    )


# -- admin -------------------------------------------------------------------------------------


def set_budget_call(p: Policy, customer_id: str, limit: int | None) -> Call:
    ck = p.keys.customer(customer_id)
    return Call("set_budget", ck.fixed, (_opt(limit), customer_id, p.reap_limit, p.retention_ms))


def get_budget_call(p: Policy, customer_id: str) -> Call:
    ck = p.keys.customer(customer_id)
    return Call("get_budget", ck.fixed, (p.reap_limit, p.retention_ms))


def decode_budget(reply: Reply, customer_id: str) -> BudgetStatus:
    limit = _int_or_none(reply[0])
    spent, reserved = int(reply[1]), int(reply[2])
    return BudgetStatus(
        customer_id=customer_id,
        limit=limit,
        spent=spent,
        reserved=reserved,
        remaining=_remaining(limit, spent + reserved),
        open_reservations=int(reply[3]),
    )


def open_task_call(p: Policy, customer_id: str, task_ref: str, ceiling: int | None) -> Call:
    ck = p.keys.customer(customer_id)
    args = (digest(task_ref), task_ref, _opt(ceiling), p.reap_limit, p.retention_ms)
    return Call("open_task", ck.fixed, args)


def get_task_call(p: Policy, customer_id: str, task_ref: str) -> Call:
    ck = p.keys.customer(customer_id)
    return Call("get_task", ck.fixed, (digest(task_ref), p.reap_limit, p.retention_ms))


def decode_task(reply: Reply, customer_id: str, task_ref: str) -> TaskStatus:
    ceiling = _int_or_none(reply[0])
    used, reserved = int(reply[1]), int(reply[2])
    return TaskStatus(
        task_ref=task_ref,
        customer_id=customer_id,
        ceiling=ceiling,
        used=used,
        reserved=reserved,
        remaining=_remaining(ceiling, used + reserved),
        exists=int(reply[3]) == 1,
    )


# -- plans: validated input -> (script call, reply decoder); what both clients execute ---------


class Plan(NamedTuple, Generic[T]):
    """One operation ready to run: the script call, and how to read its reply.

    A preflight also carries ``offline``, the decision to make alone if Redis cannot answer
    (used only by a client whose outage policy allows it); a settle carries the reservation
    id it closes, if it names one.
    """

    call: Call
    decode: Callable[[Reply], T]
    offline: Callable[[], T] | None = None
    reservation_id: str | None = None


def plan_preflight(
    p: Policy,
    agent_id: object,
    estimated_units: object,
    customer_id: object,
    task_ref: object,
    task_ceiling: object,
    idempotency_key: object,
    ttl: object,
    make: Callable[..., C],
) -> Plan[C]:
    """``make`` builds the decision: Check or AsyncCheck, already bound to the client."""
    req = validate(
        PreflightRequest,
        agent_id=agent_id,
        estimated_units=estimated_units,
        customer_id=customer_of(customer_id),
        task_ref=task_ref,
        task_ceiling=task_ceiling,
        idempotency_key=idempotency_key,
        ttl=ttl,
    )
    call, rid = preflight_call(p, req, new_token())
    return Plan(
        call,
        lambda reply: decode_preflight(reply, req, p, make),
        offline=lambda: offline_decision(p, req, rid, make),
    )


def plan_preflight_many(p: Policy, requests: object, make: Callable[..., C]) -> list[Plan[C]]:
    """One plan per item of ``requests`` (Preflight tuples); a bad item raises
    InvalidRequestError naming ``requests[i].<field>`` and nothing is planned."""
    if isinstance(requests, str | bytes) or not isinstance(requests, Iterable):
        raise InvalidRequestError("requests", "must be an iterable of Preflight")
    plans = []
    for i, item in enumerate(requests):
        if not isinstance(item, Preflight):
            raise InvalidRequestError(f"requests[{i}]", "must be a Preflight(...)")
        try:
            plans.append(plan_preflight(p, *item, make))
        except InvalidRequestError as exc:
            raise InvalidRequestError(f"requests[{i}].{exc.field}", exc.message) from None
    return plans


def decode_batch(
    plans: Sequence[Plan[T]], replies: Sequence[object]
) -> tuple[list[T | None], tuple[int, Exception] | None]:
    """Each reply of a pipelined batch decoded by its plan; the first item Redis answered with
    an error (its index and the error) is returned beside, its result None."""
    results: list[T | None] = []
    first_error: tuple[int, Exception] | None = None
    for i, (plan, reply) in enumerate(zip(plans, replies, strict=True)):
        if isinstance(reply, Exception):
            results.append(None)
            first_error = first_error or (i, reply)
        else:
            results.append(plan.decode(cast(Reply, reply)))
    return results, first_error


def take_answers(
    pending: list[int], answered: Sequence[object], replies: list[object]
) -> list[int]:
    """Store a pipeline's answers to the ``pending`` items in ``replies``; the items answered
    NOSCRIPT (to send again once their script is loaded)."""
    missing = []
    for i, reply in zip(pending, answered, strict=True):
        if isinstance(reply, NoScriptError):
            missing.append(i)
        else:
            replies[i] = reply
    return missing


def batch_error(index: int, error: AgentBillError) -> AgentBillError:
    """``error`` of item ``index`` of a batch, its field (if any) named ``requests[i].field``."""
    if isinstance(error, InvalidRequestError):
        return InvalidRequestError(f"requests[{index}].{error.field}", error.message)
    return error


def plan_record(
    p: Policy,
    agent_id: object,
    units: object,
    customer_id: object,
    reservation_id: object,
    task_ref: object,
    success: object,
    idempotency_key: object,
    metadata: object,
) -> Plan[Settlement]:
    req = validate(
        RecordRequest,
        agent_id=agent_id,
        units=units,
        customer_id=customer_id,
        reservation_id=reservation_id,
        task_ref=task_ref,
        success=success,
        idempotency_key=idempotency_key,
        metadata=metadata,
    )
    return Plan(
        record_call(p, req, new_token()),
        lambda r: decode_settle(r, req.metadata),
        reservation_id=req.reservation_id,
    )


def plan_release(
    p: Policy, reservation_id: object, idempotency_key: object, customer_id: object
) -> Plan[Settlement]:
    req = validate(
        ReleaseRequest,
        reservation_id=reservation_id,
        idempotency_key=idempotency_key,
        customer_id=customer_id,
    )
    if req.reservation_id is not None and req.idempotency_key is not None:
        raise InvalidRequestError("idempotency_key", "give a reservation_id or this, not both")
    return Plan(release_call(p, req, new_token()), decode_settle, reservation_id=req.reservation_id)


def plan_set_budget(p: Policy, customer_id: object, limit: object) -> Plan[BudgetStatus]:
    req = validate(BudgetRequest, customer_id=customer_of(customer_id), limit=limit)
    call = set_budget_call(p, req.customer_id, req.limit)
    return Plan(call, lambda reply: decode_budget(reply, req.customer_id))


def plan_get_budget(p: Policy, customer_id: object) -> Plan[BudgetStatus]:
    req = validate(CustomerRef, customer_id=customer_of(customer_id))
    call = get_budget_call(p, req.customer_id)
    return Plan(call, lambda reply: decode_budget(reply, req.customer_id))


def plan_open_task(
    p: Policy, task_ref: object, ceiling: object, customer_id: object
) -> Plan[TaskStatus]:
    req = validate(
        TaskRequest, task_ref=task_ref, customer_id=customer_of(customer_id), ceiling=ceiling
    )
    call = open_task_call(p, req.customer_id, req.task_ref, req.ceiling)
    return Plan(call, lambda reply: decode_task(reply, req.customer_id, req.task_ref))


def plan_get_task(p: Policy, task_ref: object, customer_id: object) -> Plan[TaskStatus]:
    req = validate(TaskRequest, task_ref=task_ref, customer_id=customer_of(customer_id))
    call = get_task_call(p, req.customer_id, req.task_ref)
    return Plan(call, lambda reply: decode_task(reply, req.customer_id, req.task_ref))


def validate_gate(
    p: Policy,
    agent_id: object,
    estimated_units: object,
    customer_id: object,
    task_ref: object,
    task_ceiling: object,
    ttl: object,
) -> None:
    """Check a gate's arguments when it decorates, so a bad one fails at import time."""
    plan_preflight(
        p, agent_id, estimated_units, customer_id, task_ref, task_ceiling, None, ttl, BaseCheck
    )


def settings_from(**values: object) -> ClientSettings:
    """Validate the client's keyword arguments; the api_key is wrapped so it never prints.

    An ``agb_...`` tenant key sets the namespace (InvalidRequestError if ``namespace`` names
    another); any other api_key is a label, kept secret and never used.
    """
    api_key = values.get("api_key")
    if isinstance(api_key, str):
        key = parse_api_key(api_key)
        if key is not None:
            values["namespace"] = tenant_namespace(key, values.get("namespace"))
        values["api_key"] = SecretStr(api_key)
    return validate(ClientSettings, **values)
