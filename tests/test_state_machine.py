"""A model-checked state machine: random runs of every operation, against real Redis and a model.

Hypothesis drives random sequences of set_budget (customer and agent budgets), preflight,
record, release (by id, by idempotency key, through the Check), open_task, get_budget,
get_task and the passing of time against the suite's redis-server, and against ``Model``: a
few dictionaries holding the rules as the README states them. Every result is compared whole
(Check, Settlement, BudgetStatus, TaskStatus, the error and the field it names), and after
every step every counter Redis holds (customer and agent budgets, tasks, open reservations and
their expiry) is compared with the model's, read without a script so the comparison itself
reaps nothing.

Time: reservations live 1 s (``ttl=1``), 60 s or the default hour. ``advance_clock`` moves
the scripts' clock forward in the test-only movable-clock variant of the scripts (tests/_clock.py,
as tests/test_budget_model.py does), so a reservation expires within an example without sleeping.
Expiry is lazy and bounded: every script call first returns at most ``reap_limit``
reservations whose expiry is at or before its clock, earliest first. The machine reads that
clock (Redis ``TIME`` plus the offset) before and after each call, and before a call waits
until no open reservation falls due within ``MARGIN_MS``: so a reservation is either due
before the call (certainly returned, up to the limit) or after it (certainly not), and the
model is exact. Only if a call outlasts the margin (a stalled machine) can one fall due during
it; for that one alone the machine asks Redis which way it went, and checks the answer keeps
expiry order and the limit.

Not modelled here (tests/test_budget_model.py covers them): budget periods, rate and
concurrency limits, thresholds, the ledger, outcomes forgotten after the retention, outages.

Each example runs in a fresh namespace, on the sync client and on the async one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, cast

import pytest
import redis
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from agentbill import (
    AgentBillClient,
    AsyncAgentBillClient,
    BaseCheck,
    BudgetStatus,
    InvalidRequestError,
    Settlement,
    TaskStatus,
)
from agentbill._keys import KeySpace, customer_tag, digest, reservation_id
from tests._async_facade import blocking_client
from tests._clock import movable_clock
from tests._servers import RedisServer

CUSTOMERS = ("alice", "bob")
AGENTS = ("a1", "a2")
TASKS = ("t1", "t2")
KEYS = ("k1", "k2")
DEFAULT_TTL_MS = 3600 * 1000  # the client's reservation_ttl
MARGIN_MS = 15
CLOCK_OFFSET = "_clock_offset"  # the movable clock's shift, ms (tests/_clock.py)

# Discrepancies this machine found between the README and the code, each fixed and kept as a
# regression test at the bottom of this file. The model states the README's rule; a switch set
# to True makes it accept the old behaviour in that one place (to study a regression).
#
# A record replayed under its idempotency key reports the first call's ``released``, although
# nothing was given back by this call (a replay of a closed reservation reports 0).
KNOWN_KEY_REPLAY_REPORTS_FIRST_RELEASED = False
# A refused Check reports the request's task_ceiling as the task's when the task exists without
# a ceiling, or when there is no task_ref at all (and computes task_remaining from it).
KNOWN_REFUSAL_REPORTS_REQUESTED_TASK_CEILING = False
# A preflight key whose reservation is past its expiry but not yet returned (more were due than
# ``reap_limit``) replays that reservation instead of reserving afresh; the next call returns it.
KNOWN_DUE_RESERVATION_REPLAYS_UNDER_ITS_KEY = False

SEP = "\x1f"
RID = re.compile(r"^rsv\.[0-9a-f]{24}\.[0-9a-f]{24}$")
CHECK_FIELDS = tuple(f.name for f in dataclasses.fields(BaseCheck))

units = st.integers(0, 12)
opt_task = st.sampled_from((None, *TASKS))
opt_key = st.sampled_from((None, None, *KEYS))
mostly_true = st.sampled_from((True, True, True, False))
customers = st.sampled_from(CUSTOMERS)
agents = st.sampled_from(AGENTS)
opt_agents = st.sampled_from((None, None, *AGENTS))
budget_limits = st.none() | st.integers(0, 40)
# A reservation made earlier in the example, counted back from the latest (which ones exist
# depends on timing, so the drawn data must not: an index, not a reservation id).
picks = st.integers(0, 255)


# -- the model ---------------------------------------------------------------------------------


@dataclass
class Reservation:
    rid: str
    customer: str
    agent: str
    task_ref: str | None
    estimate: int
    expires_ms: int
    seq: int
    check: Any = None
    status: str = "open"  # open, recorded, released, expired, late; "unknown" if never issued
    charged: int = 0
    named: bool = True  # closed by a request naming it (False: by a record without an id)


@dataclass
class Task:
    exists: bool = False
    ceiling: int | None = None
    used: int = 0
    reserved: int = 0


@dataclass
class Scope:
    """A customer's budget, or one agent's within it (lifetime budgets only here)."""

    limit: int | None = None
    spent: int = 0


@dataclass(frozen=True)
class Outcome:
    """What a settle call answers, before the customer's numbers are added."""

    status: str
    reservation_id: str | None
    charged: int
    released: int
    late: bool
    replayed: bool = False


