"""Stored values a call parses are bounded: a value far longer than agentbill ever writes fails
the call with ``AGENTBILL corrupt <field>`` (a StoreError) before it writes anything.

A tenant key may write its own keys raw (functions run with the caller's ACL, so it holds HSET
on them). A zone table, threshold list, archive list or record of millions of entries made
every call of that customer parse it for seconds, BUSY for every tenant, and UNKILLABLE once
the call had written (its reap first). The values here are far past each bound but small
enough that the code before the bounds parsed them and succeeded (so these tests failed then).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import redis

from agentbill import AgentBillClient, StoreError, StoreUnavailableError
from agentbill._keys import CustomerKeys, digest
from tests.conftest import namespace_keys

CUSTOMER = "cust"


def _keys(client: AgentBillClient) -> CustomerKeys:
    return client._script_settings.keys.customer(CUSTOMER)


def _due_reservation(client: AgentBillClient, raw: redis.Redis) -> str:
    """A reservation of the customer that is due now: the next call's reap would write."""
    check = client.preflight("agent", 1, customer_id=CUSTOMER)
    rid = check.reservation_id
    assert rid is not None
    raw.zadd(_keys(client).exp, {rid: 0})
    return rid


def _fails_before_writing(
    raw: redis.Redis, namespace: str, field: str, call: Callable[[], object]
) -> None:
    before = namespace_keys(raw, namespace, ledger=True)
    with pytest.raises(StoreError, match=f"AGENTBILL corrupt {field}") as info:
        call()
    assert not isinstance(info.value, StoreUnavailableError)
    assert namespace_keys(raw, namespace, ledger=True) == before


@pytest.fixture
def budgeted(client: AgentBillClient) -> AgentBillClient:
    client.set_budget(CUSTOMER, 1000, period="day", thresholds=(50, 80))
    return client


HUGE_TZT = ",".join(f"{-(10**12) + i}:0" for i in range(20_000))  # ~400 KB; clients: ~1 KB
HUGE_THR = ",".join(["50"] * 5_000)  # clients: at most 20 percents
HUGE_ARCH = ",".join(f"d{i}@{i}" for i in range(40_000))  # ~500 KB; one HMGET per entry


@pytest.mark.parametrize(
    ("field", "value"), [("tzt", HUGE_TZT), ("thr", HUGE_THR), ("arch", HUGE_ARCH)]
)
def test_a_huge_scope_field_fails_preflight_before_any_write(
    budgeted: AgentBillClient, raw: redis.Redis, namespace: str, field: str, value: str
) -> None:
    _due_reservation(budgeted, raw)
    raw.hset(_keys(budgeted).budget, field, value)
    _fails_before_writing(
        raw, namespace, field, lambda: budgeted.preflight("agent", 1, customer_id=CUSTOMER)
    )


@pytest.mark.parametrize(
    ("field", "value"), [("tzt", HUGE_TZT), ("thr", HUGE_THR), ("arch", HUGE_ARCH)]
)
def test_a_huge_scope_field_fails_get_budget_before_its_reap_writes(
    budgeted: AgentBillClient, raw: redis.Redis, namespace: str, field: str, value: str
) -> None:
    """The unkillable case: a reservation is due, so the old get_budget wrote (reaped) first."""
    _due_reservation(budgeted, raw)
    raw.hset(_keys(budgeted).budget, field, value)
    _fails_before_writing(raw, namespace, field, lambda: budgeted.get_budget(CUSTOMER))
    _fails_before_writing(raw, namespace, field, lambda: budgeted.get_usage(CUSTOMER))


