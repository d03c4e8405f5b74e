"""The logic of every operation, without I/O.

Each operation is three steps: validate the arguments (``_models``), build the script's KEYS and
ARGV (``*_call``), and decode the script's reply into a result (``decode_*``). The sync and async
clients only add the round trip in between, so they cannot drift apart.

Keys, arguments and reply fields are named here, never numbered: ``_contract`` puts them in the
order lua/contract.json gives, the one file both clients (Python and TypeScript) read it from.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Awaitable, Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, NamedTuple, TypeVar, cast

from pydantic import SecretStr

from agentbill import _contract
from agentbill._check import BaseCheck, Reason, Scope, ThresholdCrossing
from agentbill._contract import STRUCTS, common_args
from agentbill._exceptions import AgentBillError, InvalidRequestError
from agentbill._keys import CustomerKeys, KeySpace, digest, reservation_id, tag_of_reservation
from agentbill._models import (
    MAX_UNITS,
    BudgetRequest,
    ClientSettings,
    ConcurrencyRequest,
    EventsRequest,
    Preflight,
    PreflightRequest,
    RateLimitRequest,
    RecordRequest,
    ReleaseRequest,
    ScopeRef,
    TaskRequest,
    UsageRequest,
    validate,
    validate_units,
)
from agentbill._own import OwnReservations
from agentbill._results import (
    LEARN_AFTER,
    BudgetStatus,
    Estimates,
    Event,
    EventType,
    Period,
    RateLimit,
    Settlement,
    SettleStatus,
    TaskStatus,
    Usage,
    open_reservation,
)
from agentbill._scripts import function_missing
from agentbill._tenants import parse_api_key, tenant_namespace
from agentbill._zones import zone_table

DEFAULT_CUSTOMER = "default"
# A retry of a record() without a reservation id is recognised by an internal request id;
# retries finish within seconds, so it need not be remembered as long as a user's key.
REQUEST_ID_TTL_MS = 10 * 60 * 1000

PREFLIGHT = _contract.SCRIPTS["preflight"]
SETTLE = _contract.SCRIPTS["settle"]
SET_BUDGET = _contract.SCRIPTS["set_budget"]
SET_LIMITS = _contract.SCRIPTS["set_limits"]
GET_BUDGET = _contract.SCRIPTS["get_budget"]
GET_USAGE = _contract.SCRIPTS["get_usage"]
EVENTS = _contract.SCRIPTS["events"]
OPEN_TASK = _contract.SCRIPTS["open_task"]
GET_TASK = _contract.SCRIPTS["get_task"]
EXTEND = _contract.SCRIPTS["extend"]
ESTIMATES = _contract.SCRIPTS["estimates"]
SCOPE = STRUCTS["scope"]
HISTOGRAM_BIN = STRUCTS["histogram_bin"]
LEDGER_ENTRY = STRUCTS["ledger_entry"]
CROSSING = STRUCTS["threshold_crossing"]

Reply = Sequence[Any]
T = TypeVar("T")
C = TypeVar("C", bound=BaseCheck)


class Call(NamedTuple):
    """One script invocation: which script, its KEYS and its ARGV."""

    script: str
    keys: tuple[str, ...]
    args: tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class ScriptSettings:
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
    common: tuple[str, ...] = field(init=False)
    """The first ARGV of every script (lua/_common.lua), made once: the settings above."""

    def __post_init__(self) -> None:
        common = common_args(
            reap_limit=self.reap_limit,
            retention_ms=self.retention_ms,
            ledger_len=self.ledger_len,
            task_retention_ms=self.task_retention_ms,
            idle_retention_ms=self.idle_retention_ms,
        )
        object.__setattr__(self, "common", common)

    @classmethod
    def from_settings(cls, s: ClientSettings) -> ScriptSettings:
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


def new_token() -> str:
    """A random token for reservation and request ids (96 bits)."""
    return os.urandom(12).hex()


def fingerprint(*parts: object) -> str:
    """What makes two requests under one idempotency key "the same request"."""
    text = "\x1f".join("" if p is None else str(p) for p in parts)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


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
    p: ScriptSettings, req: PreflightRequest, token: str, adoptable: bool = True
) -> tuple[Call, str]:
    """KEYS/ARGV for preflight.lua, and the id of the reservation it would create.
    ``adoptable`` False: only a request naming the reservation may close it (a lease's slice),
    never a record without an id."""
    ck = p.keys.customer(req.customer_id)
    rid = reservation_id(ck.tag, token)
    task_digest = digest(req.task_ref) if req.task_ref is not None else ""
    idem_key, fp = preflight_idempotency(p, req, rid)
    args = PREFLIGHT.args(
        p.common,
        reservation_id=rid,
        estimated_units=req.estimated_units,
        ceiling=p.ceiling,
        ttl_ms=req.ttl * 1000 if req.ttl is not None else p.reservation_ttl_ms,
        agent_id=req.agent_id,
        task_ref=req.task_ref,
        task_digest=task_digest,
        task_ceiling=req.task_ceiling,
        group_digest=digest(req.agent_id, req.task_ref or ""),
        fingerprint=fp,
        idempotency_ttl_ms=p.idempotency_ttl_ms,
        customer_id=req.customer_id,
        agent_digest=digest(req.agent_id),
        adoptable=adoptable,
    )
    return Call("preflight", PREFLIGHT.keys(ck, idem=idem_key), args), rid


def preflight_idempotency(p: ScriptSettings, req: PreflightRequest, rid: str) -> tuple[str, str]:
    """The key of a preflight's idempotency record, and what makes two requests under it "the
    same request" ('' without an idempotency key: the key is then named after the reservation,
    unused by the script but declared, as every key a script may touch is, for Redis Cluster)."""
    ck = p.keys.customer(req.customer_id)
    if req.idempotency_key is None:
        return ck.idempotency("preflight", rid), ""
    fp = fingerprint(
        "preflight", req.agent_id, req.estimated_units, req.task_ref, req.task_ceiling, req.ttl
    )
    return ck.idempotency("preflight", req.idempotency_key), fp


def _int(value: str | None) -> int:
    return int(value) if value else 0


def decode_preflight(
    reply: Any, req: PreflightRequest, p: ScriptSettings, make: Callable[..., C]
) -> C:
    """preflight.lua's reply as a decision, built by ``make`` (a Check bound to its client)."""
    f = PREFLIGHT.unpack(reply)
    approved = f.approved == "1"
    limit = _int_or_none(f.limit)
    spent, reserved = _int(f.spent), _int(f.reserved)
    task_ceiling = _int_or_none(f.task_ceiling)
    task_used, task_reserved = _int(f.task_used), _int(f.task_reserved)
    has_task = req.task_ref is not None
    expires, retry, period_end = f.expires_ms, f.retry_after_ms, f.period_end_ms
    return make(
        approved=approved,
        reason=cast(Reason, f.reason),
        reservation_id=f.reservation_id,
        expires_at=_datetime(int(expires)) if expires else None,
        remaining=_remaining(limit, spent + reserved),
        limit=limit if approved else _int_or_none(f.rule_limit),
        agent_id=req.agent_id,
        customer_id=req.customer_id,
        estimated_units=req.estimated_units,
        task_ref=req.task_ref,
        task_ceiling=task_ceiling,
        task_used=task_used if has_task else None,
        task_remaining=_remaining(task_ceiling, task_used + task_reserved) if has_task else None,
        replayed=f.replayed == "1",
        scope=cast(Scope | None, f.scope),
        used=_int_or_none(f.rule_used),
        reserved=_int_or_none(f.rule_reserved),
        retry_after=int(retry) / 1000 if retry else None,
        period_end=_datetime(int(period_end)) if period_end else None,
        crossed=decode_crossed(f.crossed, req.customer_id, req.agent_id),
    )