@dataclass(frozen=True)
class PreflightArgs:
    customer: str
    agent: str
    estimate: int
    task_ref: str | None
    task_ceiling: int | None
    key: str | None
    ttl: int | None


@dataclass(frozen=True)
class RecordArgs:
    customer: str | None
    agent: str
    units: int
    reservation_id: str | None
    task_ref: str | None
    success: bool
    key: str | None
    metadata: dict[str, int] | None

    @property
    def fingerprint(self) -> tuple[object, ...]:
        return (self.reservation_id, self.agent, self.units, self.task_ref, self.success)


@dataclass
class Customer:
    budget: Scope = field(default_factory=Scope)
    agents: dict[str, Scope] = field(default_factory=dict)
    seq: int = 0
    tasks: dict[str, Task] = field(default_factory=dict)
    preflight_keys: dict[str, tuple[PreflightArgs, str]] = field(default_factory=dict)
    record_keys: dict[str, tuple[RecordArgs, Outcome]] = field(default_factory=dict)

    def scope(self, agent: str | None) -> Scope:
        return self.budget if agent is None else self.agents.setdefault(agent, Scope())


def _remaining(limit: int | None, used: int) -> int | None:
    return None if limit is None else max(0, limit - used)


def _datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _ms(when: datetime) -> int:
    return round(when.timestamp() * 1000)


class Model:
    """The rules as the README states them, on plain dictionaries."""

    def __init__(self, ceiling: int | None, reap_limit: int) -> None:
        self.ceiling = ceiling
        self.reap_limit = reap_limit
        self.customers = {c: Customer() for c in CUSTOMERS}
        self.reservations: dict[str, Reservation] = {}

    def open_of_all(self) -> list[Reservation]:
        return [r for r in self.reservations.values() if r.status == "open"]

    def open_of(self, customer: str, agent: str | None = None) -> list[Reservation]:
        return [
            r
            for r in self.reservations.values()
            if r.customer == customer and r.status == "open" and agent in (None, r.agent)
        ]

    def task(self, customer: str, task_ref: str) -> Task:
        return self.customers[customer].tasks.setdefault(task_ref, Task())

    def close(self, r: Reservation, status: str, charged: int, named: bool = True) -> None:
        r.named = named
        if r.task_ref is not None:
            t = self.task(r.customer, r.task_ref)
            t.reserved -= r.estimate
            t.used += charged
        c = self.customers[r.customer]
        c.budget.spent += charged
        c.scope(r.agent).spent += charged
        r.status, r.charged = status, charged

    def charge(self, customer: str, agent: str, task_ref: str | None, amount: int) -> None:
        """Charge with no reservation: to the customer and the agent, and to the task (opening
        it) if named."""
        c = self.customers[customer]
        c.budget.spent += amount
        c.scope(agent).spent += amount
        if task_ref is not None:
            t = self.task(customer, task_ref)
            t.exists = True
            t.used += amount

    def budget(self, customer: str, agent: str | None = None) -> BudgetStatus:
        s = self.customers[customer].scope(agent)
        held = self.open_of(customer, agent)
        reserved = sum(r.estimate for r in held)
        return BudgetStatus(
            customer_id=customer,
            agent_id=agent,
            limit=s.limit,
            spent=s.spent,
            reserved=reserved,
            remaining=_remaining(s.limit, s.spent + reserved),
            open_reservations=len(held),
        )

    def task_status(self, customer: str, task_ref: str) -> TaskStatus:
        t = self.customers[customer].tasks.get(task_ref, Task())
        return TaskStatus(
            task_ref=task_ref,
            customer_id=customer,
            ceiling=t.ceiling,
            used=t.used,
            reserved=t.reserved,
            remaining=_remaining(t.ceiling, t.used + t.reserved),
            exists=t.exists,
        )

    def settlement(
        self, customer: str, o: Outcome, metadata: dict[str, int] | None = None
    ) -> Settlement:
        b = self.budget(customer)
        return Settlement(
            status=o.status,  # type: ignore[arg-type]
            reservation_id=o.reservation_id,
            charged=o.charged,
            released=o.released,
            late=o.late,
            replayed=o.replayed,
            spent=b.spent,
            reserved=b.reserved,
            limit=b.limit,
            remaining=b.remaining,
            metadata=metadata,
        )


# -- the machine -------------------------------------------------------------------------------

Connect = Callable[..., tuple[AgentBillClient, Callable[[], object]]]


class Call:
    """One client call bracketed by the scripts' clock: ``t0 <= the script's now <= t1``."""

    def __init__(self, result: Any, error: InvalidRequestError | None, t0: int, t1: int) -> None:
        self.result, self.error, self.t0, self.t1 = result, error, t0, t1


