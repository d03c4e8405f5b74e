"""preflight(): one atomic check of every rule, reserving on every scope or nowhere."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import redis
from redis.crc import key_slot

from agentbill import (
    AgentBillClient,
    BudgetExhaustedError,
    CeilingExceededError,
    RunBlockedError,
    TaskCeilingExceededError,
)
from tests._servers import RedisServer
from tests.conftest import namespace_keys


@pytest.fixture
def client(both_clients: AgentBillClient) -> AgentBillClient:
    """Every test here runs on the sync client and on the async one."""
    return both_clients


def test_approval_reserves_the_estimate(client: AgentBillClient) -> None:
    client.set_budget("c1", 100)
    check = client.preflight("agent", 30, "c1")
    assert check.approved
    assert check.reason is None
    assert check.remaining == 70
    assert check.reservation_id is not None
    budget = client.get_budget("c1")
    assert (budget.spent, budget.reserved, budget.remaining, budget.open_reservations) == (
        0,
        30,
        70,
        1,
    )


def test_expires_at_is_aware_utc_on_the_redis_clock(client: AgentBillClient) -> None:
    check = client.preflight("agent", 1, "c1", ttl=120)
    assert check.expires_at is not None
    assert check.expires_at.tzinfo is UTC
    # Redis runs on this machine, so its clock and ours agree to well within a minute.
    expected = datetime.now(UTC) + timedelta(seconds=120)
    assert abs((check.expires_at - expected).total_seconds()) < 60


def test_ceiling_is_per_request_not_a_running_total(
    redis_server: RedisServer, namespace: str
) -> None:
    with AgentBillClient(ceiling=50, redis_url=redis_server.url, namespace=namespace) as c:
        assert all(c.preflight("agent", 50, "c1").approved for _ in range(3))
        refused = c.preflight("agent", 51, "c1")
    assert not refused.approved
    assert refused.reason == "ceiling_exceeded"
    assert refused.limit == 50
    with pytest.raises(CeilingExceededError) as info:
        refused.raise_for_refusal()
    assert info.value.reason == "ceiling_exceeded"
    assert info.value.check is refused


def test_customer_without_budget_is_unlimited(client: AgentBillClient) -> None:
    check = client.preflight("agent", 10**12, "big")
    assert check.approved
    assert check.remaining is None
    assert client.get_budget("big").limit is None


def test_budget_exhausted_reports_numbers_and_reserves_nothing(
    client: AgentBillClient, raw: redis.Redis, namespace: str
) -> None:
    client.set_budget("c1", 10)
    client.preflight("agent", 7, "c1")
    before = namespace_keys(raw, namespace)
    refused = client.preflight("agent", 4, "c1")
    assert not refused.approved
    assert refused.reason == "budget_exhausted"
    assert (refused.remaining, refused.limit, refused.reservation_id) == (3, 10, None)
    assert namespace_keys(raw, namespace) == before
    with pytest.raises(BudgetExhaustedError) as info:
        refused.raise_for_refusal()
    assert info.value.customer_id == "c1"
    assert info.value.remaining == 3
    assert isinstance(info.value, RunBlockedError)


def test_default_customer_is_named_default(client: AgentBillClient) -> None:
    client.set_budget("default", 5)
    assert not client.preflight("agent", 6).approved
    assert client.preflight("agent", 5, None).approved
    assert client.get_budget().reserved == 5


def test_task_ceiling_opens_task_on_first_preflight_only(client: AgentBillClient) -> None:
    first = client.preflight("agent", 4, "c1", task_ref="job", task_ceiling=10)
    assert first.approved
    assert first.task_ceiling == 10
    assert first.task_remaining == 6
    # A retry cannot raise its own ceiling: the second task_ceiling is ignored.
    second = client.preflight("agent", 7, "c1", task_ref="job", task_ceiling=1000)
    assert not second.approved
    assert second.reason == "task_ceiling_exceeded"
    with pytest.raises(TaskCeilingExceededError) as info:
        second.raise_for_refusal()
    err = info.value
    assert (err.task_ref, err.ceiling, err.used, err.task_remaining) == ("job", 10, 0, 6)
    task = client.get_task("job", "c1")
    assert (task.ceiling, task.used, task.reserved, task.remaining) == (10, 0, 4, 6)


def test_refused_preflight_does_not_open_its_task(
    client: AgentBillClient, raw: redis.Redis, namespace: str
) -> None:
    client.set_budget("c1", 5)
    before = namespace_keys(raw, namespace)
    refused = client.preflight("agent", 6, "c1", task_ref="new-task", task_ceiling=100)
    assert refused.reason == "budget_exhausted"
    assert namespace_keys(raw, namespace) == before
    assert not client.get_task("new-task", "c1").exists


def test_refusal_by_task_ceiling_on_an_unknown_task(client: AgentBillClient) -> None:
    refused = client.preflight("agent", 11, "c1", task_ref="fresh", task_ceiling=10)
    assert refused.reason == "task_ceiling_exceeded"
    assert refused.task_ceiling == 10
    assert not client.get_task("fresh", "c1").exists


def test_unknown_task_without_ceiling_is_attribution_only(client: AgentBillClient) -> None:
    client.set_budget("c1", 100)
    check = client.preflight("agent", 40, "c1", task_ref="free")
    assert check.approved
    assert check.task_ceiling is None
    assert check.task_remaining is None
    check.record(25)
    task = client.get_task("free", "c1")
    assert (task.exists, task.ceiling, task.used, task.remaining) == (True, None, 25, None)
    assert client.get_budget("c1").spent == 25


def test_tasks_belong_to_one_customer(client: AgentBillClient) -> None:
    client.open_task("shared-name", 5, "alice")
    assert not client.preflight("agent", 6, "alice", task_ref="shared-name").approved
    assert client.preflight("agent", 6, "bob", task_ref="shared-name").approved


def test_open_task_sets_and_changes_the_ceiling(client: AgentBillClient) -> None:
    assert client.open_task("t", 3, "c1").ceiling == 3
    assert not client.preflight("agent", 4, "c1", task_ref="t").approved
    assert client.open_task("t", None, "c1").ceiling is None
    assert client.preflight("agent", 4, "c1", task_ref="t").approved


def test_lowering_a_budget_below_use_only_refuses_new_runs(client: AgentBillClient) -> None:
    client.set_budget("c1", 100)
    check = client.preflight("agent", 60, "c1")
    status = client.set_budget("c1", 10)
    assert (status.limit, status.reserved, status.remaining) == (10, 60, 0)
    assert client.preflight("agent", 1, "c1").reason == "budget_exhausted"
    check.record(60)
    assert client.get_budget("c1").spent == 60
    assert client.set_budget("c1", None).remaining is None


def test_zero_unit_run_is_approved_even_on_an_empty_budget(client: AgentBillClient) -> None:
    client.set_budget("c1", 0)
    zero = client.preflight("agent", 0, "c1")
    assert zero.approved
    assert not client.preflight("agent", 1, "c1").approved
    # Closing a zero-unit reservation must not send "-0" to HINCRBY (Redis rejects it).
    assert zero.record(0).status == "recorded"
    assert client.preflight("agent", 0, "c1").release().status == "released"
    assert client.get_budget("c1").open_reservations == 0


def test_units_are_exact_up_to_2_pow_53_minus_1(client: AgentBillClient) -> None:
    big = 2**53 - 1
    client.set_budget("c1", big)
    check = client.preflight("agent", big, "c1")
    assert check.approved
    assert check.remaining == 0
    assert client.get_budget("c1").reserved == big
    assert client.preflight("agent", 1, "c1").reason == "budget_exhausted"
    assert check.record(big).spent == big


def test_namespaces_never_see_each_other(redis_server: RedisServer, namespace: str) -> None:
    with (
        AgentBillClient(redis_url=redis_server.url, namespace=namespace + "-a") as a,
        AgentBillClient(redis_url=redis_server.url, namespace=namespace + "-b") as b,
    ):
        a.set_budget("c1", 5)
        a.preflight("agent", 5, "c1")
        assert b.get_budget("c1").limit is None
        assert b.get_budget("c1").reserved == 0
        assert b.preflight("agent", 100, "c1").approved
        assert a.get_budget("c1").reserved == 5


def test_every_key_of_a_call_shares_the_customer_hash_tag(
    client: AgentBillClient, raw: redis.Redis, namespace: str
) -> None:
    client.preflight("agent", 1, "odd{cust}:id", task_ref="t", idempotency_key="k")
    client.record("agent", 1, "odd{cust}:id", idempotency_key="k2")
    keys = list(namespace_keys(raw, namespace))
    assert len(keys) >= 5
    # The same CRC16 slot function Redis Cluster uses (tests/test_cluster.py runs a real one).
    slots = {key_slot(k.encode()) for k in keys}
    assert len(slots) == 1


def test_check_is_truthy_only_when_approved(client: AgentBillClient) -> None:
    client.set_budget("c1", 1)
    assert client.preflight("agent", 1, "c1")
    assert not client.preflight("agent", 1, "c1")