def decode_crossed(
    items: str | None, customer_id: str, agent_id: str | None
) -> tuple[ThresholdCrossing, ...]:
    """A reply's list of crossed thresholds (``threshold_crossing`` items of lua/contract.json)
    as ThresholdCrossing results; ``agent_id`` is the agent of an agent's crossing."""
    if not items:
        return ()
    out = []
    for item in items.split(_contract.LIST_SEP):
        crossing = CROSSING.split(item)
        out.append(
            ThresholdCrossing(
                customer_id=customer_id,
                agent_id=agent_id if crossing.scope == "agent" else None,
                percent=int(crossing.percent),
                committed=int(crossing.committed),
            )
        )
    return tuple(out)


def offline_decision(
    p: ScriptSettings, req: PreflightRequest, rid: str, make: Callable[..., C]
) -> C:
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


def settle_keys(p: ScriptSettings, req: RecordRequest) -> tuple[CustomerKeys, str]:
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


def reservation_keys(p: ScriptSettings, rid: str) -> CustomerKeys:
    tag = tag_of_reservation(rid)
    if tag is None:
        raise InvalidRequestError("reservation_id", "is not a reservation id issued by agentbill")
    return p.keys.by_tag(tag)


def record_call(
    p: ScriptSettings,
    req: RecordRequest,
    token: str,
    prefer: str | None = None,
    model: str | None = None,
    learn: bool = True,
    offline_key: tuple[str, str] | None = None,
) -> Call:
    """KEYS/ARGV for settle.lua, as record() calls it. ``prefer``: without a reservation id,
    the reservation to close first if it is still open (one this client made). A record that
    closes a reservation adds its sample to the agent's estimate statistics, and with
    ``model`` (the LLM wrapper's) to those of the agent's calls to that model; ``learn``
    False: to none (a lease's slice, which is many runs). ``offline_key``: the idempotency
    (record key, fingerprint) of the preflight that approved the named reservation (or
    ``prefer``) offline; the record writes it naming the reservation if Redis never saw it,
    so that the key replays the recorded run."""
    ck, customer = settle_keys(p, req)
    task_ref = req.task_ref or ""
    offline_record, offline_fp = offline_key or (None, None)
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
    args = SETTLE.args(
        p.common,
        reservation_id=req.reservation_id,
        units=req.units,
        charge=req.success,
        agent_id=req.agent_id,
        task_ref=req.task_ref,
        task_digest=digest(task_ref) if req.task_ref is not None else None,
        group_digest=digest(req.agent_id, task_ref),
        fingerprint=fp,
        idempotency_ttl_ms=ttl,
        customer_id=customer,
        request_id=token,
        by_idempotency_key=False,
        agent_digest=digest(req.agent_id),
        prefer=prefer,
        rollback=False,
        preflight_fingerprint=offline_fp,
        preflight_ttl_ms=p.idempotency_ttl_ms if offline_key else None,
    )
    keys = SETTLE.keys(
        ck,
        idem=idem_key,
        # else unused (but sent, as a later key is)
        preflight_idem=offline_record or idem_key,
        stats=ck.stats(req.agent_id) if learn else None,
        model_stats=ck.stats(req.agent_id, model) if learn and model is not None else None,
    )
    return Call("settle", keys, args)


