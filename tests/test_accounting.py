"""Accounting truth (issue 16): every unit a run reports is charged exactly once, and a script
that refuses a request writes nothing. Each test is written from a reproduction of a finding
against real redis-server processes (the finding's number is in the test's docstring).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import redis

from agentbill import AgentBillClient, Preflight
from agentbill._check import BaseCheck
from agentbill._keys import KeySpace, customer_tag, reservation_id
from agentbill._models import MAX_UNITS
from agentbill._scripts import OPERATIONS, installed, lua_dir
from agentbill._zones import zone_table
from tests._clock import movable_clock, shift_clock
from tests._servers import RedisServer, running
from tests.test_concurrency import run_processes


@pytest.fixture
def client(both_clients: AgentBillClient) -> AgentBillClient:
    return both_clients


@pytest.fixture
def other(redis_server: RedisServer, client: AgentBillClient) -> Iterator[AgentBillClient]:
    """A second client on the same namespace: another worker."""
    with AgentBillClient(redis_url=redis_server.url, namespace=client.namespace) as c:
        yield c


def dump(raw: redis.Redis, namespace: str) -> dict[str, object]:
    """Every key of a namespace, as DUMP (value and type) and TTL presence."""
    return {
        key: (raw.dump(key), raw.pttl(key) > 0)
        for key in sorted(raw.scan_iter(match=f"{namespace}:*", count=1000))
    }


# -- 1: records without an id ------------------------------------------------------------------


def test_a_record_without_an_id_never_makes_another_workers_usage_disappear(
    client: AgentBillClient, other: AgentBillClient
) -> None:
    """Finding 1: worker X's record without an id closed worker Y's reservation, and Y's own
    record came back replayed with X's outcome: 51 units used, 1 charged."""
    held = client.preflight("agent", 50, "u")
    direct = other.record("agent", 1, "u")  # X has no reservation of its own
    assert direct.charged == 1
    mine = held.record(50)
    assert (mine.status, mine.charged, mine.replayed, mine.late) == ("late", 50, False, True)
    budget = client.get_budget("u")
    assert (budget.spent, budget.reserved, budget.open_reservations) == (51, 0, 0)


def test_a_release_without_an_id_does_not_erase_the_owners_record(
    client: AgentBillClient, other: AgentBillClient
) -> None:
    """Finding 1: with X's ``record(agent, 0, u, success=False)``, Y's 50 were never charged."""
    held = client.preflight("agent", 50, "u")
    other.record("agent", 0, "u", success=False)
    assert held.record(50).charged == 50
    assert client.get_budget("u").spent == 50


def test_a_record_without_an_id_closes_this_clients_own_reservation_first(
    client: AgentBillClient, other: AgentBillClient
) -> None:
    """Design: a record without an id closes one this same client made before the group's
    oldest (which here is the other worker's)."""
    theirs = other.preflight("agent", 7, "u")
    mine = client.preflight("agent", 5, "u")
    closed = client.record("agent", 4, "u")
    assert (closed.status, closed.reservation_id, closed.charged) == (
        "recorded",
        mine.reservation_id,
        4,
    )
    assert theirs.record(7).status == "recorded"  # untouched until its owner records it
    budget = client.get_budget("u")
    assert (budget.spent, budget.reserved) == (11, 0)


def test_a_record_without_an_id_that_failed_closed_nothing_of_this_clients(
    client: AgentBillClient,
) -> None:
    """A refused record (a reused idempotency key) must not make the client forget the
    reservation it meant to close: the next one closes the oldest (the model test found it)."""
    from agentbill import InvalidRequestError

    client.record("someone-else", 0, "u", idempotency_key="k")
    oldest = client.preflight("agent", 5, "u")
    client.preflight("agent", 5, "u")
    with pytest.raises(InvalidRequestError):
        client.record("agent", 1, "u", idempotency_key="k")
    assert client.record("agent", 1, "u").reservation_id == oldest.reservation_id


def test_the_readme_pattern_preflight_then_record_without_an_id(client: AgentBillClient) -> None:
    check = client.preflight("my_agent", 10, "user_123")
    settled = client.record("my_agent", 8, "user_123")
    assert (settled.status, settled.reservation_id) == ("recorded", check.reservation_id)
    assert client.get_budget("user_123").spent == 8


