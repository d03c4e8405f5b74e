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
    ConcurrencyRequest,
    CustomerRef,
    EventsRequest,
    Preflight,
    PreflightRequest,
    RateLimitRequest,
    RecordRequest,
    ReleaseRequest,
    ScopeRef,
    TaskRequest,
    validate,
    validate_units,
)
from agentbill._own import OwnReservations
from agentbill._results import (
    BaseCheck,
    BudgetStatus,
    Event,
    EventType,
    Period,
    RateLimit,
    Reason,
    Scope,
    Settlement,
    SettleStatus,
    TaskStatus,
    ThresholdCrossing,
    Usage,
)
from agentbill._tenants import parse_api_key, tenant_namespace
from agentbill._zones import zone_table

DEFAULT_CUSTOMER = "default"
# A retry of a record() without a reservation id is recognised by an internal request id;
# retries finish within seconds, so it need not be remembered as long as a user's key.
REQUEST_ID_TTL_MS = 10 * 60 * 1000
SEP = "\x1f"  # joins packed script arguments and replies (ids hold no control characters)

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
    task_retention_ms: int
    idle_retention_ms: int
    reap_limit: int
    ledger_len: int

    @classmethod
    def from_settings(cls, s: ClientSettings) -> Policy:
        return cls(
            keys=KeySpace(s.namespace),
            ceiling=s.ceiling,
            reservation_ttl_ms=s.reservation_ttl * 1000,
            idempotency_ttl_ms=s.idempotency_ttl * 1000,
            retention_ms=s.outcome_retention * 1000,
            task_retention_ms=s.task_retention * 1000,
            idle_retention_ms=s.idle_retention * 1000,
            reap_limit=s.reap_limit,
            ledger_len=s.ledger_max_len,
        )

    @property
    def common(self) -> tuple[int, int, int, int, int]:
        """ARGV[1..5] of every script: reap limit, outcome retention (ms), ledger cap, task
        retention (ms), idle retention (ms)."""
        return (
            self.reap_limit,
            self.retention_ms,
            self.ledger_len,
            self.task_retention_ms,
            self.idle_retention_ms,
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


def preflight_call(
    p: Policy, req: PreflightRequest, token: str, adoptable: bool = True
) -> tuple[Call, str]:
    """KEYS/ARGV for preflight.lua, and the id of the reservation it would create.
    ``adoptable`` False: only a request naming the reservation may close it (a lease's slice),
    never a record without an id."""
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
    fields: tuple[str | int, ...] = (
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
        req.customer_id,
        digest(req.agent_id),
        1 if adoptable else 0,
    )
    return Call("preflight", (*ck.fixed, idem_key), (*p.common, pack(fields))), rid


def unpack(reply: Any) -> list[str | None]:
    """A packed script reply (one string, fields joined by \x1f; see packed() in
    lua/_common.lua) as its fields, '' as None."""
    text = reply.decode() if isinstance(reply, bytes) else str(reply)
    return [field or None for field in text.split(SEP)]


def pack(fields: Iterable[str | int]) -> str:
    """Script arguments as one (see ARGV[4] of preflight.lua and settle.lua)."""
    return SEP.join(str(field) for field in fields)


def _int(value: str | None) -> int:
    return int(value) if value else 0


def decode_preflight(reply: Any, req: PreflightRequest, p: Policy, make: Callable[..., C]) -> C:
    """preflight.lua's reply as a decision, built by ``make`` (a Check bound to its client)."""
    f = unpack(reply)
    approved = f[0] == "1"
    limit = _int_or_none(f[4])
    spent, reserved = _int(f[5]), _int(f[6])
    task_ceiling = _int_or_none(f[7])
    task_used, task_reserved = _int(f[8]), _int(f[9])
    has_task = req.task_ref is not None
    return make(
        approved=approved,
        reason=cast(Reason, f[1]),
        reservation_id=f[2],
        expires_at=_datetime(int(f[3])) if f[3] else None,
        remaining=_remaining(limit, spent + reserved),
        limit=limit if approved else _int_or_none(f[13]),
        agent_id=req.agent_id,
        customer_id=req.customer_id,
        estimated_units=req.estimated_units,
        task_ref=req.task_ref,
        task_ceiling=task_ceiling,
        task_used=task_used if has_task else None,
        task_remaining=_remaining(task_ceiling, task_used + task_reserved) if has_task else None,
        replayed=f[11] == "1",
        scope=cast(Scope | None, f[12]),
        used=_int_or_none(f[14]),
        reserved=_int_or_none(f[15]),
        retry_after=int(f[16]) / 1000 if f[16] else None,
        period_end=_datetime(int(f[18])) if f[18] else None,
        crossed=decode_crossed(f[19].split(",") if f[19] else (), req.customer_id, req.agent_id),
    )


def decode_crossed(
    items: Sequence[Any], customer_id: str, agent_id: str | None
) -> tuple[ThresholdCrossing, ...]:
    """ "<scope>:<percent>:<committed>" items as ThresholdCrossing results."""
    out = []
    for item in items:
        scope, percent, committed = _text(item).split(":")
        out.append(
            ThresholdCrossing(
                customer_id=customer_id,
                agent_id=agent_id if scope == "agent" else None,
                percent=int(percent),
                committed=int(committed),
            )
        )
    return tuple(out)


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


def record_call(p: Policy, req: RecordRequest, token: str, prefer: str | None = None) -> Call:
    """KEYS/ARGV for settle.lua, as record() calls it. ``prefer``: without a reservation id,
    the reservation to close first if it is still open (one this client made)."""
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
    fields: tuple[str | int, ...] = (
        req.reservation_id or "",
        req.units,
        1 if req.success else 0,
        req.agent_id,
        task_ref,
        digest(task_ref) if req.task_ref is not None else "",
        digest(req.agent_id, task_ref),
        fp,
        ttl,
        customer,
        token,
        0,
        digest(req.agent_id),
        prefer or "",
        0,
    )
    return Call("settle", (*ck.fixed, idem_key), (*p.common, pack(fields)))


def release_call(p: Policy, req: ReleaseRequest, token: str, rollback: bool = False) -> Call:
    """KEYS/ARGV for settle.lua, as release() calls it: by reservation id, or by the
    idempotency key of the preflight that reserved. ``rollback``: the release undoes an
    approval of a batch that failed (the threshold crossings it made are taken back)."""
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
    fields: tuple[str | int, ...] = (
        req.reservation_id or "",
        0,
        0,
        "",
        "",
        "",
        "",
        "",
        REQUEST_ID_TTL_MS,
        "",
        token,
        by_key,
        "",
        "",
        1 if rollback else 0,
    )
    return Call("settle", keys, (*p.common, pack(fields)))


def decode_settle(
    reply: Any, customer_id: str | None = None, metadata: dict[str, Any] | None = None
) -> Settlement:
    f = unpack(reply)
    limit = _int_or_none(f[6])
    spent, reserved = _int(f[7]), _int(f[8])
    crossed = f[10].split(",") if f[10] else ()
    charged_agent = f[11]  # whose budget an agent's crossed threshold is
    return Settlement(
        status=cast(SettleStatus, f[0]),
        reservation_id=f[1],
        charged=_int(f[2]),
        released=_int(f[3]),
        late=f[4] == "1",
        replayed=f[5] == "1",
        spent=spent,
        reserved=reserved,
        limit=limit,
        remaining=_remaining(limit, spent + reserved),
        metadata=metadata,
        crossed=decode_crossed(crossed, customer_id or "", charged_agent) if crossed else (),
    )


# -- admin -------------------------------------------------------------------------------------


def set_budget_call(p: Policy, req: BudgetRequest) -> Call:
    ck = p.keys.customer(req.customer_id)
    args = (
        *p.common,
        digest(req.agent_id) if req.agent_id is not None else "",
        _opt(req.limit),
        req.period or "",
        zone_table(req.tz) if req.period is not None else "",
        ",".join(str(t) for t in sorted(set(req.thresholds))),
        req.customer_id,
        req.agent_id or "",
    )
    return Call("set_budget", ck.fixed, args)


def set_limits_call(p: Policy, req: RateLimitRequest | ConcurrencyRequest) -> Call:
    ck = p.keys.customer(req.customer_id)
    if isinstance(req, RateLimitRequest):
        if req.units is None or req.per_seconds is None:
            limit: tuple[str | int, ...] = ("rate", "", "", "")
        else:
            burst = req.burst if req.burst is not None else req.units
            limit = ("rate", req.units, req.per_seconds * 1000, burst)
    else:
        limit = ("concurrency", _opt(req.max_in_flight), "", "")
    dig = digest(req.agent_id) if req.agent_id is not None else ""
    args = (*p.common, dig, *limit, req.customer_id, req.agent_id or "")
    return Call("set_limits", ck.fixed, args)


def get_budget_call(p: Policy, customer_id: str, agent_id: str | None) -> Call:
    ck = p.keys.customer(customer_id)
    return Call("get_budget", ck.fixed, (*p.common, digest(agent_id) if agent_id else ""))


def decode_scope(reply: Reply, customer_id: str, agent_id: str | None, now_ms: int) -> BudgetStatus:
    """A scope_reply (see lua/_common.lua) as a BudgetStatus."""
    limit = _int_or_none(reply[0])
    spent, reserved = int(reply[1]), int(reply[2])
    start = _int_or_none(reply[5])
    end = _int_or_none(reply[6])
    rate_units = _int_or_none(reply[7])
    thresholds = _text(reply[11])
    period = _text(reply[12]) or None
    return BudgetStatus(
        customer_id=customer_id,
        agent_id=agent_id,
        limit=limit,
        spent=spent,
        reserved=reserved,
        remaining=_remaining(limit, spent + reserved),
        open_reservations=int(reply[3]),
        period=cast(Period, period),
        period_start=_datetime(start) if start is not None else None,
        period_end=_datetime(end) if end is not None else None,
        resets_in=(end - now_ms) / 1000 if end is not None else None,
        thresholds=tuple(int(t) for t in thresholds.split(",") if t),
        rate_limit=RateLimit(
            units=rate_units, per_seconds=int(reply[8]) // 1000, burst=int(reply[9])
        )
        if rate_units is not None
        else None,
        max_in_flight=_int_or_none(reply[10]),
    )


def decode_budget(reply: Reply, customer_id: str, agent_id: str | None = None) -> BudgetStatus:
    """get_budget.lua / set_budget.lua / set_limits.lua: the agent's scope if one was asked."""
    now = int(reply[2])
    if agent_id is not None:
        return decode_scope(reply[1], customer_id, agent_id, now)
    return decode_scope(reply[0], customer_id, None, now)


def get_usage_call(p: Policy, customer_id: str) -> Call:
    return Call("get_usage", p.keys.customer(customer_id).fixed, p.common)


def decode_usage(reply: Reply, customer_id: str) -> Usage:
    now = int(reply[2])
    pairs = reply[1]
    agents = tuple(
        decode_scope(pairs[i + 1], customer_id, _text(pairs[i]), now)
        for i in range(0, len(pairs), 2)
    )
    return Usage(
        customer=decode_scope(reply[0], customer_id, None, now),
        agents=tuple(sorted(agents, key=lambda a: a.agent_id or "")),
    )


def events_call(p: Policy, customer_id: str, since: str | None, limit: int | None) -> Call:
    args = (*p.common, since or "-", limit if limit is not None else 2**31 - 1)
    return Call("events", p.keys.customer(customer_id).fixed, args)


def decode_events(reply: Reply, customer_id: str) -> list[Event]:
    out = []
    for raw_id, raw_fields in reply:
        entry_id = _text(raw_id)
        f = {_text(raw_fields[i]): _text(raw_fields[i + 1]) for i in range(0, len(raw_fields), 2)}
        out.append(
            Event(
                id=entry_id,
                type=cast(EventType, f["t"]),
                time=_datetime(int(entry_id.split("-")[0])),
                customer_id=customer_id,
                agent_id=f["a"] or None,
                task_ref=f["k"] or None,
                units=int(f["u"]),
                released=int(f["x"]),
                reservation_id=f["r"] or None,
                reason=f["why"] or None,
                scope=f["s"] or None,
                period=f["p"] or None,
            )
        )
    return out


def open_task_call(p: Policy, customer_id: str, task_ref: str, ceiling: int | None) -> Call:
    ck = p.keys.customer(customer_id)
    args = (*p.common, digest(task_ref), task_ref, _opt(ceiling))
    return Call("open_task", ck.fixed, args)


def get_task_call(p: Policy, customer_id: str, task_ref: str) -> Call:
    ck = p.keys.customer(customer_id)
    return Call("get_task", ck.fixed, (*p.common, digest(task_ref)))


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
    (used only by a client whose outage policy allows it), and the id of the reservation it
    would create (made by the client, so a preflight whose reply never came, cancelled or
    timed out, can still be released by id); a settle carries the reservation id it closes,
    if it names one.
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
    adoptable: bool = True,
) -> Plan[C]:
    """``make`` builds the decision: Check or AsyncCheck, already bound to the client.
    ``adoptable``: see :func:`preflight_call`."""
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
    call, rid = preflight_call(p, req, new_token(), adoptable)
    return Plan(
        call,
        lambda reply: decode_preflight(reply, req, p, make),
        offline=lambda: offline_decision(p, req, rid, make),
        reservation_id=rid,
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
    own: OwnReservations | None = None,
) -> Plan[Settlement]:
    """``own``: the client's own reservations; without a reservation id the record closes
    the oldest of its group still open first (and it is forgotten there)."""
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
    prefer = None
    if req.reservation_id is None and own is not None:
        prefer = own.take((customer_of(req.customer_id), req.agent_id, req.task_ref))
    return Plan(
        record_call(p, req, new_token(), prefer),
        lambda r: decode_settle(r, req.customer_id, req.metadata),
        reservation_id=req.reservation_id,
    )