def release_call(
    p: ScriptSettings, req: ReleaseRequest, token: str, rollback: bool = False
) -> Call:
    """KEYS/ARGV for settle.lua, as release() calls it: by reservation id, or by the
    idempotency key of the preflight that reserved. ``rollback``: the release undoes an
    approval of a batch that failed (the threshold crossings it made are taken back)."""
    if req.reservation_id is not None:
        ck = reservation_keys(p, req.reservation_id)
        if req.customer_id is not None and p.keys.customer(req.customer_id).tag != ck.tag:
            raise InvalidRequestError(
                "customer_id", "contradicts reservation_id (it belongs to another customer)"
            )
        keys = SETTLE.keys(ck, idem=ck.request(token))
        by_key = False
    elif req.idempotency_key is not None:
        ck = p.keys.customer(customer_of(req.customer_id))
        preflight_idem = ck.idempotency("preflight", req.idempotency_key)
        keys = SETTLE.keys(ck, idem=ck.request(token), preflight_idem=preflight_idem)
        by_key = True
    else:
        raise InvalidRequestError(
            "reservation_id", "give a reservation_id or the preflight's idempotency_key"
        )
    args = SETTLE.args(
        p.common,
        reservation_id=req.reservation_id,
        units=0,
        charge=False,
        agent_id=None,
        task_ref=None,
        task_digest=None,
        group_digest=None,
        fingerprint=None,
        idempotency_ttl_ms=REQUEST_ID_TTL_MS,
        customer_id=None,
        request_id=token,
        by_idempotency_key=by_key,
        agent_digest=None,
        prefer=None,
        rollback=rollback,
        preflight_fingerprint=None,
        preflight_ttl_ms=None,
    )
    return Call("settle", keys, args)