class BudgetMachine(RuleBasedStateMachine):
    server: ClassVar[RedisServer]
    connect: ClassVar[Connect]

    def __init__(self) -> None:
        super().__init__()
        self.raw: redis.Redis = self.server.client(decode_responses=True)
        self.close_client: Callable[[], object] | None = None
        self.offset = 0  # the scripts' clock shift, the same for every customer
        self.keyed_preflights: list[PreflightArgs] = []
        self.keyed_records: list[RecordArgs] = []

    @initialize(
        ceiling=st.none() | st.integers(5, 15),
        reap_limit=st.sampled_from((1, 2, 100)),
        limits=st.tuples(budget_limits, budget_limits),
        agent_limit=budget_limits,
    )
    def start(
        self,
        ceiling: int | None,
        reap_limit: int,
        limits: tuple[int | None, int | None],
        agent_limit: int | None,
    ) -> None:
        namespace = f"m-{uuid.uuid4().hex[:12]}"
        self.keys = KeySpace(namespace)
        self.client, self.close_client = type(self).connect(
            namespace=namespace, ceiling=ceiling, reap_limit=reap_limit
        )
        self.model = Model(ceiling, reap_limit)
        for customer, limit in zip(CUSTOMERS, limits, strict=True):
            self.set_budget(customer, None, limit)
        if agent_limit is not None:
            self.set_budget(CUSTOMERS[0], AGENTS[0], agent_limit)

    def teardown(self) -> None:
        if self.close_client is not None:
            self.close_client()
        self.raw.close()

    # -- plumbing --------------------------------------------------------------------------

    def _now(self) -> int:
        seconds, micros = self.raw.time()
        return seconds * 1000 + micros // 1000 + self.offset

    def _call(self, customer: str, fn: Callable[[], Any]) -> Call:
        """Run one client call for ``customer`` and apply, in the model, the expiry it did."""
        t0 = self._clear_of_expiries(customer)
        try:
            result, error = fn(), None
        except InvalidRequestError as exc:
            result, error = None, exc
        t1 = self._now()
        if error is None:  # a script that refuses a request writes nothing, reaping included
            self._reap(customer, t0, t1)
        return Call(result, error, t0, t1)

    def _clear_of_expiries(self, customer: str) -> int:
        """The scripts' clock, once no open reservation of ``customer`` falls due within the
        margin."""
        while True:
            now = self._now()
            soon = [
                r.expires_ms
                for r in self.model.open_of(customer)
                if now < r.expires_ms <= now + MARGIN_MS
            ]
            if not soon:
                return now
            # Wake at the expiry itself, not after it: a call at exactly that ms is one too.
            time.sleep((max(soon) - now) / 1000)

    def _reap(self, customer: str, t0: int, t1: int) -> None:
        limit = self.model.reap_limit
        due = sorted(
            (r for r in self.model.open_of(customer) if r.expires_ms <= t1),
            key=lambda r: (r.expires_ms, r.rid),
        )
        certain = sum(1 for r in due if r.expires_ms <= t0)
        count = min(limit, certain)
        if len(due) > certain and certain < limit:
            # These fell due while the call ran: ask Redis which ones it returned.
            flags = [self._was_reaped(r) for r in due[certain:]]
            k = flags.count(True)
            assert flags == [True] * k + [False] * (len(flags) - k), "reaped out of order"
            assert certain + k <= limit, "reaped more than reap_limit"
            count = certain + k
            event("expiry: fell due during the call")
        if count:
            event("expiry: reservations returned")
        if len(due) > count:
            event("expiry: bounded by reap_limit")
        for r in due[:count]:
            self.model.close(r, "expired", 0)

    def _was_reaped(self, r: Reservation) -> bool:
        outcome = cast(str | None, self.raw.hget(self.keys.customer(r.customer).closed, r.rid))
        return outcome is not None and outcome.split(SEP)[0] in ("expired", "late")

    def _pick(self, pick: int) -> Reservation | None:
        made = list(self.model.reservations.values())
        return made[-1 - pick % len(made)] if made else None

    def _expect_error(self, call: Call, field: str) -> None:
        event(f"InvalidRequestError({field})")
        assert call.error is not None, f"expected InvalidRequestError({field}), got {call.result}"
        assert call.error.field == field, str(call.error)

    def _expect_ok(self, call: Call) -> Any:
        assert call.error is None, str(call.error)
        return call.result

    def _expect_settlement(
        self, call: Call, customer: str, o: Outcome, metadata: dict[str, int] | None = None
    ) -> None:
        event(f"settle: {o.status}{' (replayed)' if o.replayed else ''}")
        assert self._expect_ok(call) == self.model.settlement(customer, o, metadata)

    # -- admin -----------------------------------------------------------------------------

    @rule(customer=customers, agent=opt_agents, limit=budget_limits)
    def set_budget(self, customer: str, agent: str | None, limit: int | None) -> None:
        call = self._call(customer, lambda: self.client.set_budget(customer, limit, agent_id=agent))
        self.model.customers[customer].scope(agent).limit = limit
        assert self._expect_ok(call) == self.model.budget(customer, agent)

    @rule(customer=customers, agent=opt_agents)
    def get_budget(self, customer: str, agent: str | None) -> None:
        call = self._call(customer, lambda: self.client.get_budget(customer, agent_id=agent))
        assert self._expect_ok(call) == self.model.budget(customer, agent)

    @rule(customer=customers, task_ref=st.sampled_from(TASKS), ceiling=st.none() | units)
    def open_task(self, customer: str, task_ref: str, ceiling: int | None) -> None:
        call = self._call(customer, lambda: self.client.open_task(task_ref, ceiling, customer))
        t = self.model.task(customer, task_ref)
        t.exists, t.ceiling = True, ceiling
        assert self._expect_ok(call) == self.model.task_status(customer, task_ref)

    @rule(customer=customers, task_ref=st.sampled_from(TASKS))
    def get_task(self, customer: str, task_ref: str) -> None:
        call = self._call(customer, lambda: self.client.get_task(task_ref, customer))
        assert self._expect_ok(call) == self.model.task_status(customer, task_ref)

    # -- preflight -------------------------------------------------------------------------

    @rule(
        customer=customers,
        agent=agents,
        estimate=units,
        task_ref=opt_task,
        task_ceiling=st.none() | st.integers(0, 20),
        key=opt_key,
        ttl=st.sampled_from((None, 1, 1, 60)),
    )
    def preflight(
        self,
        customer: str,
        agent: str,
        estimate: int,
        task_ref: str | None,
        task_ceiling: int | None,
        key: str | None,
        ttl: int | None,
    ) -> None:
        args = PreflightArgs(customer, agent, estimate, task_ref, task_ceiling, key, ttl)
        if key is not None:
            self.keyed_preflights.append(args)
        self._preflight(args)

    @precondition(lambda self: bool(self.keyed_preflights))
    @rule(pick=picks)
    def repeat_preflight(self, pick: int) -> None:
        """The same key with the same arguments: a retried job, say."""
        self._preflight(self.keyed_preflights[pick % len(self.keyed_preflights)])

    @precondition(lambda self: bool(self.keyed_preflights))
    @rule(pick=picks)
    def retry_a_second_later(self, pick: int) -> None:
        """A job retried after a pause: 1 s passes, then the same preflight under the same
        key (its 1 s reservation is then due, and perhaps not yet returned)."""
        self.let_a_second_pass()
        self.repeat_preflight(pick)

    @rule(
        customer=customers,
        agent=agents,
        task_ref=opt_task,
        edge=st.sampled_from(("budget", "agent", "task", "ceiling")),
        offset=st.integers(-1, 1),
        key=opt_key,
        ttl=st.sampled_from((None, 1)),
    )
    def preflight_at_an_edge(
        self,
        customer: str,
        agent: str,
        task_ref: str | None,
        edge: str,
        offset: int,
        key: str | None,
        ttl: int | None,
    ) -> None:
        """Ask for what is left (of the customer's or the agent's budget, the task's ceiling or
        the client's ceiling), give or take one: where an off-by-one would show. (What is left
        is the model's before the call: an expiry during it may move the edge, which only makes
        it another case.)"""
        left: int | None = self.model.ceiling
        if edge == "budget":
            left = self.model.budget(customer).remaining
        elif edge == "agent":
            left = self.model.budget(customer, agent).remaining
        elif edge == "task" and task_ref is not None:
            left = self.model.task_status(customer, task_ref).remaining
        estimate = max(0, (5 if left is None else left) + offset)
        args = PreflightArgs(customer, agent, estimate, task_ref, None, key, ttl)
        if key is not None:
            self.keyed_preflights.append(args)
        self._preflight(args)

    def _preflight(self, a: PreflightArgs) -> None:
        call = self._call(
            a.customer,
            lambda: self.client.preflight(
                a.agent,
                a.estimate,
                a.customer,
                task_ref=a.task_ref,
                task_ceiling=a.task_ceiling,
                idempotency_key=a.key,
                ttl=a.ttl,
            ),
        )
        m = self.model
        c = m.customers[a.customer]
        if a.key is not None and a.key in c.preflight_keys:
            first, rid = c.preflight_keys[a.key]
            if first != a:
                self._expect_error(call, "idempotency_key")
                return
            prior = m.reservations[rid]
            # A key whose reservation was released or expired reserves afresh.
            status = prior.status
            if status == "open" and prior.expires_ms <= call.t0:
                event("preflight: key of a due reservation not yet returned")
                if not KNOWN_DUE_RESERVATION_REPLAYS_UNDER_ITS_KEY:
                    # The call expires it there and then, and reserves afresh.
                    m.close(prior, "expired", 0)
                    status = "expired"
            if status in ("open", "recorded", "late"):
                event(f"preflight: replayed ({prior.status})")
                self._check_replay(call, a, prior)
                return
            event(f"preflight: key of a {status} reservation reserves afresh")
        check = self._expect_ok(call)
        task = c.tasks.get(a.task_ref) if a.task_ref is not None else None
        exists = task is not None and task.exists
        if a.task_ref is None:
            task_ceiling = None
        else:
            task_ceiling = task.ceiling if task is not None and exists else a.task_ceiling
        used = task.used if task is not None else 0
        task_reserved = task.reserved if task is not None else 0
        customer, agent = m.budget(a.customer), m.budget(a.customer, a.agent)
        # The rules in the README's order: (reason, scope, limit, used, reserved) of a refusal.
        refusal: tuple[str, str, int | None, int, int] | None = None
        if m.ceiling is not None and a.estimate > m.ceiling:
            refusal = ("ceiling_exceeded", "request", m.ceiling, 0, 0)
        elif task_ceiling is not None and used + task_reserved + a.estimate > task_ceiling:
            refusal = ("task_ceiling_exceeded", "task", task_ceiling, used, task_reserved)
        else:
            for scope, b in (("customer", customer), ("agent", agent)):
                if b.limit is not None and b.spent + b.reserved + a.estimate > b.limit:
                    refusal = ("budget_exhausted", scope, b.limit, b.spent, b.reserved)
                    break
        has_task = a.task_ref is not None
        if refusal is not None:
            reason, scope, rule_limit, rule_used, rule_reserved = refusal
            event(f"preflight: {reason} ({scope})")
            reported_ceiling = task_ceiling
            if KNOWN_REFUSAL_REPORTS_REQUESTED_TASK_CEILING and task_ceiling is None:
                reported_ceiling = a.task_ceiling
            expected = self._check_fields(
                a,
                approved=False,
                reason=reason,
                reservation_id=None,
                expires_at=None,
                remaining=customer.remaining,
                limit=rule_limit,
                task_ceiling=reported_ceiling,
                task_used=used if has_task else None,
                task_remaining=(
                    _remaining(reported_ceiling, used + task_reserved) if has_task else None
                ),
                scope=scope,
                used=rule_used,
                reserved=rule_reserved,
            )
            assert _fields(check) == expected
            return
        event("preflight: approved")
        rid = check.reservation_id
        assert isinstance(rid, str)
        assert RID.match(rid), rid
        assert rid.split(".")[1] == customer_tag(a.customer)
        assert rid not in m.reservations
        ttl_ms = DEFAULT_TTL_MS if a.ttl is None else a.ttl * 1000
        expires = _ms(check.expires_at)
        assert call.t0 + ttl_ms <= expires <= call.t1 + ttl_ms
        c.seq += 1
        m.reservations[rid] = Reservation(
            rid, a.customer, a.agent, a.task_ref, a.estimate, expires, c.seq, check=check
        )
        if a.task_ref is not None:
            t = m.task(a.customer, a.task_ref)
            if not t.exists:
                t.exists, t.ceiling = True, a.task_ceiling
            t.reserved += a.estimate
        if a.key is not None:
            c.preflight_keys[a.key] = (a, rid)
        expected = self._check_fields(
            a,
            approved=True,
            reason=None,
            reservation_id=rid,
            expires_at=_datetime(expires),
            remaining=m.budget(a.customer).remaining,
            limit=customer.limit,
            task_ceiling=task_ceiling,
            task_used=used if has_task else None,
            task_remaining=(
                _remaining(task_ceiling, used + task_reserved + a.estimate) if has_task else None
            ),
        )
        assert _fields(check) == expected

    def _check_replay(self, call: Call, a: PreflightArgs, prior: Reservation) -> None:
        check = self._expect_ok(call)
        customer = self.model.budget(a.customer)
        has_task = a.task_ref is not None
        t = self.model.task(a.customer, a.task_ref) if a.task_ref is not None else Task()
        expected = self._check_fields(
            a,
            approved=True,
            reason=None,
            reservation_id=prior.rid,
            expires_at=_datetime(prior.expires_ms),
            remaining=customer.remaining,
            limit=customer.limit,
            task_ceiling=t.ceiling if has_task else None,
            task_used=t.used if has_task else None,
            task_remaining=_remaining(t.ceiling, t.used + t.reserved) if has_task else None,
            replayed=True,
        )
        assert _fields(check) == expected

    @staticmethod
    def _check_fields(a: PreflightArgs, **values: object) -> dict[str, object]:
        """Every field of a Check; those the model leaves out are their defaults here (no
        periods, rate limits or thresholds in this model)."""
        defaults = {f.name: f.default for f in dataclasses.fields(BaseCheck)}
        return {
            **{name: defaults[name] for name in CHECK_FIELDS},
            "agent_id": a.agent,
            "customer_id": a.customer,
            "estimated_units": a.estimate,
            "task_ref": a.task_ref,
            **values,
        }

    # -- record and release ----------------------------------------------------------------

    @rule(
        pick=picks,
        own_agent=mostly_true,
        task_choice=st.sampled_from(("own", "own", None, *TASKS)),
        name_customer=st.booleans(),
        units=units,
        success=mostly_true,
        key=opt_key,
        metadata=st.sampled_from((None, {"n": 1})),
    )
    def record_by_id(
        self,
        pick: int,
        own_agent: bool,
        task_choice: str | None,
        name_customer: bool,
        units: int,
        success: bool,
        key: str | None,
        metadata: dict[str, int] | None,
    ) -> None:
        r = self._pick(pick)
        if r is None:
            return
        agent = r.agent if own_agent else next(a for a in AGENTS if a != r.agent)
        task_ref = r.task_ref if task_choice == "own" else task_choice
        customer = r.customer if name_customer else None
        args = RecordArgs(customer, agent, units, r.rid, task_ref, success, key, metadata)
        if key is not None:
            self.keyed_records.append(args)
        self._record(args)

    @rule(
        customer=customers,
        agent=agents,
        task_ref=opt_task,
        units=units,
        success=mostly_true,
        key=opt_key,
    )
    def record_oldest(
        self,
        customer: str,
        agent: str,
        task_ref: str | None,
        units: int,
        success: bool,
        key: str | None,
    ) -> None:
        """record() without a reservation id: the oldest open one of its group, else direct."""
        args = RecordArgs(customer, agent, units, None, task_ref, success, key, None)
        if key is not None:
            self.keyed_records.append(args)
        self._record(args)

    @rule(pick=picks, units=units, success=mostly_true, key=opt_key)
    def record_oldest_of_its_group(
        self, pick: int, units: int, success: bool, key: str | None
    ) -> None:
        """record() without an id, for the (customer, agent, task_ref) of a reservation made."""
        r = self._pick(pick)
        if r is None:
            return
        args = RecordArgs(r.customer, r.agent, units, None, r.task_ref, success, key, None)
        if key is not None:
            self.keyed_records.append(args)
        self._record(args)

    @rule(pick=picks)
    def repeat_record(self, pick: int) -> None:
        """The same record key with the same arguments: charges once."""
        if self.keyed_records:
            self._record(self.keyed_records[pick % len(self.keyed_records)])

    def _record(self, a: RecordArgs) -> None:
        m = self.model
        customer = m.reservations[a.reservation_id].customer if a.reservation_id else a.customer
        assert customer is not None
        call = self._call(
            customer,
            lambda: self.client.record(
                a.agent,
                a.units,
                a.customer,
                reservation_id=a.reservation_id,
                task_ref=a.task_ref,
                success=a.success,
                idempotency_key=a.key,
                metadata=a.metadata,
            ),
        )
        c = m.customers[customer]
        if a.key is not None and a.key in c.record_keys:
            first_args, first = c.record_keys[a.key]
            if first_args.fingerprint != a.fingerprint:
                self._expect_error(call, "idempotency_key")
                return
            released = first.released if KNOWN_KEY_REPLAY_REPORTS_FIRST_RELEASED else 0
            outcome = dataclasses.replace(first, released=released, replayed=True)
            self._expect_settlement(call, customer, outcome, a.metadata)
            return
        if a.reservation_id is None:
            group = [
                r for r in m.open_of(customer) if (r.agent, r.task_ref) == (a.agent, a.task_ref)
            ]
            if group:
                oldest = min(group, key=lambda r: r.seq)
                outcome = self._close(oldest, a.units, a.success, named=False)
            elif a.success and a.units > 0:
                m.charge(customer, a.agent, a.task_ref, a.units)
                outcome = Outcome("direct", None, a.units, 0, False)
            else:
                outcome = Outcome("noop", None, 0, 0, False)
            remember = True
        else:
            r = m.reservations[a.reservation_id]
            if r.status == "open":
                if a.agent != r.agent:
                    self._expect_error(call, "agent_id")
                    return
                if a.task_ref is not None and a.task_ref != r.task_ref:
                    self._expect_error(call, "task_ref")
                    return
            outcome, remember = self._settle_named(r, a.units, a.success, a.agent, a.task_ref)
        if remember and a.key is not None:
            c.record_keys[a.key] = (a, outcome)
        self._expect_settlement(call, customer, outcome, a.metadata)

    def _close(self, r: Reservation, units: int, success: bool, named: bool = True) -> Outcome:
        status, charged = ("recorded", units) if success else ("released", 0)
        self.model.close(r, status, charged, named)
        return Outcome(status, r.rid, charged, r.estimate, False)

    def _settle_named(
        self, r: Reservation, units: int, success: bool, agent: str, task_ref: str | None
    ) -> tuple[Outcome, bool]:
        """Close reservation ``r`` by its id (``success`` False: release); (outcome, remembered
        under the record's idempotency key)."""
        charge = success and units > 0
        if r.status == "open":
            return self._close(r, units, success), True
        if charge and (r.status in ("expired", "released") or not r.named):
            # A record is never erased: after an expiry, a release or another's close without
            # an id, its units are charged now, once, flagged late, to the scopes it was
            # reserved on.
            self.model.charge(r.customer, r.agent, None, units)
            if r.task_ref is not None:
                self.model.task(r.customer, r.task_ref).used += units
            r.status, r.charged, r.named = "late", units, True
            return Outcome("late", r.rid, units, 0, True), True
        if r.status in ("unknown", "tombstone"):
            # Never seen (or forgotten): a record charges it directly, flagged late, and
            # remembers it like a close; a release has nothing to give back, answers plainly,
            # and is remembered (a preflight of that id landing later reserves nothing).
            if not charge:
                if r.status == "tombstone":
                    return Outcome("noop", r.rid, 0, 0, False, replayed=True), False
                r.status = "tombstone"
                return Outcome("noop", r.rid, 0, 0, False), True
            self.model.charge(r.customer, agent, task_ref, units)
            r.status, r.charged = "late", units
            return Outcome("late", r.rid, units, 0, True), True
        # Closed before: nothing changes, the first outcome is returned.
        late = r.status in ("late", "expired")
        return Outcome(r.status, r.rid, r.charged, 0, late, replayed=True), False

    @rule(pick=picks, name_customer=st.booleans())
    def release_by_id(self, pick: int, name_customer: bool) -> None:
        r = self._pick(pick)
        if r is None:
            return
        customer = r.customer if name_customer else None
        call = self._call(r.customer, lambda: self.client.release(r.rid, customer_id=customer))
        outcome, _ = self._settle_named(r, 0, False, r.agent, None)
        self._expect_settlement(call, r.customer, outcome)

    @precondition(lambda self: bool(self.keyed_preflights))
    @rule(pick=picks)
    def release_by_key(self, pick: int) -> None:
        """release(idempotency_key=..., customer_id=...) with the key of a preflight made (a
        refused one reserved nothing under it)."""
        a = self.keyed_preflights[pick % len(self.keyed_preflights)]
        assert a.key is not None
        customer, key = a.customer, a.key
        call = self._call(
            customer, lambda: self.client.release(idempotency_key=key, customer_id=customer)
        )
        known = self.model.customers[customer].preflight_keys.get(key)
        if known is None:
            outcome = Outcome("noop", None, 0, 0, False)
        else:
            r = self.model.reservations[known[1]]
            outcome, _ = self._settle_named(r, 0, False, r.agent, None)
        self._expect_settlement(call, customer, outcome)

    @rule(pick=picks, units=units, release=st.booleans())
    def settle_through_check(self, pick: int, units: int, release: bool) -> None:
        """Check.record(units) / Check.release(), as the README's examples use them."""
        r = self._pick(pick)
        if r is None or r.check is None:
            return
        check = r.check
        call = self._call(r.customer, check.release if release else lambda: check.record(units))
        if release:
            outcome, _ = self._settle_named(r, 0, False, r.agent, None)
        else:
            outcome, _ = self._settle_named(r, units, True, r.agent, r.task_ref)
        self._expect_settlement(call, r.customer, outcome)

    @rule(pick=picks, release=st.booleans())
    def name_the_wrong_customer(self, pick: int, release: bool) -> None:
        """A customer_id contradicting the reservation is refused before Redis is asked."""
        r = self._pick(pick)
        if r is None:
            return
        other = next(c for c in CUSTOMERS if c != r.customer)
        settle: Callable[[], object] = (
            (lambda: self.client.release(r.rid, customer_id=other))
            if release
            else (lambda: self.client.record(r.agent, 1, other, reservation_id=r.rid))
        )
        with pytest.raises(InvalidRequestError) as info:
            settle()
        assert info.value.field == "customer_id"

    @rule(customer=customers)
    def unknown_reservation(self, customer: str) -> None:
        """A well-formed id Redis never saw: made while it was unreachable, or forgotten."""
        rid = reservation_id(customer_tag(customer), uuid.uuid4().hex[:24])
        self.model.reservations[rid] = Reservation(
            rid, customer, AGENTS[0], None, 0, 0, 0, status="unknown"
        )

    # -- time ------------------------------------------------------------------------------

    @rule(ms=st.sampled_from((1, 500, 1000, 30_000, 60_000, 3_600_000)))
    def advance_clock(self, ms: int) -> None:
        """Move every customer's script clock ``ms`` forward: reservations expire, some or all.
        (Nothing is returned before the next call for that customer.)"""
        for customer in CUSTOMERS:
            self.raw.hincrby(self.keys.customer(customer).budget, CLOCK_OFFSET, ms)
        self.offset += ms

    @rule(pick=picks)
    def advance_to_an_expiry(self, pick: int) -> None:
        """Move the clock to just before an open reservation's expiry: the next call waits
        for it (see ``_clear_of_expiries``) and lands at that very millisecond, or just after:
        the edge of "expired" (expiry at or before the clock)."""
        due = sorted({r.expires_ms for r in self.model.open_of_all()})
        if due:
            ahead = due[pick % len(due)] - self._now() - MARGIN_MS // 2
            if ahead > 0:
                self.advance_clock(ahead)

    @rule()
    def let_a_second_pass(self) -> None:
        """The 1 s reservations made so far expire (the most common expiry here)."""
        self.advance_clock(1001)

    # -- what Redis holds ------------------------------------------------------------------

    @invariant()
    def redis_holds_what_the_model_holds(self) -> None:
        fields = ("limit", "spent", "reserved", "open")
        for customer in CUSTOMERS:
            ck = self.keys.customer(customer)
            pipe = self.raw.pipeline(transaction=False)
            pipe.hmget(ck.budget, [f"{p}{f}" for p in self._scopes() for f in fields])
            pipe.zrange(ck.exp, 0, -1, withscores=True)
            pipe.hkeys(ck.res)
            pipe.hgetall(ck.tasks)
            budget, exp, res, tasks = pipe.execute()
            for i, agent in enumerate((None, *AGENTS)):
                limit, spent, reserved, open_ = budget[4 * i : 4 * i + 4]
                b = self.model.budget(customer, agent)
                assert (
                    None if limit is None else int(limit),
                    int(spent or 0),
                    int(reserved or 0),
                    int(open_ or 0),
                ) == (b.limit, b.spent, b.reserved, b.open_reservations), (customer, agent)
            open_now = {r.rid: r.expires_ms for r in self.model.open_of(customer)}
            assert {rid: int(score) for rid, score in exp} == open_now
            assert set(res) == set(open_now)
            for task_ref in TASKS:
                d = digest(task_ref)
                t = self.model.task_status(customer, task_ref)
                ceiling = tasks.get(f"{d}:c")
                assert (
                    None if ceiling is None else int(ceiling),
                    int(tasks.get(f"{d}:u", 0)),
                    int(tasks.get(f"{d}:r", 0)),
                    tasks.get(f"{d}:n"),
                ) == (t.ceiling, t.used, t.reserved, task_ref if t.exists else None)

    @staticmethod
    def _scopes() -> tuple[str, ...]:
        """The budget hash's field prefixes: the customer's, then each agent's."""
        return ("", *(f"a:{digest(agent)}:" for agent in AGENTS))