def plan_release(
    p: Policy,
    reservation_id: object,
    idempotency_key: object,
    customer_id: object,
    rollback: bool = False,
) -> Plan[Settlement]:
    req = validate(
        ReleaseRequest,
        reservation_id=reservation_id,
        idempotency_key=idempotency_key,
        customer_id=customer_id,
    )
    if req.reservation_id is not None and req.idempotency_key is not None:
        raise InvalidRequestError("idempotency_key", "give a reservation_id or this, not both")
    return Plan(
        release_call(p, req, new_token(), rollback),
        lambda r: decode_settle(r, req.customer_id),
        reservation_id=req.reservation_id,
    )


def plan_set_budget(
    p: Policy,
    customer_id: object,
    limit: object,
    period: object,
    tz: object,
    agent_id: object,
    thresholds: object,
) -> Plan[BudgetStatus]:
    req = validate(
        BudgetRequest,
        customer_id=customer_of(customer_id),
        limit=limit,
        period=period,
        tz=tz,
        agent_id=agent_id,
        thresholds=tuple(thresholds) if isinstance(thresholds, list) else thresholds,
    )
    call = set_budget_call(p, req)
    return Plan(call, lambda reply: decode_budget(reply, req.customer_id, req.agent_id))


def plan_set_rate_limit(
    p: Policy,
    customer_id: object,
    units: object,
    per_seconds: object,
    burst: object,
    agent_id: object,
) -> Plan[BudgetStatus]:
    req = validate(
        RateLimitRequest,
        customer_id=customer_of(customer_id),
        units=units,
        per_seconds=per_seconds,
        burst=burst,
        agent_id=agent_id,
    )
    call = set_limits_call(p, req)
    return Plan(call, lambda reply: decode_budget(reply, req.customer_id, req.agent_id))