def decode_settle(
    reply: Any, customer_id: str | None = None, metadata: dict[str, Any] | None = None
) -> Settlement:
    f = SETTLE.unpack(reply)
    limit = _int_or_none(f.limit)
    spent, reserved = _int(f.spent), _int(f.reserved)
    return Settlement(
        status=cast(SettleStatus, f.status),
        reservation_id=f.reservation_id,
        charged=_int(f.charged),
        released=_int(f.released),
        late=f.late == "1",
        replayed=f.replayed == "1",
        spent=spent,
        reserved=reserved,
        limit=limit,
        remaining=_remaining(limit, spent + reserved),
        metadata=metadata,
        # f.agent_id: the agent whose budget an agent's crossed threshold is
        crossed=decode_crossed(f.crossed, customer_id or "", f.agent_id),
    )


# -- admin -------------------------------------------------------------------------------------


def _agent_digest(agent_id: str | None) -> str | None:
    return digest(agent_id) if agent_id is not None else None


def set_budget_call(p: ScriptSettings, req: BudgetRequest) -> Call:
    ck = p.keys.customer(req.customer_id)
    args = SET_BUDGET.args(
        p.common,
        agent_digest=_agent_digest(req.agent_id),
        limit=req.limit,
        period=req.period,
        zone_table=zone_table(req.tz) if req.period is not None else None,
        thresholds=sorted(set(req.thresholds)),
        customer_id=req.customer_id,
        agent_id=req.agent_id,
    )
    return Call("set_budget", SET_BUDGET.keys(ck), args)


def set_limits_call(p: ScriptSettings, req: RateLimitRequest | ConcurrencyRequest) -> Call:
    ck = p.keys.customer(req.customer_id)
    n = per_ms = burst = None
    if isinstance(req, RateLimitRequest):
        kind = "rate"
        if req.units is not None and req.per_seconds is not None:
            n, per_ms = req.units, req.per_seconds * 1000
            burst = req.burst if req.burst is not None else req.units
    else:
        kind, n = "concurrency", req.max_in_flight
    args = SET_LIMITS.args(
        p.common,
        agent_digest=_agent_digest(req.agent_id),
        kind=kind,
        n=n,
        per_ms=per_ms,
        burst=burst,
        customer_id=req.customer_id,
        agent_id=req.agent_id,
    )
    return Call("set_limits", SET_LIMITS.keys(ck), args)


def get_budget_call(p: ScriptSettings, customer_id: str, agent_id: str | None) -> Call:
    ck = p.keys.customer(customer_id)
    args = GET_BUDGET.args(p.common, agent_digest=_agent_digest(agent_id))
    return Call("get_budget", GET_BUDGET.keys(ck), args)


def decode_scope(reply: Reply, customer_id: str, agent_id: str | None, now_ms: int) -> BudgetStatus:
    """A scope_reply (see lua/_common.lua; ``scope`` in lua/contract.json) as a BudgetStatus."""
    s = SCOPE.items(reply)
    limit = _int_or_none(s.limit)
    spent, reserved = int(s.spent), int(s.reserved)
    start = _int_or_none(s.period_start_ms)
    end = _int_or_none(s.period_end_ms)
    rate_units = _int_or_none(s.rate_units)
    thresholds = _text(s.thresholds)
    period = _text(s.period) or None
    return BudgetStatus(
        customer_id=customer_id,
        agent_id=agent_id,
        limit=limit,
        spent=spent,
        reserved=reserved,
        remaining=_remaining(limit, spent + reserved),
        open_reservations=int(s.open),
        period=cast(Period, period),
        period_start=_datetime(start) if start is not None else None,
        period_end=_datetime(end) if end is not None else None,
        resets_in=(end - now_ms) / 1000 if end is not None else None,
        thresholds=tuple(int(t) for t in thresholds.split(_contract.LIST_SEP) if t),
        rate_limit=RateLimit(
            units=rate_units, per_seconds=int(s.rate_per_ms) // 1000, burst=int(s.rate_burst)
        )
        if rate_units is not None
        else None,
        max_in_flight=_int_or_none(s.max_in_flight),
    )


