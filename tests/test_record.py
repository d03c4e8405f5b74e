"""record() and release(): closing reservations exactly once, charging what really happened."""

from __future__ import annotations

import time

import pytest
import redis

from agentbill import AgentBillClient, InvalidRequestError
from agentbill._keys import customer_tag, reservation_id
from tests._servers import RedisServer
from tests.conftest import namespace_keys


@pytest.fixture
def client(both_clients: AgentBillClient) -> AgentBillClient:
    """Every test here runs on the sync client and on the async one."""
    return both_clients


def test_record_with_id_charges_actual_and_releases_the_rest(client: AgentBillClient) -> None:
    client.set_budget("c1", 100)
    check = client.preflight("agent", 40, "c1")
    result = client.record("agent", 15, "c1", reservation_id=check.reservation_id)
    assert (result.status, result.charged, result.released) == ("recorded", 15, 40)
    budget = client.get_budget("c1")
    assert (budget.spent, budget.reserved, budget.remaining, budget.open_reservations) == (
        15,
        0,
        85,
        0,
    )


def test_units_above_the_estimate_are_charged_in_full(client: AgentBillClient) -> None:
    client.set_budget("c1", 100)
    check = client.preflight("agent", 10, "c1")
    assert check.record(95).charged == 95
    # The next preflight sees the overrun.
    assert client.preflight("agent", 6, "c1").reason == "budget_exhausted"
    assert client.preflight("agent", 5, "c1").approved


def test_record_without_id_closes_the_oldest_open_reservation_of_its_group(
    client: AgentBillClient,
) -> None:
    first = client.preflight("agent", 10, "c1")
    second = client.preflight("agent", 20, "c1")
    other_agent = client.preflight("other", 30, "c1")
    other_task = client.preflight("agent", 40, "c1", task_ref="t")
    result = client.record("agent", 7, "c1")
    assert (result.status, result.reservation_id, result.released) == (
        "recorded",
        first.reservation_id,
        10,
    )
    assert client.record("agent", 7, "c1").reservation_id == second.reservation_id
    # Nothing of that group is open any more: the next record charges directly.
    direct = client.record("agent", 3, "c1")
    assert (direct.status, direct.reservation_id, direct.charged) == ("direct", None, 3)
    budget = client.get_budget("c1")
    assert (budget.spent, budget.reserved, budget.open_reservations) == (17, 70, 2)
    assert other_agent.approved
    assert other_task.approved


def test_record_without_any_reservation_charges_directly(client: AgentBillClient) -> None:
    result = client.record("agent", 10, "user_123", task_ref="t")
    assert (result.status, result.charged) == ("direct", 10)
    assert client.get_budget("user_123").spent == 10
    assert client.get_task("t", "user_123").used == 10


def test_success_false_releases_without_charging(client: AgentBillClient) -> None:
    check = client.preflight("agent", 10, "c1", task_ref="t", task_ceiling=10)
    result = check.record(8, success=False)
    assert (result.status, result.charged, result.released) == ("released", 0, 10)
    assert client.get_task("t", "c1").reserved == 0
    assert client.get_budget("c1").spent == 0


def test_release_returns_units_to_every_scope(client: AgentBillClient) -> None:
    client.set_budget("c1", 10)
    check = client.preflight("agent", 10, "c1", task_ref="t", task_ceiling=10)
    assert not client.preflight("agent", 1, "c1").approved
    assert check.reservation_id is not None
    result = client.release(check.reservation_id)
    assert (result.status, result.released) == ("released", 10)
    assert client.get_task("t", "c1").reserved == 0
    assert client.preflight("agent", 10, "c1", task_ref="t").approved


def test_closing_twice_charges_once_and_returns_the_first_outcome(
    client: AgentBillClient,
) -> None:
    check = client.preflight("agent", 10, "c1")
    first = check.record(4)
    again = check.record(9)
    released = check.release()
    assert (again.status, again.charged, again.replayed) == ("recorded", 4, True)
    assert (released.status, released.charged, released.replayed) == ("recorded", 4, True)
    assert not first.replayed
    assert client.get_budget("c1").spent == 4


def test_record_idempotency_key_charges_once(client: AgentBillClient) -> None:
    a = client.record("agent", 5, "c1", idempotency_key="run-1")
    b = client.record("agent", 5, "c1", idempotency_key="run-1")
    assert (a.replayed, b.replayed, b.charged, b.status) == (False, True, 5, "direct")
    assert client.get_budget("c1").spent == 5
    with pytest.raises(InvalidRequestError) as info:
        client.record("agent", 6, "c1", idempotency_key="run-1")
    assert info.value.field == "idempotency_key"
    assert client.get_budget("c1").spent == 5