def plan_set_concurrency_limit(
    p: Policy, customer_id: object, max_in_flight: object, agent_id: object
) -> Plan[BudgetStatus]:
    req = validate(
        ConcurrencyRequest,
        customer_id=customer_of(customer_id),
        max_in_flight=max_in_flight,
        agent_id=agent_id,
    )
    call = set_limits_call(p, req)
    return Plan(call, lambda reply: decode_budget(reply, req.customer_id, req.agent_id))


def plan_get_budget(p: Policy, customer_id: object, agent_id: object) -> Plan[BudgetStatus]:
    req = validate(ScopeRef, customer_id=customer_of(customer_id), agent_id=agent_id)
    call = get_budget_call(p, req.customer_id, req.agent_id)
    return Plan(call, lambda reply: decode_budget(reply, req.customer_id, req.agent_id))


def plan_get_usage(p: Policy, customer_id: object) -> Plan[Usage]:
    req = validate(CustomerRef, customer_id=customer_of(customer_id))
    return Plan(get_usage_call(p, req.customer_id), lambda r: decode_usage(r, req.customer_id))


def plan_events(p: Policy, customer_id: object, since: object, limit: object) -> Plan[list[Event]]:
    req = validate(EventsRequest, customer_id=customer_of(customer_id), since=since, limit=limit)
    call = events_call(p, req.customer_id, req.since, req.limit)
    return Plan(call, lambda reply: decode_events(reply, req.customer_id))


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
    *,
    units: object = None,
    charge_estimate: object = False,
) -> None:
    """Check a gate's (or a run block's) arguments when it is made, so a bad one fails at
    once (at import time, for a decorator), not after a run."""
    plan_preflight(
        p, agent_id, estimated_units, customer_id, task_ref, task_ceiling, None, ttl, BaseCheck
    )
    if units is not None and not callable(units):
        validate_units("units", units)
    if not isinstance(charge_estimate, bool):
        raise InvalidRequestError("charge_estimate", "must be a bool")


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