def decode_budget(reply: Reply, customer_id: str, agent_id: str | None = None) -> BudgetStatus:
    """get_budget.lua / set_budget.lua / set_limits.lua: the agent's scope if one was asked."""
    r = GET_BUDGET.items(reply)  # set_budget and set_limits reply the same (same_as)
    now = int(r.now_ms)
    if agent_id is not None:
        return decode_scope(r.agent, customer_id, agent_id, now)
    return decode_scope(r.customer, customer_id, None, now)


def get_usage_call(p: ScriptSettings, customer_id: str, agent_limit: int) -> Call:
    ck = p.keys.customer(customer_id)
    return Call("get_usage", GET_USAGE.keys(ck), GET_USAGE.args(p.common, agent_limit=agent_limit))


def decode_usage(reply: Reply, customer_id: str) -> Usage:
    r = GET_USAGE.items(reply)
    now = int(r.now_ms)
    pairs = iter(r.agents)  # agent id, its scope, agent id, its scope, ...
    agents = tuple(
        decode_scope(scope, customer_id, _text(agent), now)
        for agent, scope in zip(pairs, pairs, strict=True)
    )
    return Usage(
        customer=decode_scope(r.customer, customer_id, None, now),
        agents=tuple(sorted(agents, key=lambda a: a.agent_id or "")),
    )


EVENTS_PAGE = 1000
"""Ledger entries read per script call: a page is a few milliseconds of Redis, however long the
ledger (reading 100,000 at once held Redis for over a second)."""


def events_call(p: ScriptSettings, customer_id: str, since: str | None, count: int) -> Call:
    ck = p.keys.customer(customer_id)
    args = EVENTS.args(p.common, after=since or "-", count=count)
    return Call("events", EVENTS.keys(ck), args)


def _stream_time(entry_id: str) -> datetime:
    """When a stream entry was written: its id is "<ms>-<seq>" (Redis clock)."""
    ms, _, _ = entry_id.partition("-")
    return _datetime(int(ms))


def decode_events(reply: Reply, customer_id: str) -> list[Event]:
    """XRANGE's entries (``ledger_entry`` of lua/contract.json names their stream fields)."""
    out = []
    for raw_id, raw_fields in reply:
        entry_id = _text(raw_id)
        f = LEDGER_ENTRY.by_key(raw_fields, _text)
        out.append(
            Event(
                id=entry_id,
                type=cast(EventType, f.type),
                time=_stream_time(entry_id),
                customer_id=customer_id,
                agent_id=f.agent_id or None,
                task_ref=f.task_ref or None,
                units=int(f.units),
                released=int(f.released),
                reservation_id=f.reservation_id or None,
                reason=f.reason or None,
                scope=f.scope or None,
                period=f.period or None,
            )
        )
    return out


def open_task_call(p: ScriptSettings, customer_id: str, task_ref: str, ceiling: int | None) -> Call:
    ck = p.keys.customer(customer_id)
    args = OPEN_TASK.args(
        p.common, task_digest=digest(task_ref), task_ref=task_ref, ceiling=ceiling
    )
    return Call("open_task", OPEN_TASK.keys(ck), args)


def get_task_call(p: ScriptSettings, customer_id: str, task_ref: str) -> Call:
    ck = p.keys.customer(customer_id)
    return Call(
        "get_task", GET_TASK.keys(ck), GET_TASK.args(p.common, task_digest=digest(task_ref))
    )


def decode_task(reply: Reply, customer_id: str, task_ref: str) -> TaskStatus:
    r = GET_TASK.items(reply)  # open_task replies the same (same_as)
    ceiling = _int_or_none(r.ceiling)
    used, reserved = int(r.used), int(r.reserved)
    return TaskStatus(
        task_ref=task_ref,
        customer_id=customer_id,
        ceiling=ceiling,
        used=used,
        reserved=reserved,
        remaining=_remaining(ceiling, used + reserved),
        exists=int(r.exists) == 1,
    )


# -- plans: validated input -> (script call, reply decoder); what both clients execute ---------