def _mixed_worker(url: str, namespace: str, seed: int, runs: int) -> int:
    """Preflights and records, half by the Check, half without an id; returns the units it
    reported (each record's units, whatever the reply)."""
    rng = random.Random(seed)
    reported = 0
    with AgentBillClient(redis_url=url, namespace=namespace) as c:
        for _ in range(runs):
            check = c.preflight("agent", 5, "u")
            assert check.approved
            used = rng.randint(0, 9)
            if rng.random() < 0.5:
                check.record(used)
            else:
                c.record("agent", used, "u")
            reported += used
    return reported


@pytest.mark.slow
def test_racing_workers_mixing_records_with_and_without_ids_are_charged_exactly(
    redis_server: RedisServer, namespace: str
) -> None:
    """Finding 1, under a race of 6 processes: every unit reported is charged once."""
    reported = run_processes(
        _mixed_worker, [(redis_server.url, namespace, seed, 60) for seed in range(6)]
    )
    with AgentBillClient(redis_url=redis_server.url, namespace=namespace) as c:
        budget = c.get_budget("u")
    assert (budget.spent, budget.reserved, budget.open_reservations) == (sum(reported), 0, 0)


# -- 8: a release never erases a record -------------------------------------------------------


def test_a_record_after_a_release_by_key_is_charged(client: AgentBillClient) -> None:
    """Finding 8: two deliveries share a reservation through the key; the failed one releases
    by key, then the successful one records: it used to answer ``released, charged 0``."""
    first = client.preflight("agent", 10, "u", idempotency_key="job-1")
    second = client.preflight("agent", 10, "u", idempotency_key="job-1")
    assert second.replayed
    assert second.reservation_id == first.reservation_id
    assert client.release(idempotency_key="job-1", customer_id="u").status == "released"
    done = second.record(7)
    assert (done.status, done.charged, done.replayed) == ("late", 7, False)
    assert client.get_budget("u").spent == 7


def test_a_release_after_a_record_changes_nothing(client: AgentBillClient) -> None:
    check = client.preflight("agent", 10, "u")
    check.record(7)
    again = check.release()
    assert (again.status, again.charged, again.replayed) == ("recorded", 7, True)
    assert check.record(7).replayed  # a second record of a recorded run: charged once
    assert client.get_budget("u").spent == 7


