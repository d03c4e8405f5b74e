"""preflight_many: many decisions in one round trip, each exactly what preflight would decide.

Each test body runs on the sync and the async client; the race runs real processes.
"""

from __future__ import annotations

import multiprocessing as mp

import pytest
import redis

from agentbill import AgentBillClient, InvalidRequestError, Preflight
from agentbill._scripts import installed
from tests._processes import CTX
from tests._servers import RedisServer
from tests.conftest import namespace_keys


@pytest.fixture
def client(both_clients: AgentBillClient) -> AgentBillClient:
    return both_clients


def test_each_item_is_decided_in_order_as_preflight_would(client: AgentBillClient) -> None:
    client.set_budget("c1", 10)
    checks = client.preflight_many(
        [
            Preflight("agent", 6, "c1"),
            Preflight("agent", 6, "c1"),  # 6 + 6 > 10: refused, holds nothing
            Preflight("agent", 4, "c1", task_ref="t", task_ceiling=3),  # above the task's
            Preflight("agent", 4, "c1"),
            Preflight("other", 100, "c2"),  # another customer, unlimited
        ]
    )
    assert [c.approved for c in checks] == [True, False, False, True, True]
    assert [c.reason for c in checks] == [
        None,
        "budget_exhausted",
        "task_ceiling_exceeded",
        None,
        None,
    ]
    assert [c.remaining for c in checks] == [4, 4, 4, 0, None]
    budget = client.get_budget("c1")
    assert (budget.reserved, budget.open_reservations) == (10, 2)
    assert client.get_budget("c2").reserved == 100
    assert not client.get_task("t", "c1").exists
    # Each approval is an ordinary reservation.
    checks[0].record(5)
    checks[3].release()
    budget = client.get_budget("c1")
    assert (budget.spent, budget.reserved) == (5, 0)


def test_an_empty_batch_sends_nothing(client: AgentBillClient, raw: redis.Redis) -> None:
    client.get_budget("c1")  # connected: a first call may also send its connection's setup
    before = raw.info("stats")["total_commands_processed"]
    assert client.preflight_many([]) == []
    after = raw.info("stats")["total_commands_processed"]
    assert after - before == 1  # the second INFO itself, and nothing else


def test_idempotency_keys_replay_across_batches(client: AgentBillClient) -> None:
    batch = [Preflight("agent", 2, "c1", idempotency_key=f"job-{i}") for i in range(5)]
    first = client.preflight_many(batch)
    again = client.preflight_many(batch)
    assert [c.reservation_id for c in again] == [c.reservation_id for c in first]
    assert all(c.replayed for c in again)
    assert client.get_budget("c1").reserved == 10


def test_a_bad_item_names_its_index_and_field_and_sends_nothing(
    client: AgentBillClient, raw: redis.Redis, namespace: str
) -> None:
    client.set_budget("c1", 10)
    before = namespace_keys(raw, namespace)
    with pytest.raises(InvalidRequestError) as info:
        client.preflight_many([Preflight("agent", 1, "c1"), Preflight("agent", -1, "c1")])
    assert info.value.field == "requests[1].estimated_units"
    with pytest.raises(InvalidRequestError) as info:
        client.preflight_many([("agent", 1, "c1")])  # type: ignore[list-item]
    assert info.value.field == "requests[0]"
    with pytest.raises(InvalidRequestError) as info:
        client.preflight_many("agent")  # type: ignore[arg-type]
    assert info.value.field == "requests"
    assert namespace_keys(raw, namespace) == before


def test_an_item_redis_refuses_releases_what_the_batch_approved(client: AgentBillClient) -> None:
    earlier = client.preflight("agent", 3, "c1", idempotency_key="k")
    with pytest.raises(InvalidRequestError) as info:
        client.preflight_many(
            [
                Preflight("agent", 2, "c1"),
                Preflight("agent", 3, "c1", idempotency_key="k"),  # a replay: not released
                Preflight("agent", 9, "c1", idempotency_key="k"),  # same key, other args
                Preflight("agent", 4, "c1"),
            ]
        )
    assert info.value.field == "requests[2].idempotency_key"
    budget = client.get_budget("c1")
    assert (budget.reserved, budget.open_reservations) == (3, 1)  # only the earlier call's
    earlier.release()


@pytest.mark.parametrize("forget", ["flush", "delete"])
def test_a_library_removed_from_redis_is_loaded_again_for_a_batch(
    client: AgentBillClient, raw: redis.Redis, forget: str
) -> None:
    """FUNCTION FLUSH (or FUNCTION DELETE of agentbill's library) between two batches: every
    item is answered "Function not found", the library is loaded and each item sent once more,
    as the same request: reserved once."""
    client.preflight_many([Preflight("agent", 1, "c1")])
    if forget == "flush":
        raw.function_flush()
    else:
        raw.function_delete(installed().name)
    assert raw.function_list() == []
    asks = [Preflight("agent", 1, "c1"), Preflight("agent", 1, "c2", idempotency_key="k")]
    checks = client.preflight_many(asks)
    assert all(c.approved and not c.replayed for c in checks)
    assert client.get_budget("c1").reserved == 2
    assert client.get_budget("c2").reserved == 1
    assert [str(lib[1]) for lib in raw.function_list()] == [installed().name]


def test_a_batch_sends_one_fcall_per_item_and_nothing_else(
    client: AgentBillClient, raw: redis.Redis
) -> None:
    """No FUNCTION LOAD, LIST or SCRIPT EXISTS around a batch once the library is there."""
    client.preflight_many([Preflight("agent", 1, "c1")])  # the library loaded
    raw.config_resetstat()
    client.preflight_many([Preflight("agent", 1, f"c{i}") for i in range(10)])
    stats = raw.info("commandstats")
    assert stats["cmdstat_fcall"]["calls"] == 10
    assert not [name for name in stats if "function" in name or "script" in name]


def _racer(url: str, namespace: str, batches: int, out: mp.Queue[int]) -> None:
    with AgentBillClient(redis_url=url, namespace=namespace) as client:
        approved = 0
        for _ in range(batches):
            checks = client.preflight_many([Preflight("agent", 1, "hot") for _ in range(10)])
            approved += sum(c.approved for c in checks)
        out.put(approved)


def test_racing_processes_get_exactly_the_budget(redis_server: RedisServer, namespace: str) -> None:
    """6 processes x 5 batches x 10 items of 1 unit against a budget of 137."""
    limit = 137
    with AgentBillClient(redis_url=redis_server.url, namespace=namespace) as admin:
        admin.set_budget("hot", limit)
    out: mp.Queue[int] = CTX.Queue()
    procs = [
        CTX.Process(target=_racer, args=(redis_server.url, namespace, 5, out)) for _ in range(6)
    ]
    for p in procs:
        p.start()
    approved = sum(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert approved == limit
    with AgentBillClient(redis_url=redis_server.url, namespace=namespace) as admin:
        budget = admin.get_budget("hot")
    assert (budget.reserved, budget.open_reservations, budget.remaining) == (limit, limit, 0)