class Plan(NamedTuple, Generic[T]):
    """One operation ready to run: the script call, and how to read its reply.

    A preflight also carries ``offline``, the decision to make alone if Redis cannot answer
    (used only by a client whose outage policy allows it), and the id of the reservation it
    would create (made by the client, so a preflight whose reply never came, cancelled or
    timed out, can still be released by id); a settle carries the reservation id it closes,
    if it names one, else the one of the client's own it prefers to close (``prefer``). A
    preflight, and a release by idempotency key, carry ``idempotency``: the Redis key of the
    preflight's idempotency record and the request's fingerprint ('' when the preflight has
    no key, or for the release).
    """

    call: Call
    decode: Callable[[Reply], T]
    offline: Callable[[], T] | None = None
    reservation_id: str | None = None
    prefer: str | None = None
    idempotency: tuple[str, str] | None = None


def plan_preflight(
    p: ScriptSettings,
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
        idempotency=preflight_idempotency(p, req, rid),
    )


def plan_preflight_many(
    p: ScriptSettings, requests: object, make: Callable[..., C]
) -> list[Plan[C]]:
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
    "Function not found" (to send again once the library is loaded)."""
    missing = []
    for i, reply in zip(pending, answered, strict=True):
        if function_missing(reply):
            missing.append(i)
        else:
            replies[i] = reply
    return missing


def batch_error(index: int, error: AgentBillError) -> AgentBillError:
    """``error`` of item ``index`` of a batch, its field (if any) named ``requests[i].field``."""
    if isinstance(error, InvalidRequestError):
        return InvalidRequestError(f"requests[{index}].{error.field}", error.message)
    return error


# -- dialogues: logic that needs answers from Redis midway, once for both clients ----------------

Q = TypeVar("Q")
"""What a dialogue asks (the clients' ``Ask``)."""


def drive(dialogue: Generator[Q, Any, T], answer: Callable[[Q], object]) -> T:
    """Run ``dialogue`` to its end and return what it returns: a generator without I/O that
    yields what it needs done (a plan to send, a batch, a pause) and is sent each answer, or
    thrown the error (any BaseException: an interrupt too) that getting it raised, so that it
    handles failures where it asked. ``answer`` does the I/O: the sync client's half of the
    dialogue (:func:`adrive` is the async client's)."""
    step, value = dialogue.send, cast(Any, None)  # None starts it
    while True:
        try:
            ask = step(value)
        except StopIteration as done:
            return cast(T, done.value)
        try:
            step, value = dialogue.send, answer(ask)
        except BaseException as exc:
            step, value = dialogue.throw, exc


async def adrive(dialogue: Generator[Q, Any, T], answer: Callable[[Q], Awaitable[object]]) -> T:
    """:func:`drive`, with each answer awaited."""
    step, value = dialogue.send, cast(Any, None)
    while True:
        try:
            ask = step(value)
        except StopIteration as done:
            return cast(T, done.value)
        try:
            step, value = dialogue.send, await answer(ask)
        except BaseException as exc:
            step, value = dialogue.throw, exc


def plan_record(
    p: ScriptSettings,
    agent_id: object,
    units: object,
    customer_id: object,
    reservation_id: object,
    task_ref: object,
    success: object,
    idempotency_key: object,
    metadata: object,
    own: OwnReservations | None = None,
    model: str | None = None,
    learn: bool = True,
    offline_key: Callable[[str], tuple[str, str] | None] | None = None,
) -> Plan[Settlement]:
    """``own``: the client's own reservations; without a reservation id the record closes
    the oldest of its group still open first (the client forgets it once the call is made).
    ``model``: see :func:`record_call`. ``offline_key``: the preflight idempotency of a
    reservation approved offline under a key, by its id (see :func:`record_call`)."""
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
        prefer = own.oldest((customer_of(req.customer_id), req.agent_id, req.task_ref))
    closes = req.reservation_id or prefer
    key = offline_key(closes) if offline_key is not None and closes is not None else None
    return Plan(
        record_call(p, req, new_token(), prefer, model, learn, key),
        lambda r: decode_settle(r, req.customer_id, req.metadata),
        reservation_id=req.reservation_id,
        prefer=prefer,
    )


def plan_release(
    p: ScriptSettings,
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
    by_key = None
    if req.idempotency_key is not None:
        by_key = (
            p.keys.customer(customer_of(req.customer_id)).idempotency(
                "preflight", req.idempotency_key
            ),
            "",
        )
    return Plan(
        release_call(p, req, new_token(), rollback),
        lambda r: decode_settle(r, req.customer_id),
        reservation_id=req.reservation_id,
        idempotency=by_key,
    )


def plan_set_budget(
    p: ScriptSettings,
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
    p: ScriptSettings,
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
    p: ScriptSettings, customer_id: object, max_in_flight: object, agent_id: object
) -> Plan[BudgetStatus]:
    req = validate(
        ConcurrencyRequest,
        customer_id=customer_of(customer_id),
        max_in_flight=max_in_flight,
        agent_id=agent_id,
    )
    call = set_limits_call(p, req)
    return Plan(call, lambda reply: decode_budget(reply, req.customer_id, req.agent_id))


def plan_get_budget(p: ScriptSettings, customer_id: object, agent_id: object) -> Plan[BudgetStatus]:
    req = validate(ScopeRef, customer_id=customer_of(customer_id), agent_id=agent_id)
    call = get_budget_call(p, req.customer_id, req.agent_id)
    return Plan(call, lambda reply: decode_budget(reply, req.customer_id, req.agent_id))


def plan_get_usage(p: ScriptSettings, customer_id: object, limit: object) -> Plan[Usage]:
    req = validate(UsageRequest, customer_id=customer_of(customer_id), limit=limit)
    call = get_usage_call(p, req.customer_id, req.limit)
    return Plan(call, lambda r: decode_usage(r, req.customer_id))


def plan_events(
    p: ScriptSettings, customer_id: object, since: object, limit: object
) -> Generator[Plan[list[Event]], list[Event], list[Event]]:
    """The ledger read in pages of EVENTS_PAGE: the client sends each plan yielded and sends
    its result back; the generator returns every entry asked for. Validated at the first
    ``next()``; nothing is sent for bad input."""
    req = validate(EventsRequest, customer_id=customer_of(customer_id), since=since, limit=limit)
    out: list[Event] = []
    after = req.since
    while True:
        want = EVENTS_PAGE if req.limit is None else min(EVENTS_PAGE, req.limit - len(out))
        call = events_call(p, req.customer_id, after, want)
        page = yield Plan(call, lambda reply: decode_events(reply, req.customer_id))
        out += page
        if len(page) < want or (req.limit is not None and len(out) >= req.limit):
            return out
        *_, last = page
        after = last.id


def plan_open_task(
    p: ScriptSettings, task_ref: object, ceiling: object, customer_id: object
) -> Plan[TaskStatus]:
    req = validate(
        TaskRequest, task_ref=task_ref, customer_id=customer_of(customer_id), ceiling=ceiling
    )
    call = open_task_call(p, req.customer_id, req.task_ref, req.ceiling)
    return Plan(call, lambda reply: decode_task(reply, req.customer_id, req.task_ref))


def plan_get_task(p: ScriptSettings, task_ref: object, customer_id: object) -> Plan[TaskStatus]:
    req = validate(TaskRequest, task_ref=task_ref, customer_id=customer_of(customer_id))
    call = get_task_call(p, req.customer_id, req.task_ref)
    return Plan(call, lambda reply: decode_task(reply, req.customer_id, req.task_ref))


def plan_extend(
    p: ScriptSettings, check: BaseCheck, units: object, make: Callable[..., C]
) -> Plan[C]:
    """``units`` more on ``check``'s reservation (see extend.lua); the decision is a Check of
    the reservation (``make``) whose ``estimated_units`` is its new total."""
    extra = validate_units("units", units)
    if extra < 1:
        raise InvalidRequestError("units", "must be at least 1")
    rid = open_reservation(check)
    if check.offline:
        raise InvalidRequestError(
            "reservation_id", "was approved offline (Redis was unreachable): it cannot be extended"
        )
    ck = reservation_keys(p, rid)
    token = new_token()
    args = EXTEND.args(
        p.common,
        reservation_id=rid,
        units=extra,
        ceiling=p.ceiling,
        agent_id=check.agent_id,
        request_ttl_ms=REQUEST_ID_TTL_MS,
    )
    call = Call("extend", EXTEND.keys(ck, request=ck.request(token)), args)
    total = check.estimated_units + extra
    req = validate(
        PreflightRequest,
        agent_id=check.agent_id,
        estimated_units=min(total, MAX_UNITS),
        customer_id=check.customer_id,
        task_ref=check.task_ref,
    )
    return Plan(call, lambda reply: decode_preflight(reply, req, p, make), reservation_id=rid)


def stats_bin_top(index: int) -> int:
    """The most units histogram bin ``index`` holds (``histogram_bin`` in lua/contract.json:
    4 bins per power of two, bin -1 for 0 units)."""
    if index < 0:
        return 0
    power, quarter = divmod(index, 4)
    top: int = -(-(2**power * (5 + quarter)) // 4) - 1  # ceil(2^power * (5 + quarter) / 4) - 1
    return top


def _percentile(bins: Sequence[tuple[int, int]], samples: int, q: int) -> int | None:
    """The top of the bin holding the ``q``-th percentile of ``samples``."""
    if samples == 0:
        return None
    rank = -(-samples * q // 100)
    seen, found = 0, None
    for top, n in bins:
        seen, found = seen + n, top
        if seen >= rank:
            break
    return found


def decode_estimates(reply: Any, agent_id: str, customer_id: str, model: str | None) -> Estimates:
    f = ESTIMATES.unpack(reply)
    samples, actual, estimate = _int(f.samples), _int(f.actual_sum), _int(f.estimate_sum)
    counts: dict[int, int] = {}
    for item in (f.histogram or "").split(_contract.LIST_SEP):
        if item:
            b = HISTOGRAM_BIN.split(item)
            top = stats_bin_top(int(b.bin))
            counts[top] = counts.get(top, 0) + int(b.samples)
    bins = tuple(sorted(counts.items()))
    return Estimates(
        agent_id=agent_id,
        customer_id=customer_id,
        model=model,
        samples=samples,
        mean_actual=actual / samples if samples else None,
        mean_estimate=estimate / samples if samples else None,
        actual_to_estimate=actual / estimate if estimate else None,
        p50=_percentile(bins, samples, 50),
        p95=_percentile(bins, samples, 95),
        p99=_percentile(bins, samples, 99),
        histogram=bins,
    )


def plan_estimates(
    p: ScriptSettings, agent_id: object, customer_id: object, model: object
) -> Plan[Estimates]:
    req = validate(ScopeRef, customer_id=customer_of(customer_id), agent_id=agent_id)
    if req.agent_id is None:
        raise InvalidRequestError("agent_id", "must be an agent id (a non-empty str)")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise InvalidRequestError("model", "must be a model's name (a non-empty str) or None")
    agent, customer = req.agent_id, req.customer_id
    name = model if isinstance(model, str) else None
    ck = p.keys.customer(customer)
    keys = ESTIMATES.keys(ck, stats=ck.stats(agent, name))
    call = Call("estimates", keys, ESTIMATES.args(p.common))
    return Plan(call, lambda reply: decode_estimates(reply, agent, customer, name))


def validate_gate(
    p: ScriptSettings,
    agent_id: object,
    estimated_units: object,
    customer_id: object,
    task_ref: object,
    task_ceiling: object,
    ttl: object,
    *,
    units: object = None,
    charge_estimate: object = False,
    bound: object = None,
) -> None:
    """Check a gate's (or a run block's) arguments when it is made, so a bad one fails at
    once (at import time, for a decorator), not after a run. ``estimated_units="learned"``
    needs ``bound``: the most one run can use, reserved until the agent's statistics have
    enough samples, and never exceeded."""
    learned = isinstance(estimated_units, str) and estimated_units == "learned"
    if learned:
        if bound is None:
            raise InvalidRequestError(
                "bound",
                "estimated_units='learned' needs bound: the most one run can use (reserved "
                f"until the agent has {LEARN_AFTER} samples, and never exceeded)",
            )
        estimated_units = validate_units("bound", bound)
    plan_preflight(
        p, agent_id, estimated_units, customer_id, task_ref, task_ceiling, None, ttl, BaseCheck
    )
    if bound is not None and not learned:
        raise InvalidRequestError("bound", "applies to estimated_units='learned' only")
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