def test_a_huge_agent_field_fails_before_any_write(
    budgeted: AgentBillClient, raw: redis.Redis, namespace: str
) -> None:
    budgeted.set_budget(CUSTOMER, 100, agent_id="agent", period="day", thresholds=(90,))
    _due_reservation(budgeted, raw)
    agent_thr = f"a:{digest('agent')}:thr"
    assert raw.hexists(_keys(budgeted).budget, agent_thr)
    raw.hset(_keys(budgeted).budget, agent_thr, HUGE_THR)
    _fails_before_writing(
        raw, namespace, "a:", lambda: budgeted.preflight("agent", 1, customer_id=CUSTOMER)
    )
    _fails_before_writing(
        raw, namespace, "a:", lambda: budgeted.get_budget(CUSTOMER, agent_id="agent")
    )


def test_a_huge_reservation_record_fails_its_reap_before_any_write(
    budgeted: AgentBillClient, raw: redis.Redis, namespace: str
) -> None:
    rid = _due_reservation(budgeted, raw)
    raw.hset(_keys(budgeted).res, rid, "x\x1f" * 100_000)
    _fails_before_writing(raw, namespace, "record", lambda: budgeted.get_budget(CUSTOMER))


def test_a_huge_outcome_fails_a_record_before_any_write(
    budgeted: AgentBillClient, raw: redis.Redis, namespace: str
) -> None:
    check = budgeted.preflight("agent", 1, customer_id=CUSTOMER)
    check.release()
    assert check.reservation_id is not None
    raw.hset(_keys(budgeted).closed, check.reservation_id, "x\x1f" * 100_000)
    _fails_before_writing(
        raw,
        namespace,
        "record",
        lambda: budgeted.record(
            "agent", 1, customer_id=CUSTOMER, reservation_id=check.reservation_id
        ),
    )


def test_set_budget_repairs_a_scope_whose_thresholds_are_huge(
    budgeted: AgentBillClient, raw: redis.Redis
) -> None:
    raw.hset(_keys(budgeted).budget, "thr", HUGE_THR)
    budgeted.set_budget(CUSTOMER, 1000, period="day", thresholds=(50,))
    assert budgeted.get_budget(CUSTOMER).limit == 1000


def test_a_huge_zone_table_fails_a_record_closing_a_reservation(
    budgeted: AgentBillClient, raw: redis.Redis
) -> None:
    """Fails, but only after the reservation was closed and charged: settle reads the customer's
    scope after its writes (after_charge, finish), and checking it before them costs one more
    HMGET per record (report-bound.md). Each later call of the customer fails the same way."""
    check = budgeted.preflight("agent", 1, customer_id=CUSTOMER)
    raw.hset(_keys(budgeted).budget, "tzt", HUGE_TZT)
    for _ in range(2):
        with pytest.raises(StoreError, match="AGENTBILL corrupt tzt") as info:
            check.record(1)
        assert not isinstance(info.value, StoreUnavailableError)


@pytest.mark.parametrize("agent", [False, True])
def test_thousands_of_archived_periods_forgotten_at_once(
    client: AgentBillClient, raw: redis.Redis, agent: bool
) -> None:
    """An hourly budget whose reservations (long TTLs) kept 5,000 hours archived, all since
    closed: the next roll forgets them at once (~110 KB of arch, within MAX_ARCH). It dropped
    them in one HDEL of unpack(): 'too many results to unpack' past ~4,000 periods, after
    reap's writes, and every later preflight failed the same way."""
    if agent:
        client.set_budget(CUSTOMER, 10**9, period="hour", agent_id="agent")
    else:
        client.set_budget(CUSTOMER, 10**9, period="hour")
    p = f"a:{digest('agent')}:" if agent else ""
    hour = int(time.time() // 3600) - 40  # ended far longer ago than SPREAD (26 h)
    arch = ",".join(f"h{hour - i}@{(hour - i + 1) * 3600000}" for i in range(5000))
    raw.hset(
        _keys(client).budget,
        mapping={
            p + "arch": arch,
            p + "pid": f"h{hour + 1}",
            p + "pend": f"{(hour + 2) * 3600000}",
        },
    )
    assert client.preflight("agent", 1, customer_id=CUSTOMER).approved
    assert raw.hget(_keys(client).budget, p + "arch") in ("", None)