def test_preflight_idempotency_key_holds_one_reservation(client: AgentBillClient) -> None:
    a = client.preflight("agent", 5, "c1", idempotency_key="job-9")
    b = client.preflight("agent", 5, "c1", idempotency_key="job-9")
    assert a.reservation_id == b.reservation_id
    assert b.replayed
    assert b.approved
    assert client.get_budget("c1").open_reservations == 1
    with pytest.raises(InvalidRequestError) as info:
        client.preflight("agent", 6, "c1", idempotency_key="job-9")
    assert info.value.field == "idempotency_key"
    # Keys are scoped per customer: the same key for another customer is another request.
    assert not client.preflight("agent", 6, "c2", idempotency_key="job-9").replayed


def test_same_key_for_preflight_and_record_does_not_conflict(client: AgentBillClient) -> None:
    check = client.preflight("agent", 5, "c1", idempotency_key="task-1")
    result = check.record(3, idempotency_key="task-1")
    assert result.status == "recorded"
    assert client.get_budget("c1").spent == 3


def test_refused_preflight_is_not_remembered_under_its_key(client: AgentBillClient) -> None:
    """A refusal holds nothing, so the same key asks again (after a top-up, say)."""
    client.set_budget("c1", 1)
    assert not client.preflight("agent", 5, "c1", idempotency_key="k").approved
    client.set_budget("c1", 10)
    assert client.preflight("agent", 5, "c1", idempotency_key="k").approved


def test_key_of_a_released_reservation_reserves_afresh(client: AgentBillClient) -> None:
    """Replaying a released approval would let a retried run go ahead unreserved and
    uncharged: the key reserves again instead, and then replays that reservation."""
    first = client.preflight("agent", 5, "c1", idempotency_key="job-1")
    first.release()
    second = client.preflight("agent", 5, "c1", idempotency_key="job-1")
    assert second.approved
    assert not second.replayed
    assert second.reservation_id != first.reservation_id
    assert client.get_budget("c1").reserved == 5
    third = client.preflight("agent", 5, "c1", idempotency_key="job-1")
    assert (third.reservation_id, third.replayed) == (second.reservation_id, True)
    second.record(4)
    assert client.get_budget("c1").spent == 4


def test_key_of_a_recorded_reservation_keeps_replaying(client: AgentBillClient) -> None:
    """A charged run's key never reserves again: a redelivery closes the same reservation."""
    first = client.preflight("agent", 5, "c1", idempotency_key="job-1")
    first.record(3)
    again = client.preflight("agent", 5, "c1", idempotency_key="job-1")
    assert (again.reservation_id, again.replayed) == (first.reservation_id, True)
    assert again.record(3).replayed
    budget = client.get_budget("c1")
    assert (budget.spent, budget.reserved) == (3, 0)


def test_key_of_an_expired_reservation_reserves_afresh(client: AgentBillClient) -> None:
    first = client.preflight("agent", 5, "c1", idempotency_key="job-1", ttl=1)
    _wait_past(1.2)
    second = client.preflight("agent", 5, "c1", idempotency_key="job-1", ttl=1)
    assert not second.replayed
    assert second.reservation_id != first.reservation_id
    assert client.get_budget("c1").reserved == 5


def test_release_by_the_preflights_idempotency_key(client: AgentBillClient) -> None:
    check = client.preflight("agent", 5, "c1", idempotency_key="job-7", task_ref="t")
    released = client.release(idempotency_key="job-7", customer_id="c1")
    assert (released.status, released.reservation_id, released.released) == (
        "released",
        check.reservation_id,
        5,
    )
    assert client.release(idempotency_key="job-7", customer_id="c1").replayed
    budget = client.get_budget("c1")
    assert (budget.reserved, budget.open_reservations, budget.spent) == (0, 0, 0)
    assert client.get_task("t", "c1").reserved == 0


def test_release_by_a_key_that_reserved_nothing_is_a_noop(
    client: AgentBillClient, raw: redis.Redis, namespace: str
) -> None:
    client.set_budget("c1", 1)
    assert not client.preflight("agent", 5, "c1", idempotency_key="refused").approved
    before = namespace_keys(raw, namespace)
    for key in ("refused", "never-used"):
        outcome = client.release(idempotency_key=key, customer_id="c1")
        assert (outcome.status, outcome.reservation_id, outcome.released) == ("noop", None, 0)
    assert namespace_keys(raw, namespace) == before


def test_release_needs_exactly_one_way_to_name_the_reservation(client: AgentBillClient) -> None:
    check = client.preflight("agent", 5, "c1", idempotency_key="k")
    with pytest.raises(InvalidRequestError) as info:
        client.release()
    assert info.value.field == "reservation_id"
    with pytest.raises(InvalidRequestError) as info:
        client.release(check.reservation_id, idempotency_key="k")
    assert info.value.field == "idempotency_key"
    with pytest.raises(InvalidRequestError) as info:
        client.release(check.reservation_id, customer_id="c2")
    assert info.value.field == "customer_id"
    assert client.get_budget("c1").reserved == 5


