"""The budget model: periods, agent budgets, rate and concurrency limits, thresholds, the ledger
and usage, all decided by the one preflight script against a real redis-server.

Period boundaries are crossed by moving the customer's clock in a test-only variant of the
scripts (tests/_clock.py), never by sleeping. Each test body runs on both clients.
"""

from __future__ import annotations

import multiprocessing as mp
import random
from collections.abc import Callable
from datetime import timedelta
from zoneinfo import ZoneInfo

import pytest
import redis

from agentbill import (
    AgentBillClient,
    BudgetExhaustedError,
    Check,
    ConcurrencyLimitedError,
    InvalidRequestError,
    RateLimitedError,
    ThresholdCrossing,
)
from tests._clock import movable_clock
from tests._clock import shift_clock as move
from tests._processes import CTX
from tests._servers import RedisServer
from tests.conftest import namespace_keys


@pytest.fixture(autouse=True)
def _movable_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    movable_clock(monkeypatch)  # autouse: installed before the clients are built


@pytest.fixture
def client(both_clients: AgentBillClient) -> AgentBillClient:
    return both_clients


def shift_clock(client: AgentBillClient, raw: redis.Redis, customer: str, ms: int) -> None:
    """Move the customer's script clock ``ms`` further (tests only)."""
    move(raw, client.namespace, customer, ms)


def to_period_end(client: AgentBillClient, raw: redis.Redis, customer: str) -> None:
    """Move the customer's clock to 1 ms past its current period's end."""
    budget = client.get_budget(customer)
    assert budget.resets_in is not None
    shift_clock(client, raw, customer, int(budget.resets_in * 1000) + 1)


# -- periods -----------------------------------------------------------------------------------


def test_a_new_period_starts_with_a_fresh_budget_at_the_boundary(
    client: AgentBillClient, raw: redis.Redis
) -> None:
    status = client.set_budget("c1", 10, period="day")
    assert status.period == "day"
    assert status.period_start is not None
    assert status.period_end is not None
    assert status.period_end - status.period_start == timedelta(days=1)
    assert status.period_start.hour == 0
    assert status.period_start.minute == 0
    client.preflight("agent", 8, "c1").record(8)
    assert client.preflight("agent", 5, "c1").reason == "budget_exhausted"
    old_end = status.period_end

    to_period_end(client, raw, "c1")
    fresh = client.get_budget("c1")
    assert (fresh.spent, fresh.reserved, fresh.remaining) == (0, 0, 10)
    assert fresh.period_start == old_end
    assert client.preflight("agent", 5, "c1").approved


def test_a_reservation_is_charged_to_the_period_it_was_made_in(
    client: AgentBillClient, raw: redis.Redis
) -> None:
    client.set_budget("c1", 10, period="hour")
    held = client.preflight("agent", 6, "c1")
    to_period_end(client, raw, "c1")
    assert client.preflight("agent", 10, "c1").approved  # the new hour owes nothing to the old
    held.record(6)
    budget = client.get_budget("c1")
    assert (budget.spent, budget.reserved) == (0, 10)  # the 6 went to the hour before
    key = client._script_settings.keys.customer("c1").budget
    before = held_period(client, raw, "c1")
    assert (raw.hget(key, f"s:{before}"), raw.hget(key, f"r:{before}")) == ("6", "0")
    recorded = [e for e in client.events("c1") if e.type == "recorded"]
    assert [(e.units, e.period) for e in recorded] == [(6, held_period(client, raw, "c1"))]


def held_period(client: AgentBillClient, raw: redis.Redis, customer: str) -> str | None:
    """The id of the customer's latest archived period (its counters kept as s:/r:<id>)."""
    value = raw.hget(client._script_settings.keys.customer(customer).budget, "arch")
    return None if not value else str(value).split(",")[-1].split("@")[0]