def _fields(check: Any) -> dict[str, object]:
    return {name: getattr(check, name) for name in CHECK_FIELDS}


# -- the test ----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _movable_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    movable_clock(monkeypatch)  # autouse: installed before the clients are built


@contextlib.contextmanager
def _connector(flavour: str, url: str) -> Iterator[Connect]:
    if flavour == "sync":

        def connect_sync(**kwargs: Any) -> tuple[AgentBillClient, Callable[[], object]]:
            client = AgentBillClient(redis_url=url, **kwargs)
            return client, client.close

        yield connect_sync
        return
    with asyncio.Runner() as runner:

        def connect_async(**kwargs: Any) -> tuple[AgentBillClient, Callable[[], object]]:
            aclient = AsyncAgentBillClient(redis_url=url, **kwargs)
            blocking = cast(AgentBillClient, blocking_client(aclient, runner))
            return blocking, lambda: runner.run(aclient.close())

        yield connect_async


EXAMPLES = {"sync": 200, "async": 80}


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_every_operation_agrees_with_the_model(redis_server: RedisServer, flavour: str) -> None:
    with _connector(flavour, redis_server.url) as connect:

        class Machine(BudgetMachine):
            pass

        Machine.server = redis_server
        Machine.connect = connect
        run_state_machine_as_test(
            Machine,
            settings=settings(
                max_examples=EXAMPLES[flavour],
                stateful_step_count=40,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )


# -- known discrepancies (see the KNOWN_* switches at the top) -------------------------------


@pytest.fixture
def client(both_clients: AgentBillClient) -> AgentBillClient:
    return both_clients


def test_a_record_replayed_under_its_key_gives_nothing_back(client: AgentBillClient) -> None:
    """``Settlement.released``: "Reserved units given back by this call". A replay gives back
    nothing (a repeat without the key says 0), but under the key it repeats the first call's."""
    check = client.preflight("a", 5, "c")
    first = client.record("a", 3, "c", reservation_id=check.reservation_id, idempotency_key="k")
    again = client.record("a", 3, "c", reservation_id=check.reservation_id, idempotency_key="k")
    plain = client.record("a", 3, "c", reservation_id=check.reservation_id)
    assert (first.released, plain.released, plain.replayed) == (5, 0, True)
    assert (again.replayed, again.charged) == (True, 3)
    assert again.released == 0


def test_a_refusal_reports_the_ceiling_the_task_has(client: AgentBillClient) -> None:
    """task_ceiling is "ignored for a known task", but a refused Check reports it as the task's
    ceiling (and task_remaining from it) when the task has none, and even with no task_ref."""
    client.open_task("t", None, "c")
    client.set_budget("c", 0)
    with_task = client.preflight("a", 5, "c", task_ref="t", task_ceiling=3)
    no_task = client.preflight("a", 5, "c", task_ceiling=3)
    assert (with_task.reason, no_task.reason) == ("budget_exhausted", "budget_exhausted")
    assert client.get_task("t", "c").ceiling is None
    assert (with_task.task_ceiling, with_task.task_remaining) == (None, None)
    assert no_task.task_ceiling is None


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_key_whose_reservation_is_due_reserves_afresh(
    redis_server: RedisServer, raw: redis.Redis, flavour: str
) -> None:
    """README: a key whose reservation "was released or expired reserves afresh". When more
    reservations are due than ``reap_limit``, one not yet returned is replayed under its key:
    the run goes ahead approved (``expires_at`` already past), and the next call for the
    customer returns the reservation's units, so the run holds nothing."""
    namespace = f"m-{uuid.uuid4().hex[:12]}"
    with _connector(flavour, redis_server.url) as connect:
        client, close = connect(namespace=namespace, reap_limit=1)
        try:
            client.preflight("a", 1, "c", ttl=1)  # due first
            time.sleep(0.005)
            keyed = client.preflight("a", 2, "c", ttl=1, idempotency_key="job")
            raw.hincrby(KeySpace(namespace).customer("c").budget, CLOCK_OFFSET, 2000)
            again = client.preflight("a", 2, "c", ttl=1, idempotency_key="job")
            assert again.approved
            assert (again.replayed, again.reservation_id) != (True, keyed.reservation_id)
        finally:
            close()