def test_customer_contradicting_the_reservation_is_refused_before_writing(
    client: AgentBillClient, raw: redis.Redis, namespace: str
) -> None:
    check = client.preflight("agent", 5, "alice")
    before = namespace_keys(raw, namespace)
    with pytest.raises(InvalidRequestError) as info:
        client.record("agent", 5, "bob", reservation_id=check.reservation_id)
    assert info.value.field == "customer_id"
    with pytest.raises(InvalidRequestError) as info:
        client.record("someone-else", 5, reservation_id=check.reservation_id)
    assert info.value.field == "agent_id"
    assert namespace_keys(raw, namespace) == before


def test_foreign_reservation_id_is_invalid(client: AgentBillClient) -> None:
    with pytest.raises(InvalidRequestError) as info:
        client.release("not-a-reservation")
    assert info.value.field == "reservation_id"


def test_check_of_a_refusal_holds_nothing_to_record(client: AgentBillClient) -> None:
    client.set_budget("c1", 0)
    refused = client.preflight("agent", 1, "c1")
    with pytest.raises(InvalidRequestError):
        refused.record(1)


def test_metadata_is_validated_and_returned(client: AgentBillClient) -> None:
    check = client.preflight("agent", 5, "c1")
    assert check.record(1, metadata={"model": "m", "tokens": 3}).metadata == {
        "model": "m",
        "tokens": 3,
    }
    with pytest.raises(InvalidRequestError) as info:
        client.record("agent", 1, "c1", metadata={"bad": float("nan")})
    assert info.value.field == "metadata"


# -- expiry ------------------------------------------------------------------------------------


def _wait_past(check_expiry: float) -> None:
    time.sleep(check_expiry)


def test_unsettled_reservation_expires_and_returns_its_units(client: AgentBillClient) -> None:
    client.set_budget("c1", 10)
    client.preflight("agent", 10, "c1", ttl=1, task_ref="t", task_ceiling=10)
    assert not client.preflight("agent", 1, "c1").approved
    _wait_past(1.2)
    budget = client.get_budget("c1")
    assert (budget.reserved, budget.open_reservations, budget.spent) == (0, 0, 0)
    assert client.get_task("t", "c1").reserved == 0
    assert client.preflight("agent", 10, "c1").approved


def test_record_after_expiry_still_charges_once_and_is_late(client: AgentBillClient) -> None:
    check = client.preflight("agent", 10, "c1", ttl=1, task_ref="t")
    _wait_past(1.2)
    late = check.record(6)
    assert (late.status, late.late, late.charged, late.released) == ("late", True, 6, 0)
    again = check.record(6)
    assert (again.status, again.replayed, again.charged) == ("late", True, 6)
    assert client.get_budget("c1").spent == 6
    assert client.get_task("t", "c1").used == 6


def test_release_after_expiry_is_a_noop(client: AgentBillClient) -> None:
    check = client.preflight("agent", 10, "c1", ttl=1)
    _wait_past(1.2)
    assert check.release().status == "expired"
    assert client.get_budget("c1").spent == 0


def test_reaping_is_bounded_per_call(redis_server: RedisServer, namespace: str) -> None:
    """One call returns at most reap_limit expired reservations; later calls finish the job."""
    with AgentBillClient(redis_url=redis_server.url, namespace=namespace, reap_limit=3) as c:
        for _ in range(7):
            c.preflight("agent", 1, "c1", ttl=1)
        _wait_past(1.2)
        seen = [c.get_budget("c1").open_reservations for _ in range(3)]
    assert seen == [4, 1, 0]


def test_outcomes_are_forgotten_after_the_retention(
    redis_server: RedisServer, namespace: str, raw: redis.Redis
) -> None:
    with AgentBillClient(
        redis_url=redis_server.url, namespace=namespace, outcome_retention=1, idempotency_ttl=1
    ) as c:
        check = c.preflight("agent", 1, "c1")
        check.record(1)
        assert raw.hlen(c._script_settings.keys.customer("c1").closed) == 1
        _wait_past(1.2)
        c.get_budget("c1")
        assert raw.hlen(c._script_settings.keys.customer("c1").closed) == 0


def test_record_of_an_unknown_reservation_charges_once(client: AgentBillClient) -> None:
    """A reservation Redis never saw (made offline) or has forgotten: the work happened, so
    the record charges, flagged late, and a repeat of it charges nothing more."""
    rid = reservation_id(customer_tag("c1"), "f" * 24)
    first = client.record("agent", 7, "c1", reservation_id=rid, task_ref="t")
    assert (first.status, first.late, first.charged, first.replayed) == ("late", True, 7, False)
    again = client.record("agent", 7, "c1", reservation_id=rid, task_ref="t")
    assert (again.status, again.charged, again.replayed) == ("late", 7, True)
    assert client.release(rid).replayed
    assert client.get_budget("c1").spent == 7
    assert client.get_task("t", "c1").used == 7


def test_outcomes_must_outlive_idempotency_keys(redis_server: RedisServer) -> None:
    """A released key reserves afresh only while its outcome says it was released: a key kept
    longer than outcomes would replay an approval that holds nothing."""
    with pytest.raises(InvalidRequestError) as info:
        AgentBillClient(redis_url=redis_server.url, outcome_retention=60, idempotency_ttl=120)
    assert info.value.field == "outcome_retention"