@pytest.mark.parametrize("period", ["hour", "day", "week", "month"])
@pytest.mark.parametrize("tz", ["UTC", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe"])
def test_periods_are_calendar_periods_in_the_budgets_time_zone(
    client: AgentBillClient, period: str, tz: str
) -> None:
    status = client.set_budget("c1", 10, period=period, tz=tz)  # type: ignore[arg-type]
    assert status.period_start is not None
    assert status.period_end is not None
    start = status.period_start.astimezone(ZoneInfo(tz))
    end = status.period_end.astimezone(ZoneInfo(tz))
    assert status.period_start < status.period_end
    assert (start.minute, end.minute) == (0, 0)
    if period != "hour":
        assert (start.hour, end.hour) == (0, 0)
    if period == "week":
        assert (start.weekday(), end.weekday()) == (0, 0)
    if period == "month":
        assert (start.day, end.day) == (1, 1)
        assert (end.month - start.month) % 12 == 1
    assert status.resets_in is not None
    assert status.resets_in > 0


def test_a_lifetime_budget_never_resets(client: AgentBillClient, raw: redis.Redis) -> None:
    status = client.set_budget("c1", 10)
    assert (status.period, status.period_end, status.resets_in) == (None, None, None)
    client.preflight("agent", 8, "c1").record(8)
    shift_clock(client, raw, "c1", 400 * 86_400_000)
    assert client.get_budget("c1").spent == 8


# -- agent budgets -----------------------------------------------------------------------------


def test_an_agent_budget_is_checked_in_the_same_step(client: AgentBillClient) -> None:
    client.set_budget("c1", 100)
    client.set_budget("c1", 5, agent_id="writer")
    refused = client.preflight("writer", 6, "c1")
    assert (refused.reason, refused.scope, refused.limit) == ("budget_exhausted", "agent", 5)
    with pytest.raises(BudgetExhaustedError) as info:
        refused.raise_for_refusal()
    assert info.value.scope == "agent"
    assert client.preflight("reader", 6, "c1").approved  # other agents only meet the customer's
    writer = client.preflight("writer", 5, "c1")
    assert writer.approved
    status = client.get_budget("c1", agent_id="writer")
    assert (status.agent_id, status.limit, status.reserved, status.remaining) == (
        "writer",
        5,
        5,
        0,
    )
    assert client.get_budget("c1").reserved == 11


def test_an_agent_budget_without_a_period_counts_in_the_customers(
    client: AgentBillClient, raw: redis.Redis
) -> None:
    client.set_budget("c1", 100, period="day")
    status = client.set_budget("c1", 5, agent_id="writer")
    assert (status.period, status.period_end) == ("day", client.get_budget("c1").period_end)
    client.preflight("writer", 5, "c1").record(5)
    assert client.preflight("writer", 1, "c1").scope == "agent"
    to_period_end(client, raw, "c1")
    assert client.preflight("writer", 5, "c1").approved  # a new day for the agent too


def test_an_agent_budget_can_have_its_own_period(client: AgentBillClient, raw: redis.Redis) -> None:
    client.set_budget("c1", 100, period="month")
    client.set_budget("c1", 5, period="hour", agent_id="writer")
    client.preflight("writer", 5, "c1").record(5)
    assert client.preflight("writer", 1, "c1").scope == "agent"
    shift_clock(client, raw, "c1", 3_600_000)
    assert client.preflight("writer", 5, "c1").approved  # a new hour for the agent
    assert client.get_budget("c1").spent == 5  # the month goes on


# -- rate limits -------------------------------------------------------------------------------


def test_rate_limit_allows_the_burst_then_says_when_to_retry(client: AgentBillClient) -> None:
    client.set_rate_limit("c1", 10, 3600, burst=5)  # one unit every 360 s, bursts of 5
    assert all(client.preflight("agent", 1, "c1").approved for _ in range(5))
    refused = client.preflight("agent", 1, "c1")
    assert (refused.reason, refused.scope, refused.limit) == ("rate_limited", "customer", 10)
    assert refused.retry_after is not None
    assert 355 < refused.retry_after <= 360
    again = client.preflight("agent", 1, "c1")  # a refusal consumed nothing
    assert again.retry_after is not None
    assert again.retry_after <= refused.retry_after
    with pytest.raises(RateLimitedError) as info:
        again.raise_for_refusal()
    assert info.value.retry_after == again.retry_after
    too_big = client.preflight("agent", 6, "c1")  # above the burst: waiting never helps
    assert (too_big.reason, too_big.retry_after) == ("rate_limited", None)


def test_rate_limit_refills_over_time(client: AgentBillClient, raw: redis.Redis) -> None:
    client.set_rate_limit("c1", 10, 3600, burst=2)
    assert client.preflight("agent", 2, "c1").approved
    assert not client.preflight("agent", 1, "c1").approved
    shift_clock(client, raw, "c1", 360_000)  # one unit's emission interval
    assert client.preflight("agent", 1, "c1").approved
    assert not client.preflight("agent", 1, "c1").approved


def test_agent_rate_limit(client: AgentBillClient) -> None:
    client.set_rate_limit("c1", 100, 60, agent_id="chatty", burst=3)
    assert client.preflight("chatty", 3, "c1").approved
    refused = client.preflight("chatty", 1, "c1")
    assert (refused.reason, refused.scope) == ("rate_limited", "agent")
    assert client.preflight("quiet", 3, "c1").approved
    client.set_rate_limit("c1", None, None, agent_id="chatty")  # removed
    assert client.preflight("chatty", 50, "c1").approved


def _rate_racer(url: str, namespace: str, tries: int, out: mp.Queue[int]) -> None:
    with AgentBillClient(redis_url=url, namespace=namespace) as client:
        out.put(sum(client.preflight("agent", 1, "hot").approved for _ in range(tries)))


def test_racing_processes_get_exactly_the_rate_limits_burst(
    redis_server: RedisServer, namespace: str
) -> None:
    """10 processes x 20 asks against a burst of 37 (and one unit a day after it)."""
    with AgentBillClient(redis_url=redis_server.url, namespace=namespace) as admin:
        admin.set_rate_limit("hot", 1, 86_400, burst=37)
    out: mp.Queue[int] = CTX.Queue()
    procs = [
        CTX.Process(target=_rate_racer, args=(redis_server.url, namespace, 20, out))
        for _ in range(10)
    ]
    for p in procs:
        p.start()
    approved = sum(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert approved == 37


# -- concurrency limits ------------------------------------------------------------------------


def test_concurrency_limit_counts_runs_in_flight(client: AgentBillClient) -> None:
    client.set_concurrency_limit("c1", 2)
    first = client.preflight("a", 1, "c1")
    client.preflight("b", 1, "c1")
    refused = client.preflight("c", 1, "c1")
    assert (refused.reason, refused.scope, refused.limit, refused.used) == (
        "concurrency_limited",
        "customer",
        2,
        2,
    )
    with pytest.raises(ConcurrencyLimitedError):
        refused.raise_for_refusal()
    first.release()
    assert client.preflight("c", 1, "c1").approved
    assert client.get_budget("c1").max_in_flight == 2


def test_agent_concurrency_limit(client: AgentBillClient) -> None:
    client.set_concurrency_limit("c1", 1, agent_id="solo")
    held = client.preflight("solo", 1, "c1")
    assert client.preflight("solo", 1, "c1").scope == "agent"
    assert client.preflight("other", 1, "c1").approved
    held.record(1)
    assert client.preflight("solo", 1, "c1").approved


# -- every rule refuses without changing anything ----------------------------------------------


def test_a_refusal_by_any_rule_changes_no_counter(
    both_clients: AgentBillClient, raw: redis.Redis, namespace: str, redis_server: RedisServer
) -> None:
    client = both_clients
    client.set_budget("c1", 100, period="month")
    client.set_budget("c1", 20, agent_id="capped")
    client.set_rate_limit("c1", 10, 3600, burst=10, agent_id="rated")
    client.set_concurrency_limit("c1", 1, agent_id="single")
    client.open_task("t", 5, "c1")
    client.preflight("single", 1, "c1")
    client.preflight("rated", 10, "c1")
    asks: dict[str, Callable[[], Check]] = {
        "task_ceiling_exceeded": lambda: client.preflight("x", 6, "c1", task_ref="t"),
        "budget_exhausted": lambda: client.preflight("x", 90, "c1"),
        "agent": lambda: client.preflight("capped", 21, "c1"),
        "rate_limited": lambda: client.preflight("rated", 1, "c1"),
        "concurrency_limited": lambda: client.preflight("single", 1, "c1"),
    }
    for name, ask in asks.items():
        before = namespace_keys(raw, namespace)
        check = ask()
        assert not check.approved, name
        assert namespace_keys(raw, namespace) == before, name
    with AgentBillClient(redis_url=redis_server.url, namespace=namespace, ceiling=3) as capped:
        before = namespace_keys(raw, namespace)
        assert capped.preflight("x", 4, "c1").reason == "ceiling_exceeded"
        assert namespace_keys(raw, namespace) == before


# -- thresholds --------------------------------------------------------------------------------


def test_thresholds_fire_once_per_period(
    redis_server: RedisServer, namespace: str, raw: redis.Redis
) -> None:
    seen: list[ThresholdCrossing] = []
    with AgentBillClient(
        redis_url=redis_server.url, namespace=namespace, on_threshold=seen.append
    ) as client:
        client.set_budget("c1", 100, period="day", thresholds=(50, 80))
        first = client.preflight("agent", 60, "c1")
        assert [(c.percent, c.committed) for c in first.crossed] == [(50, 60)]
        client.preflight("agent", 10, "c1")
        first.record(75)  # committed 85: crosses 80 on the record
        assert [c.percent for c in seen] == [50, 80]
        client.preflight("agent", 1, "c1")
        assert len(seen) == 2  # once per period
        to_period_end(client, raw, "c1")
        client.preflight("agent", 55, "c1")
        assert [c.percent for c in seen] == [50, 80, 50]
        events = [e for e in client.events("c1") if e.type == "threshold"]
        assert [e.reason for e in events] == ["50", "80", "50"]


def test_a_failing_threshold_callback_never_breaks_the_run(
    redis_server: RedisServer, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(crossing: ThresholdCrossing) -> None:
        raise RuntimeError("pager down")

    with AgentBillClient(redis_url=redis_server.url, namespace=namespace, on_threshold=boom) as c:
        c.set_budget("c1", 10, thresholds=(50,))
        assert c.preflight("agent", 6, "c1").approved
    assert "on_threshold raised" in caplog.text


# -- ledger and usage --------------------------------------------------------------------------


def test_every_decision_and_settlement_is_in_the_ledger(client: AgentBillClient) -> None:
    client.set_budget("c1", 10)
    a = client.preflight("agent", 4, "c1", task_ref="t")
    client.preflight("agent", 20, "c1")  # refused
    b = client.preflight("other", 3, "c1")
    a.record(2)
    b.release()
    client.record("agent", 1, "c1")  # direct
    events = client.events("c1")
    assert [(e.type, e.agent_id, e.units, e.released, e.reason) for e in events] == [
        ("approved", "agent", 4, 0, None),
        ("refused", "agent", 20, 0, "budget_exhausted"),
        ("approved", "other", 3, 0, None),
        ("recorded", "agent", 2, 4, "recorded"),
        ("released", "other", 0, 3, "released"),
        ("recorded", "agent", 1, 0, "direct"),
    ]
    assert events[0].reservation_id == a.reservation_id
    assert events[0].task_ref == "t"
    assert events[1].scope == "customer"
    assert [e.id for e in client.events("c1", since=events[3].id)] == [e.id for e in events[4:]]
    assert len(client.events("c1", limit=2)) == 2


def test_usage_says_who_holds_what(client: AgentBillClient) -> None:
    client.set_budget("c1", 50, period="week")
    client.set_budget("c1", 10, agent_id="writer")
    client.preflight("writer", 4, "c1")
    client.preflight("reader", 7, "c1").record(5)
    usage = client.get_usage("c1")
    assert (usage.customer.spent, usage.customer.reserved, usage.customer.remaining) == (5, 4, 41)
    by_agent = {
        a.agent_id: (a.limit, a.spent, a.reserved, a.open_reservations) for a in usage.agents
    }
    assert by_agent == {"reader": (None, 5, 0, 0), "writer": (10, 0, 4, 1)}


def _ledger_worker(url: str, namespace: str, seed: int, ops: int) -> None:
    rng = random.Random(seed)
    with AgentBillClient(redis_url=url, namespace=namespace, reservation_ttl=1) as client:
        held: list[Check] = []
        for _ in range(ops):
            customer = f"c{rng.randrange(2)}"
            roll = rng.random()
            if roll < 0.45 or not held:
                check = client.preflight(f"agent{rng.randrange(3)}", rng.randrange(1, 9), customer)
                if check.approved:
                    held.append(check)
            elif roll < 0.75:
                held.pop(rng.randrange(len(held))).record(rng.randrange(0, 12))
            elif roll < 0.9:
                held.pop(rng.randrange(len(held))).release()
            else:
                client.record(f"agent{rng.randrange(3)}", rng.randrange(1, 5), customer)


def test_replaying_the_ledger_gives_the_counters(redis_server: RedisServer, namespace: str) -> None:
    """4 processes, 2500 mixed operations (some reservations left to expire)."""
    with AgentBillClient(redis_url=redis_server.url, namespace=namespace) as admin:
        admin.set_budget("c0", 400)
        admin.set_budget("c1", 300)
    procs = [
        CTX.Process(target=_ledger_worker, args=(redis_server.url, namespace, seed, 625))
        for seed in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        assert p.exitcode == 0
    with AgentBillClient(redis_url=redis_server.url, namespace=namespace) as admin:
        for customer in ("c0", "c1"):
            budget = admin.get_budget(customer)
            spent = reserved = 0
            for e in admin.events(customer):
                if e.type == "approved":
                    reserved += e.units
                elif e.type in ("recorded", "released", "expired"):
                    spent += e.units if e.type == "recorded" else 0
                    reserved -= e.released
            assert (spent, reserved) == (budget.spent, budget.reserved), customer
            assert len(admin.events(customer)) > 500


# -- policy input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda c: c.set_budget("c1", 5, period="year"), "period"),
        (lambda c: c.set_budget("c1", 5, period="day", tz="Mars/Olympus"), "tz"),
        (lambda c: c.set_budget("c1", 5, thresholds=(0,)), "thresholds.0"),
        (lambda c: c.set_budget("c1", 5, agent_id=""), "agent_id"),
        (lambda c: c.set_rate_limit("c1", 0, 60), "units"),
        (lambda c: c.set_rate_limit("c1", 5, None), "per_seconds"),
        (lambda c: c.set_rate_limit("c1", 5, 60, burst=0), "burst"),
        (lambda c: c.set_concurrency_limit("c1", -1), "max_in_flight"),
        (lambda c: c.events("c1", since="yesterday"), "since"),
        (lambda c: c.events("c1", limit=0), "limit"),
    ],
)
def test_bad_policy_input_names_the_field_and_writes_nothing(
    client: AgentBillClient, raw: redis.Redis, namespace: str, call: object, field: str
) -> None:
    before = namespace_keys(raw, namespace, ledger=True)
    with pytest.raises(InvalidRequestError) as info:
        call(client)  # type: ignore[operator]
    assert info.value.field == field
    assert namespace_keys(raw, namespace, ledger=True) == before