def test_a_record_after_its_expiry_is_charged_once(
    redis_server: RedisServer, namespace: str, raw: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    movable_clock(monkeypatch)
    with AgentBillClient(redis_url=redis_server.url, namespace=namespace) as c:
        check = c.preflight("agent", 10, "u", ttl=1)
        shift_clock(raw, namespace, "u", 2000)
        assert c.get_budget("u").reserved == 0
        late = check.record(4)
        assert (late.status, late.charged, late.late) == ("late", 4, True)
        assert check.record(4).replayed
        assert c.get_budget("u").spent == 4


# -- 7: ids Redis never saw, and no test hook in production ------------------------------------


def test_releasing_an_id_redis_never_saw_answers_plainly(client: AgentBillClient) -> None:
    """Finding 7: a never-issued id was answered ``noop`` with ``late=True``."""
    rid = reservation_id(customer_tag("u"), "0" * 24)
    settled = client.release(rid)
    assert (settled.status, settled.late, settled.charged, settled.replayed) == (
        "noop",
        False,
        0,
        False,
    )
    assert client.record("agent", 3, "u", reservation_id=rid).status == "late"
    assert client.get_budget("u").spent == 3


def test_a_preflight_landing_after_its_release_reserves_nothing(
    client: AgentBillClient, raw: redis.Redis
) -> None:
    """A cancelled caller releases the id its preflight would create before the preflight
    lands (another connection): the preflight must not reserve then."""
    from agentbill import _core

    plan = _core.plan_preflight(
        client._script_settings, "agent", 10, "u", None, None, None, None, BaseCheck
    )
    assert plan.reservation_id is not None
    client.release(plan.reservation_id)
    keys, args = plan.call.keys, plan.call.args
    raw.fcall(installed().function("preflight"), len(keys), *keys, *args)  # loaded by release
    assert client.get_budget("u").reserved == 0


def test_the_production_scripts_read_no_clock_hook(
    client: AgentBillClient, raw: redis.Redis
) -> None:
    """Finding 7: anyone who could HSET the budget hash moved that customer's clock."""
    client.set_budget("u", 10, period="day")
    before = client.get_budget("u")
    raw.hset(client._script_settings.keys.customer("u").budget, "_clock_offset", 3 * 86_400_000)
    after = client.get_budget("u")
    assert after.period_start == before.period_start
    for name in (*OPERATIONS, "_common"):
        assert "_clock_offset" not in (lua_dir() / f"{name}.lua").read_text()


# -- 5: scripts validate before they write ----------------------------------------------------


ERROR = re.compile(r"'AGENTBILL (\w+)(?: (\w+))?'")


def test_every_error_a_script_can_answer_is_listed_in_its_header_and_provoked_here() -> None:
    """The scripts' headers list every error they answer; the tests below provoke each one,
    with due reservations present, and prove that nothing was written (reaping included)."""
    listed = set()
    for name in OPERATIONS:
        text = (lua_dir() / f"{name}.lua").read_text()
        raised = {m.group(1) for m in ERROR.finditer(text)}
        header = text.split("\nlocal ", 1)[0]
        for code in raised:
            assert f"AGENTBILL {code}" in header, (name, code)
        listed |= {(name, code) for code in raised}
    assert listed == {
        ("preflight", "idempotency_conflict"),
        ("preflight", "overflow"),
        ("settle", "idempotency_conflict"),
        ("settle", "agent_mismatch"),
        ("settle", "task_mismatch"),
        ("settle", "overflow"),
        ("extend", "not_open"),  # these three: tests/test_extend.py
        ("extend", "agent_mismatch"),
        ("extend", "overflow"),
    }


@pytest.fixture
def due(
    redis_server: RedisServer, namespace: str, raw: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> Iterator[AgentBillClient]:
    """A client whose customer "u" has a reservation past its expiry, not yet returned, and an
    outcome past its retention: a script that reaps first would write."""
    movable_clock(monkeypatch)
    with AgentBillClient(
        redis_url=redis_server.url, namespace=namespace, idempotency_ttl=1, outcome_retention=1
    ) as c:
        c.preflight("old", 1, "u", ttl=1).record(1)
        c.preflight("old", 1, "u", ttl=1)
        shift_clock(raw, namespace, "u", 5000)
        yield c


def _refused_without_a_write(
    raw: redis.Redis, c: AgentBillClient, field: str, call: object
) -> None:
    from agentbill import InvalidRequestError

    before = dump(raw, c.namespace)
    with pytest.raises(InvalidRequestError) as info:
        call()  # type: ignore[operator]
    assert info.value.field == field
    assert dump(raw, c.namespace) == before


def test_preflight_refuses_an_idempotency_conflict_without_writing(
    due: AgentBillClient, raw: redis.Redis
) -> None:
    due.preflight("agent", 1, "u", idempotency_key="k")
    shift_clock(raw, due.namespace, "u", 0)
    _refused_without_a_write(
        raw,
        due,
        "idempotency_key",
        lambda: due.preflight("agent", 2, "u", idempotency_key="k"),
    )


def test_preflight_refuses_an_overflow_without_writing(
    due: AgentBillClient, raw: redis.Redis
) -> None:
    """Finding 5: a counter past 2**53 - 1 is refused before anything is written."""
    due.preflight("agent", MAX_UNITS - 1, "u")
    _refused_without_a_write(raw, due, "estimated_units", lambda: due.preflight("agent", 5, "u"))


def test_settle_refuses_an_overflow_without_writing(due: AgentBillClient, raw: redis.Redis) -> None:
    """Finding 5: a settle that overflowed had already decremented ``reserved``; a later
    release then drove it to -5."""
    spent = due.get_budget("u").spent
    due.record("agent", MAX_UNITS - spent, "u")  # direct: spent is at the top
    check = due.preflight("agent", 5, "u")
    _refused_without_a_write(raw, due, "units", lambda: check.record(5))
    released = check.release()
    assert released.status == "released"
    budget = due.get_budget("u")
    assert (budget.spent, budget.reserved) == (MAX_UNITS, 0)


def test_settle_refuses_mismatches_and_conflicts_without_writing(
    due: AgentBillClient, raw: redis.Redis
) -> None:
    check = due.preflight("agent", 5, "u", task_ref="t")
    _refused_without_a_write(
        raw, due, "agent_id", lambda: due.record("other", 1, reservation_id=check.reservation_id)
    )
    _refused_without_a_write(
        raw,
        due,
        "task_ref",
        lambda: due.record("agent", 1, reservation_id=check.reservation_id, task_ref="x"),
    )
    due.record("agent", 1, "u", idempotency_key="r")
    _refused_without_a_write(
        raw, due, "idempotency_key", lambda: due.record("agent", 2, "u", idempotency_key="r")
    )


# -- 6: bounded memory --------------------------------------------------------------------------


def test_a_customers_keys_expire_after_its_idle_retention(
    client: AgentBillClient, raw: redis.Redis
) -> None:
    """Finding 6: per-customer keys never expired. Without a policy every key has a TTL; with
    a budget set, the budget hash and its open reservations have none."""
    client.preflight("agent", 5, "free", task_ref="t").record(3)
    client.preflight("agent", 5, "free")
    ttl = {k: raw.pttl(k) for k in raw.scan_iter(match=f"{client.namespace}:*")}
    assert ttl
    assert all(0 < t <= 90 * 86_400_000 for t in ttl.values()), ttl
    keys = client._script_settings.keys.customer("free")
    assert 0 < raw.pttl(keys.closed) <= 86_400_000  # outcomes: the retention

    client.set_budget("paid", 100)
    client.preflight("agent", 5, "paid")
    paid = client._script_settings.keys.customer("paid")
    assert raw.pttl(paid.budget) == -1
    assert raw.pttl(paid.res) == -1
    assert raw.pttl(paid.ledger) > 0


def test_a_budget_set_after_runs_keeps_their_keys_for_good(
    client: AgentBillClient, raw: redis.Redis
) -> None:
    """Keys written before a budget was set carry a TTL; setting it removes their TTL, and
    the runs after it (which skip persisting what has no TTL) give them none."""
    client.preflight("agent", 5, "late")
    keys = client._script_settings.keys.customer("late")
    kept = (keys.budget, keys.res, keys.exp, keys.open)
    assert all(raw.pttl(k) > 0 for k in kept)
    client.set_budget("late", 100)
    client.preflight("agent", 5, "late").record(2)
    client.preflight("agent", 5, "late")
    assert [raw.pttl(k) for k in kept] == [-1] * len(kept)
    assert raw.pttl(keys.ledger) > 0


def test_an_idle_customers_outcomes_are_forgotten_on_a_ttl(
    redis_server: RedisServer, namespace: str, raw: redis.Redis
) -> None:
    """Finding 6: outcomes were only reaped by that customer's next call."""
    with AgentBillClient(
        redis_url=redis_server.url, namespace=namespace, idempotency_ttl=1, outcome_retention=1
    ) as c:
        c.preflight("agent", 5, "u").record(5)
    closed = KeySpace(namespace).customer("u").closed
    assert raw.exists(closed)
    assert 0 < raw.pttl(closed) <= 1000  # Redis itself forgets it: no call needed


def test_idle_tasks_are_forgotten_after_their_retention(
    redis_server: RedisServer, namespace: str, raw: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 6: 10k unique task refs left 30,000 fields in the tasks hash, forever."""
    movable_clock(monkeypatch)
    with AgentBillClient(
        redis_url=redis_server.url, namespace=namespace, task_retention=60, reap_limit=100
    ) as c:
        for i in range(250):
            c.record("agent", 1, "u", task_ref=f"task-{i}")
        open_one = c.preflight("agent", 1, "u", task_ref="still-running", ttl=3600)
        tasks = KeySpace(namespace).customer("u").tasks
        assert raw.hlen(tasks) == 250 * 2 + 2
        shift_clock(raw, namespace, "u", 61_000)
        for _ in range(3):  # at most reap_limit tasks are forgotten per call
            c.get_budget("u")
        assert raw.hlen(tasks) == 2  # the task with a run still open stays
        assert c.get_task("task-7", "u").exists is False
        open_one.record(1)
        assert c.get_task("still-running", "u").used == 1


# -- 14: a budget's period changed and back -----------------------------------------------------


@pytest.fixture
def timed(
    redis_server: RedisServer, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[AgentBillClient]:
    movable_clock(monkeypatch)
    with AgentBillClient(redis_url=redis_server.url, namespace=namespace) as c:
        yield c


def test_changing_a_period_and_back_neither_loses_nor_double_counts(
    timed: AgentBillClient,
) -> None:
    """Finding 14: day -> hour -> day gave the day back with spent 0 and reserved 0, and the
    day ended at spent 150, reserved -50 against a limit of 100."""
    c = timed
    c.set_budget("P", 100, period="day")
    held = c.preflight("agent", 50, "P")
    c.set_budget("P", 100, period="hour")
    c.preflight("agent", 10, "P").record(10)  # rolls the counters to the hour
    day = c.set_budget("P", 100, period="day")
    assert (day.spent, day.reserved) == (0, 50)
    assert c.preflight("agent", 100, "P").reason == "budget_exhausted"
    held.record(50)
    assert c.preflight("agent", 50, "P").approved
    end = c.get_budget("P")
    assert (end.spent, end.reserved, end.remaining) == (50, 50, 0)


def test_a_time_zone_change_with_a_reservation_open_keeps_its_charge(
    timed: AgentBillClient, raw: redis.Redis
) -> None:
    c = timed
    c.set_budget("Z", 100, period="day", tz="Pacific/Kiritimati")  # UTC+14
    held = c.preflight("agent", 30, "Z")
    c.set_budget("Z", 100, period="day", tz="Pacific/Pago_Pago")  # UTC-11: another day id
    c.preflight("agent", 1, "Z").release()
    held.record(30)
    back = c.set_budget("Z", 100, period="day", tz="Pacific/Kiritimati")
    assert (back.spent, back.reserved) == (30, 0)


def test_a_settle_finds_its_period_after_the_next_period_started(
    timed: AgentBillClient, raw: redis.Redis
) -> None:
    c = timed
    c.set_budget("H", 10, period="hour")
    held = c.preflight("agent", 6, "H")
    for _ in range(3):  # three hours later, three roll-overs
        shift_clock(raw, c.namespace, "H", int(c.get_budget("H").resets_in * 1000) + 1)  # type: ignore[operator]
        c.preflight("agent", 1, "H").record(1)
    held.record(6)
    recorded = [e for e in c.events("H") if e.type == "recorded"]
    assert recorded[-1].units == 6
    assert recorded[-1].period == held_period(c, raw, "H", 0)


def held_period(c: AgentBillClient, raw: redis.Redis, customer: str, index: int) -> str:
    arch = str(raw.hget(c._script_settings.keys.customer(customer).budget, "arch"))
    return arch.split(",")[index].split("@")[0]


# -- 15: a rate limit changed takes effect at once ---------------------------------------------


def test_raising_a_rate_limit_takes_effect_on_the_next_preflight(client: AgentBillClient) -> None:
    """Finding 15: after a 1-per-hour limit was used up, 1000 per second still refused with
    retry_after ~3599 s."""
    client.set_rate_limit("A", 1, 3600, burst=1)
    assert client.preflight("agent", 1, "A").approved
    assert client.preflight("agent", 1, "A").reason == "rate_limited"
    client.set_rate_limit("A", 1000, 1)
    assert client.preflight("agent", 1, "A").approved


def test_lowering_a_rate_limit_takes_effect_on_the_next_preflight(client: AgentBillClient) -> None:
    client.set_rate_limit("A", 1000, 1)
    assert client.preflight("agent", 500, "A").approved
    client.set_rate_limit("A", 1, 3600, burst=100)
    refused = client.preflight("agent", 1, "A")
    assert refused.reason == "rate_limited"
    assert refused.retry_after is not None
    assert refused.retry_after > 3600


# -- 16: thresholds ----------------------------------------------------------------------------


def test_a_rolled_back_batch_does_not_use_up_a_threshold(client: AgentBillClient) -> None:
    """Finding 16: a preflight_many batch rolled back by an idempotency conflict wrote the
    threshold event of its released item and used the threshold up for the period."""
    from agentbill import InvalidRequestError

    client.set_budget("T", 100, thresholds=(50,))
    client.preflight("agent", 1, "T", idempotency_key="used")
    with pytest.raises(InvalidRequestError):
        client.preflight_many(
            [
                Preflight("agent", 60, "T"),
                Preflight("agent", 2, "T", idempotency_key="used"),  # a conflict: rolls back
            ]
        )
    assert [e for e in client.events("T") if e.type == "threshold"] == []
    crossing = client.preflight("agent", 60, "T")
    assert [c.percent for c in crossing.crossed] == [50]
    assert len([e for e in client.events("T") if e.type == "threshold"]) == 1


def test_an_agent_threshold_crossed_by_a_record_names_the_agent(client: AgentBillClient) -> None:
    """Finding 16: it was reported as the customer's (agent_id None)."""
    client.set_budget("T", 100, agent_id="writer", thresholds=(50,))
    check = client.preflight("writer", 10, "T")
    settled = check.record(80)
    assert [(c.agent_id, c.percent) for c in settled.crossed] == [("writer", 50)]


# -- 17 and 7: periods in time zones, computed by the script ------------------------------------


def _local(zone: ZoneInfo, ms: int) -> int:
    offset = datetime.fromtimestamp(ms / 1000, tz=UTC).astimezone(zone).utcoffset()
    assert offset is not None
    return ms + int(offset.total_seconds() * 1000)


def _bucket(kind: str, local_ms: int) -> int:
    day = local_ms // 86_400_000
    if kind == "hour":
        return local_ms // 3_600_000
    if kind == "day":
        return day
    if kind == "week":
        return (day + 3) // 7
    d = datetime(1970, 1, 1) + timedelta(days=day)
    return d.year * 12 + d.month


def reference_period(kind: str, tz: str, now: int) -> tuple[int, int]:
    """The period containing ``now``, found the slow way: walk the wall clock out from
    ``now`` in 5-minute steps until its calendar bucket changes (or, for hours, the clock
    jumps back), then bisect that step to the millisecond."""
    zone = ZoneInfo(tz)
    here = _bucket(kind, _local(zone, now))

    def inside(u: int) -> bool:
        return _bucket(kind, _local(zone, u)) == here

    def continuous(a: int, b: int) -> bool:  # for hours, a jump back starts a new period
        return kind != "hour" or _local(zone, b) - _local(zone, a) == b - a

    step = 300_000
    edge = now
    while inside(edge - step) and continuous(edge - step, edge):
        edge -= step
    lo, hi = edge - step, edge  # the period starts in (lo, hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if inside(mid) and continuous(mid, edge):
            hi = mid
        else:
            lo = mid
    start = hi
    edge = now
    while inside(edge + step) and continuous(edge, edge + step):
        edge += step
    lo, hi = edge, edge + step  # the period ends in (lo, hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if inside(mid) and continuous(edge, mid):
            lo = mid
        else:
            hi = mid
    return start, hi


ZONES = (
    "America/New_York",
    "Australia/Lord_Howe",
    "Asia/Beirut",
    "America/Havana",
    "Africa/Cairo",
    "America/Santiago",
    "Asia/Kathmandu",
    "Europe/Berlin",
)


def _transitions(tz: str) -> list[int]:
    table = zone_table(tz)
    return [int(entry.split(":")[0]) for entry in table.split(",")[1:5]]


@pytest.mark.parametrize("tz", ZONES)
def test_periods_around_clock_changes_match_the_calendar(
    redis_server: RedisServer,
    namespace: str,
    raw: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    tz: str,
) -> None:
    """Findings 7 and 17: period_start was an hour early on days where DST begins at midnight
    (Beirut, Havana, Cairo, Santiago), and a repeated wall-clock hour made one two-hour period
    of an hour budget. Around each clock change, every kind of period the script computes
    matches the calendar, found here the slow way from the zone database."""
    movable_clock(monkeypatch)
    rng = random.Random(tz)
    with AgentBillClient(redis_url=redis_server.url, namespace=namespace) as c:
        for kind in ("hour", "day", "week", "month"):
            customer = f"{kind}-{tz}"
            c.set_budget(customer, 10, period=kind, tz=tz)
            offset = 0
            for transition in _transitions(tz):
                for delta in (-3_600_000, -1, 0, 1, 1_800_000, 3_600_000, rng.randrange(7_200_000)):
                    seconds, micros = raw.time()
                    target = transition + delta - rng.randrange(0, 60_000)
                    move = target - (seconds * 1000 + micros // 1000) - offset
                    shift_clock(raw, namespace, customer, move)
                    offset += move
                    b = c.get_budget(customer)
                    assert b.period_start
                    assert b.period_end
                    assert b.resets_in is not None
                    end = round(b.period_end.timestamp() * 1000)
                    now = end - round(b.resets_in * 1000)
                    start = round(b.period_start.timestamp() * 1000)
                    assert (start, end) == reference_period(kind, tz, now), (kind, now)


def test_a_repeated_hour_is_two_periods_of_an_hour_budget(
    timed: AgentBillClient, raw: redis.Redis
) -> None:
    """Finding 17: where clocks go back, an hour budget's period lasted two real hours, and
    period_start moved while spent did not."""
    c = timed
    c.set_budget("R", 10, period="hour", tz="America/New_York")
    fall_back = next(
        t
        for t in _transitions("America/New_York")
        if _local(ZoneInfo("America/New_York"), t) < _local(ZoneInfo("America/New_York"), t - 1)
    )
    seconds, micros = raw.time()
    shift_clock(raw, c.namespace, "R", fall_back - 1_800_000 - (seconds * 1000 + micros // 1000))
    c.preflight("agent", 8, "R").record(8)
    first = c.get_budget("R")
    assert first.spent == 8
    assert first.period_end is not None
    assert round(first.period_end.timestamp() * 1000) == fall_back
    shift_clock(raw, c.namespace, "R", 3_600_000)  # 01:30 again, an hour later
    second = c.get_budget("R")
    assert second.period_start is not None
    assert round(second.period_start.timestamp() * 1000) == fall_back
    assert (second.spent, second.remaining) == (0, 10)


# -- the adversarial review's holes (issue 16, second round) ------------------------------------


def test_a_released_periods_late_record_is_charged_after_the_period_changed_and_back(
    timed: AgentBillClient,
) -> None:
    """Hole 4: a period whose only reservation was released was not archived when the budget's
    period changed, so that reservation's late record landed in no counter and the full limit
    was approved again."""
    c = timed
    c.set_budget("P", 100, period="day")
    held = c.preflight("agent", 50, "P")
    held.release()
    c.set_budget("P", 100, period="hour")
    c.preflight("agent", 1, "P").release()  # rolls the counters to the hour
    c.set_budget("P", 100, period="day")
    late = held.record(50)
    assert (late.status, late.charged) == ("late", 50)
    assert c.get_budget("P").spent == 50
    assert c.preflight("agent", 100, "P").reason == "budget_exhausted"


def test_one_off_agents_are_forgotten_and_usage_reads_a_bounded_number_of_them(
    redis_server: RedisServer, namespace: str, raw: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hole 8: 50,000 one-off agent ids left 31.6 MB in a customer's hash, never forgotten, and
    get_usage read them all (3.2 s inside Redis)."""
    movable_clock(monkeypatch)
    with AgentBillClient(
        redis_url=redis_server.url,
        namespace=namespace,
        idle_retention=3600,
        task_retention=60,
        outcome_retention=60,
        idempotency_ttl=60,
    ) as c:
        c.set_budget("u", 10**9)
        c.set_budget("u", 100, agent_id="kept")  # an agent with a budget is never forgotten
        for i in range(150):
            c.preflight(f"one-off-{i}", 1, "u").record(1)
        held = c.preflight("long-run", 1, "u", ttl=86_400)  # in flight: kept
        usage = c.get_usage("u", limit=20)
        assert len(usage.agents) == 20
        assert "long-run" in {a.agent_id for a in usage.agents}  # the most recently active
        budget = KeySpace(namespace).customer("u").budget
        fields_before = raw.hlen(budget)
        shift_clock(raw, namespace, "u", 3_601_000)
        for _ in range(3):  # at most reap_limit agents are forgotten per call
            c.get_budget("u")
        names = {a.agent_id for a in c.get_usage("u", limit=10_000).agents}
        assert names == {"kept", "long-run"}
        assert raw.hlen(budget) < fields_before / 10
        assert c.get_budget("u").spent == 150  # the customer's spend is the customer's
        held.record(1)
        assert c.get_budget("u", agent_id="long-run").spent == 1


def test_events_reads_a_long_ledger_in_pages(client: AgentBillClient) -> None:
    """Hole 8: events() read a whole 100,000-entry ledger in one script call (1.28 s of Redis)."""
    from agentbill import _core

    for _ in range(60):
        client.preflight("agent", 1, "u").record(1)
    every = client.events("u")
    assert len(every) == 120
    assert [e.type for e in every[:2]] == ["approved", "recorded"]
    assert len({e.id for e in every}) == 120
    assert client.events("u", limit=7) == every[:7]
    assert client.events("u", since=every[100].id) == every[101:]
    page = _core.EVENTS_PAGE
    try:
        _core.EVENTS_PAGE = 8  # small pages: the same answer, in many calls
        assert client.events("u") == every
        assert client.events("u", since=every[3].id, limit=50) == every[4:54]
    finally:
        _core.EVENTS_PAGE = page


def test_an_offline_preflight_repeated_under_its_key_is_one_reservation() -> None:
    """Hole 10: offline approvals ignored idempotency keys: the same key got two offline
    reservations, and one job was charged twice when Redis came back."""
    with AgentBillClient(
        redis_url="redis://127.0.0.1:1/0", on_outage="fail_open", connect_timeout=0.1
    ) as c:
        first = c.preflight("agent", 10, "u", idempotency_key="job-1")
        again = c.preflight("agent", 10, "u", idempotency_key="job-1")
        assert first.offline
        assert again.replayed
        assert again.reservation_id == first.reservation_id
        assert c.outage_stats.offline_runs == 1
        from agentbill import InvalidRequestError

        with pytest.raises(InvalidRequestError) as info:
            c.preflight("agent", 11, "u", idempotency_key="job-1")
        assert info.value.field == "idempotency_key"
        c.release(first.reservation_id)  # released: the key reserves afresh
        fresh = c.preflight("agent", 10, "u", idempotency_key="job-1")
        assert fresh.reservation_id != first.reservation_id


def test_an_online_approval_repeated_offline_under_its_key_is_the_same_reservation(
    redis_server: RedisServer, namespace: str
) -> None:
    from tests._servers import RedisServer as Server

    server = Server().start()
    try:
        with AgentBillClient(redis_url=server.url, namespace=namespace, on_outage="fail_open") as c:
            online = c.preflight("agent", 10, "u", idempotency_key="job-2")
            server.stop()
            offline = c.preflight("agent", 10, "u", idempotency_key="job-2")
            assert offline.replayed
            assert offline.reservation_id == online.reservation_id
    finally:
        server.stop()


def test_a_rolled_back_batch_takes_back_a_crossing_whatever_its_items_order(
    client: AgentBillClient,
) -> None:
    """Hole 11: item 0 crossed the threshold, item 1 still held units when item 0 was released,
    so the mark stayed and the real crossing later was never reported."""
    from agentbill import InvalidRequestError

    client.set_budget("T", 100, thresholds=(80,))
    client.preflight("agent", 70, "T").record(70)
    client.preflight("agent", 1, "T", idempotency_key="k").release()
    with pytest.raises(InvalidRequestError):
        client.preflight_many(
            [
                Preflight("agent", 10, "T"),
                Preflight("agent", 10, "T"),
                Preflight("agent", 2, "T", idempotency_key="k"),
            ]
        )
    real = client.preflight("agent", 15, "T")
    assert [c.percent for c in real.crossed] == [80]


def test_a_batch_that_meets_a_full_redis_half_way_holds_nothing_once_redis_has_room(
    namespace: str,
) -> None:
    """Hole 5: preflight_many crossing maxmemory half-way reserved its first items, the
    rollback's releases were refused OOM too, and the approvals stayed held until their TTL."""
    from agentbill import StoreBusyError

    full = {"maxmemory": "4mb", "maxmemory-policy": "noeviction"}
    with (
        running(extra=full) as server,
        AgentBillClient(redis_url=server.url, namespace=namespace) as c,
        server.client() as r,
    ):
        c.set_budget("cust", 10**9)
        filler = 0
        while r.info("memory")["used_memory"] < 4 * 1024 * 1024 - 250_000:
            r.set(f"filler:{filler}", b"x" * 2000)
            filler += 1
        with pytest.raises(StoreBusyError):
            c.preflight_many([Preflight("agent", 1, "cust")] * 2000)
        approved = sum(e.type == "approved" for e in c.events("cust"))
        assert approved > 0  # the batch did reserve before Redis was full
        r.delete(*(f"filler:{i}" for i in range(filler)))
        assert c.flush() == 0  # the queued rollback lands once Redis has room
        budget = c.get_budget("cust")
        assert (budget.reserved, budget.open_reservations) == (0, 0)
        assert sum(e.type == "released" for e in c.events("cust")) == approved
