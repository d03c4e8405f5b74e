"""Outage policies: fail_open and a bounded allowance approve offline while Redis is down, queue
what they cannot settle, and deliver it exactly once when Redis is back. Nothing is lost.

Each test body runs on the sync and the async client, against a real redis-server that is
killed and restarted on the same port (AOF with fsync always, so Redis itself loses nothing).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from collections.abc import Iterator
from multiprocessing.synchronize import Event as EventType
from typing import Any

import pytest

from agentbill import AgentBillClient, InvalidRequestError, StoreUnavailableError
from agentbill.contrib._jobs import JobBudget, JobCall, JobRun
from tests._faults import (
    AGENT,
    CUSTOMER,
    Connect,
    ReplyLosingProxy,
    connect,
    other_clients,
    proxy,
    wait_until,
)
from tests._processes import CTX
from tests._servers import RedisServer, running

__all__ = ["connect", "proxy"]  # fixtures used here, defined in tests/_faults.py


@pytest.fixture
def durable() -> Iterator[RedisServer]:
    with running(extra={"appendonly": "yes", "appendfsync": "always"}) as server:
        yield server


def test_fail_open_approves_offline_and_records_everything_when_redis_is_back(
    connect: Connect, durable: RedisServer, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    with connect(redis_url=durable.url, namespace=namespace, on_outage="fail_open") as client:
        client.set_budget(CUSTOMER, 10)
        durable.kill()
        with caplog.at_level(logging.WARNING, logger="agentbill"):
            first = client.preflight(AGENT, 8, CUSTOMER, task_ref="t")
            second = client.preflight(AGENT, 8, CUSTOMER)
        assert (first.approved, first.offline, first.remaining, first.expires_at) == (
            True,
            True,
            None,
            None,
        )
        assert second.approved  # fail_open: no budget is checked while Redis is down
        assert sum("approved 8 units offline" in r.getMessage() for r in caplog.records) == 2
        queued = first.record(7)
        assert (queued.status, queued.charged, queued.spent) == ("queued", 0, None)
        # Queued too: the preflight may have reached Redis. A released run charges nothing,
        # so its share of the allowance is free at once.
        assert second.release().status == "queued"
        stats = client.outage_stats
        assert (stats.offline_runs, stats.offline_units, stats.held_units, stats.queued) == (
            2,
            16,
            8,
            2,
        )

        durable.restart()
        client.get_budget(CUSTOMER)  # the first successful round trip delivers the queue
        assert client.outage_stats.queued == 0
        budget = client.get_budget(CUSTOMER)
        assert (budget.spent, budget.reserved, budget.open_reservations) == (7, 0, 0)
        assert client.get_task("t", CUSTOMER).used == 7
        stats = client.outage_stats
        assert (stats.queued, stats.delivered, stats.held_units) == (0, 2, 0)
        # Delivered exactly once: recording the offline run again charges nothing more.
        again = first.record(7)
        assert (again.status, again.replayed) == ("late", True)
        assert client.get_budget(CUSTOMER).spent == 7


def test_allowance_bounds_what_one_process_approves_offline(
    connect: Connect, durable: RedisServer, namespace: str
) -> None:
    with connect(
        redis_url=durable.url, namespace=namespace, on_outage="allowance", outage_allowance=10
    ) as client:
        client.set_budget(CUSTOMER, 100)
        durable.kill()
        six = client.preflight(AGENT, 6, CUSTOMER)
        with pytest.raises(StoreUnavailableError):
            client.preflight(AGENT, 5, CUSTOMER)  # 6 + 5 > 10
        four = client.preflight(AGENT, 4, CUSTOMER)
        assert six.offline
        assert four.offline
        assert six.record(6).status == "queued"
        with pytest.raises(StoreUnavailableError):
            client.preflight(AGENT, 1, CUSTOMER)  # a queued record still holds its allowance
        assert client.outage_stats.held_units == 10

        durable.restart()
        assert client.flush() == 0
        assert client.get_budget(CUSTOMER).spent == 6
        assert client.outage_stats.held_units == 4  # the run still going holds its part
        settled = four.record(3)  # Redis is back: charged at once, flagged late
        assert (settled.status, settled.late, settled.charged) == ("late", True, 3)
        assert client.outage_stats.held_units == 0
        assert client.get_budget(CUSTOMER).spent == 9


def test_an_offline_runs_release_while_redis_is_silent_is_queued_and_frees_its_reservation(
    connect: Connect, namespace: str
) -> None:
    """Redis paused, not down: the preflight that timed out sits in Redis's socket buffer and
    runs when Redis wakes, reserving the estimate. The run was approved offline and released;
    that release is queued like a record and closes the reservation once delivered, instead of
    leaving it held until its TTL."""
    with (
        running() as server,
        server.client(decode_responses=True) as raw,
        connect(redis_url=server.url, namespace=namespace, on_outage="fail_open") as client,
    ):
        client.get_budget(CUSTOMER)  # connected, scripts loaded
        raw.ping()
        server.pause()
        try:
            check = client.preflight(AGENT, 5, CUSTOMER)
            assert check.offline
            assert check.release().status == "queued"
            assert client.outage_stats.held_units == 0
        finally:
            server.resume()
        wait_until(lambda: not other_clients(raw), "the buffered preflight to run")
        assert client.flush() == 0
        budget = client.get_budget(CUSTOMER)
        assert (budget.spent, budget.reserved, budget.open_reservations) == (0, 0, 0)


@pytest.mark.parametrize("success", [True, False])
def test_an_offline_run_settled_by_a_record_without_an_id_frees_its_allowance(
    connect: Connect, durable: RedisServer, namespace: str, success: bool
) -> None:
    """Attack16 F5: the README's first way to settle (``record`` without an id) closes the
    client's own offline run; once it lands, the run's share of the allowance is free. Before:
    held for the life of the process, so after enough outages every offline run was refused."""
    with connect(
        redis_url=durable.url, namespace=namespace, on_outage="allowance", outage_allowance=10
    ) as client:
        durable.kill()
        assert client.preflight(AGENT, 10, CUSTOMER).offline
        assert client.outage_stats.held_units == 10
        durable.restart()
        client.record(AGENT, 5 if success else 0, CUSTOMER, success=success)
        assert client.flush() == 0
        assert client.outage_stats.held_units == 0
        assert client.get_budget(CUSTOMER).spent == (5 if success else 0)


def test_an_offline_run_released_by_idempotency_key_frees_its_allowance(
    connect: Connect, durable: RedisServer, namespace: str
) -> None:
    with connect(
        redis_url=durable.url, namespace=namespace, on_outage="allowance", outage_allowance=10
    ) as client:
        durable.kill()
        check = client.preflight(AGENT, 8, CUSTOMER, idempotency_key="job-1")
        assert check.offline
        released = client.release(idempotency_key="job-1", customer_id=CUSTOMER)
        assert released.status == "queued"
        assert client.outage_stats.held_units == 0
        again = client.preflight(AGENT, 8, CUSTOMER)  # the allowance is free again
        assert again.offline
        durable.restart()
        assert client.flush() == 0
        assert again.record(8).status == "late"
        budget = client.get_budget(CUSTOMER)
        assert (budget.spent, budget.reserved, budget.open_reservations) == (8, 0, 0)
        assert client.outage_stats.held_units == 0


def test_the_ceiling_is_still_enforced_offline(connect: Connect, namespace: str) -> None:
    with (
        running() as server,
        connect(
            redis_url=server.url, namespace=namespace, ceiling=5, on_outage="fail_open"
        ) as client,
    ):
        server.kill()
        refused = client.preflight(AGENT, 6, CUSTOMER)
        assert (refused.approved, refused.reason, refused.limit, refused.offline) == (
            False,
            "ceiling_exceeded",
            5,
            True,
        )
        assert client.outage_stats.offline_runs == 0


def test_a_record_of_a_real_reservation_is_queued_and_closes_it_later(
    connect: Connect, durable: RedisServer, namespace: str
) -> None:
    with connect(redis_url=durable.url, namespace=namespace, on_outage="fail_open") as client:
        check = client.preflight(AGENT, 5, CUSTOMER)
        assert not check.offline
        durable.kill()
        assert check.record(3).status == "queued"
        durable.restart()
        assert client.flush() == 0
        budget = client.get_budget(CUSTOMER)
        assert (budget.spent, budget.reserved, budget.open_reservations) == (3, 0, 0)


def test_a_queued_call_whose_attempts_all_landed_is_delivered_once(
    connect: Connect,
    proxy: ReplyLosingProxy,
    client: AgentBillClient,
    namespace: str,
) -> None:
    """Every attempt ran but lost its reply: the call is in doubt, so it is queued, and its
    delivery carries the same request id, so the record that did land is not charged again."""
    client.preflight(AGENT, 0, "warm-up").release()  # the library loaded: no reload detours
    with connect(redis_url=proxy.url, namespace=namespace, on_outage="fail_open") as lossy:
        proxy.lose_next_replies(10)
        queued = lossy.record(AGENT, 4, CUSTOMER)
        assert queued.status == "queued"
        assert client.get_budget(CUSTOMER).spent == 4  # it did land, more than once sent
        proxy.lose_next_replies(0)
        assert lossy.flush() == 0
        assert lossy.outage_stats.delivered == 1
    assert client.get_budget(CUSTOMER).spent == 4


def test_fail_closed_is_the_default_and_queues_nothing(connect: Connect, namespace: str) -> None:
    with running() as server, connect(redis_url=server.url, namespace=namespace) as client:
        check = client.preflight(AGENT, 1, CUSTOMER)
        server.kill()
        with pytest.raises(StoreUnavailableError):
            client.preflight(AGENT, 1, CUSTOMER)
        with pytest.raises(StoreUnavailableError):
            check.record(1)
        assert client.outage_stats.queued == 0


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"on_outage": "allowance"}, "outage_allowance"),
        ({"outage_allowance": 5}, "outage_allowance"),
        ({"on_outage": "open"}, "on_outage"),
        ({"on_outage": "allowance", "outage_allowance": -1}, "outage_allowance"),
    ],
)
def test_outage_settings_are_validated(settings: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        AgentBillClient(redis_url="redis://127.0.0.1:1/0", **settings)  # type: ignore[arg-type]
    assert info.value.field == field


def _offline_worker(
    url: str,
    namespace: str,
    allowance: int,
    runs: int,
    out: mp.Queue[tuple[int, int]],
    redis_is_back: EventType,
) -> None:
    """Try ``runs`` runs of 1 unit with Redis down and report (approved, queued); once Redis
    is back, deliver the queue and report (still queued, delivered)."""
    client = AgentBillClient(
        redis_url=url, namespace=namespace, on_outage="allowance", outage_allowance=allowance
    )
    approved = 0
    for _ in range(runs):
        try:
            check = client.preflight(AGENT, 1, CUSTOMER)
        except StoreUnavailableError:
            continue
        check.record(1)
        approved += 1
    out.put((approved, client.outage_stats.queued))
    redis_is_back.wait(timeout=60)
    out.put((client.flush(), client.outage_stats.delivered))
    client.close()


@pytest.mark.slow
def test_overshoot_is_bounded_by_processes_times_allowance(
    durable: RedisServer, namespace: str
) -> None:
    """Three processes with an allowance of 4 units each, a budget already spent, Redis down:
    each approves exactly 4 units offline, and every one is charged once Redis is back."""
    processes, allowance = 3, 4
    with AgentBillClient(redis_url=durable.url, namespace=namespace) as admin:
        admin.set_budget(CUSTOMER, 5)
        admin.record(AGENT, 5, CUSTOMER)
    durable.kill()
    out: mp.Queue[tuple[int, int]] = CTX.Queue()
    redis_is_back = CTX.Event()
    workers = [
        CTX.Process(
            target=_offline_worker,
            args=(durable.url, namespace, allowance, 10, out, redis_is_back),
        )
        for _ in range(processes)
    ]
    for w in workers:
        w.start()
    try:
        offline = [out.get(timeout=60) for _ in range(processes)]
        durable.restart()
        redis_is_back.set()
        delivered = [out.get(timeout=60) for _ in range(processes)]
    finally:
        for w in workers:
            w.join(timeout=30)
            if w.is_alive():
                w.kill()
    assert offline == [(allowance, allowance)] * processes  # every record waited in a queue
    assert delivered == [(0, allowance)] * processes
    with AgentBillClient(redis_url=durable.url, namespace=namespace) as admin:
        budget = admin.get_budget(CUSTOMER)
    # The overshoot is exactly processes x allowance, and every unit of it was charged.
    assert (budget.spent, budget.reserved) == (5 + processes * allowance, 0)


# -- a key approved offline: charged once when it runs again (attack16 F4) --------------------

OFFLINE = [
    pytest.param({"on_outage": "fail_open"}, id="fail_open"),
    pytest.param({"on_outage": "allowance", "outage_allowance": 10}, id="allowance"),
]


@pytest.mark.parametrize("outage", OFFLINE)
def test_a_keyed_preflight_approved_offline_and_recorded_replays_when_redis_is_back(
    connect: Connect, durable: RedisServer, namespace: str, outage: dict[str, object]
) -> None:
    """A preflight under an idempotency key approved offline, then recorded: the record, once
    it lands, writes the key naming the recorded run, as the preflight would have. The key
    then replays, in any process: it never reserves nor charges again."""
    with connect(redis_url=durable.url, namespace=namespace, **outage) as client:
        client.set_budget(CUSTOMER, 100)
        durable.kill()
        check = client.preflight(AGENT, 10, CUSTOMER, idempotency_key="K")
        assert check.offline
        assert check.record(6).status == "queued"
        durable.restart()
        assert client.flush() == 0
        with connect(redis_url=durable.url, namespace=namespace) as other:
            for c in (client, other):
                again = c.preflight(AGENT, 10, CUSTOMER, idempotency_key="K")
                assert (again.approved, again.replayed) == (True, True)
                assert again.reservation_id == check.reservation_id
                assert again.record(6).replayed  # charged nothing more
            budget = other.get_budget(CUSTOMER)
            assert (budget.spent, budget.reserved, budget.open_reservations) == (6, 0, 0)
            # The same key with other arguments is still a conflict, as for any preflight.
            with pytest.raises(InvalidRequestError):
                other.preflight(AGENT, 11, CUSTOMER, idempotency_key="K")


def test_a_keyed_preflight_approved_offline_and_released_reserves_afresh(
    connect: Connect, durable: RedisServer, namespace: str
) -> None:
    """A released key reserves afresh (the rule for any released key), offline too."""
    with connect(redis_url=durable.url, namespace=namespace, on_outage="fail_open") as client:
        client.set_budget(CUSTOMER, 100)
        durable.kill()
        check = client.preflight(AGENT, 10, CUSTOMER, idempotency_key="K")
        assert check.release().status == "queued"
        durable.restart()
        assert client.flush() == 0
        again = client.preflight(AGENT, 10, CUSTOMER, idempotency_key="K")
        assert (again.offline, again.replayed) == (False, False)
        assert again.reservation_id != check.reservation_id
        assert again.record(6).charged == 6
        budget = client.get_budget(CUSTOMER)
        assert (budget.spent, budget.reserved) == (6, 0)


def _job(client: AgentBillClient) -> JobRun:
    budget = JobBudget(
        client=client, agent_id=AGENT, estimated_units=10, customer_id=CUSTOMER, units=6
    )
    return budget.start(JobCall(job_id="job-1", attempt=0, arguments={}, headers={}), "rq:job-1")


def _job_succeeded_offline(worker: AgentBillClient, durable: RedisServer) -> None:
    """Run the job on ``worker`` while Redis is down: approved offline, its record queued;
    then Redis comes back (the record not yet delivered)."""
    worker.set_budget(CUSTOMER, 100)
    durable.kill()
    run = _job(worker)
    assert run.preflight().offline
    assert run.record("result").status == "queued"
    durable.restart()


@pytest.mark.parametrize("outage", OFFLINE)
def test_a_job_run_approved_offline_is_charged_once_when_the_job_runs_again(
    durable: RedisServer, namespace: str, outage: dict[str, Any]
) -> None:
    """README "How job runs are charged": a job already recorded is charged once, whatever its
    retry history. Its first run was approved offline (Redis down) and its record queued; the
    same job id run again after Redis is back (a redelivery to this worker or another, RQ
    enqueueing the id again) replays the recorded run. Before: reserved afresh, spent 12."""
    with (
        AgentBillClient(redis_url=durable.url, namespace=namespace, **outage) as worker,
        AgentBillClient(redis_url=durable.url, namespace=namespace, **outage) as other,
    ):
        _job_succeeded_offline(worker, durable)
        assert worker.flush() == 0
        for client in (worker, other):
            run = _job(client)
            check = run.preflight()
            assert (check.offline, check.replayed) == (False, True)
            assert run.record("result").replayed  # charged nothing more
        budget = other.get_budget(CUSTOMER)
        assert (budget.spent, budget.reserved, budget.open_reservations) == (6, 0, 0)


def test_a_job_run_approved_offline_replaces_a_released_run_of_the_key(
    durable: RedisServer, namespace: str
) -> None:
    """Redis back, another worker ran the job before the offline run's record was delivered,
    and failed (released). The offline run succeeded: once its record lands, the key names it,
    so the job run a third time is charged nothing more (the key would otherwise reserve
    afresh, as for a released run, and charge the job twice)."""
    with (
        AgentBillClient(redis_url=durable.url, namespace=namespace, on_outage="fail_open") as a,
        AgentBillClient(redis_url=durable.url, namespace=namespace) as b,
    ):
        _job_succeeded_offline(a, durable)
        failed = _job(b)
        assert not failed.preflight().offline
        assert failed.release() is not None
        assert a.flush() == 0  # the offline run's record lands now
        third = _job(b)
        assert third.preflight().replayed
        assert third.record("result").replayed  # charged nothing more
        budget = b.get_budget(CUSTOMER)
        assert (budget.spent, budget.reserved, budget.open_reservations) == (6, 0, 0)


@pytest.mark.parametrize("outage", OFFLINE)
def test_a_keyed_offline_run_recorded_without_an_id_replays_when_redis_is_back(
    connect: Connect, durable: RedisServer, namespace: str, outage: dict[str, Any]
) -> None:
    """The README's first way to settle (a record without an id) closes the client's own
    offline run: charged late, and its key replays the recorded run, as for a named record."""
    with connect(redis_url=durable.url, namespace=namespace, **outage) as client:
        client.set_budget(CUSTOMER, 100)
        durable.kill()
        check = client.preflight(AGENT, 10, CUSTOMER, idempotency_key="K")
        assert check.offline
        durable.restart()
        recorded = client.record(AGENT, 6, CUSTOMER)
        assert (recorded.status, recorded.reservation_id) == ("late", check.reservation_id)
        assert client.outage_stats.held_units == 0
        with connect(redis_url=durable.url, namespace=namespace) as other:
            again = other.preflight(AGENT, 10, CUSTOMER, idempotency_key="K")
            assert (again.replayed, again.reservation_id) == (True, check.reservation_id)
            budget = other.get_budget(CUSTOMER)
            assert (budget.spent, budget.reserved, budget.open_reservations) == (6, 0, 0)
