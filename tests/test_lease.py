"""Leases: slices of a budget reserved once, runs decided locally, and no overspend.

Each test body runs on the sync and the async client (the async lease behind the suite's
blocking facade); the race runs real processes.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from agentbill import AgentBillClient, AsyncAgentBillClient, InvalidRequestError, LeaseCheck
from tests._servers import RedisServer
from tests.test_outage import ReplyLosingProxy, proxy

__all__ = ["proxy"]  # the reply-losing proxy fixture, defined with the outage tests


class BlockingLease:
    """An AsyncLease driven to completion on the facade's event loop."""

    def __init__(self, lease: Any, runner: asyncio.Runner) -> None:
        self._lease, self._runner = lease, runner

    def preflight(self, units: int) -> LeaseCheck:
        check: LeaseCheck = self._runner.run(self._lease.preflight(units))
        return check

    def close(self) -> None:
        self._runner.run(self._lease.close())

    def stats(self) -> Any:
        return self._lease.stats()

    def __enter__(self) -> BlockingLease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@pytest.fixture(params=["sync", "async"])
def make_lease(
    request: pytest.FixtureRequest, redis_server: RedisServer, namespace: str
) -> Iterator[tuple[AgentBillClient, Any]]:
    """(a sync client for looking, a function making leases on the client under test)."""
    with AgentBillClient(redis_url=redis_server.url, namespace=namespace) as looker:
        if request.param == "sync":
            yield looker, looker.lease
            return
        with asyncio.Runner() as runner:
            aclient = AsyncAgentBillClient(redis_url=redis_server.url, namespace=namespace)
            yield looker, lambda *a, **k: BlockingLease(aclient.lease(*a, **k), runner)
            runner.run(aclient.close())


def evalsha_calls(raw: redis.Redis) -> int:
    return int(raw.info("commandstats").get("cmdstat_evalsha", {"calls": 0})["calls"])


def test_runs_are_decided_locally_within_a_slice(
    make_lease: tuple[AgentBillClient, Any], raw: redis.Redis
) -> None:
    client, lease_of = make_lease
    client.set_budget("c1", 100)
    client.preflight("agent", 0, "warm-up").release()  # the script is loaded: no NOSCRIPT
    with lease_of("agent", "c1", slice_units=10) as lease:
        before = evalsha_calls(raw)
        runs = [lease.preflight(1) for _ in range(10)]
        assert evalsha_calls(raw) - before == 1  # one slice, ten decisions
        assert all(r.approved for r in runs)
        assert client.get_budget("c1").reserved == 10  # the slice, held in Redis
        for r in runs:
            r.record(1)
        eleventh = lease.preflight(3)  # the slice is full: a new one
        assert eleventh.approved
        eleventh.release()
    budget = client.get_budget("c1")
    assert (budget.spent, budget.reserved, budget.open_reservations) == (10, 0, 0)
    assert lease.stats().slices == 2


def test_slices_shrink_to_what_the_budget_has_left(
    make_lease: tuple[AgentBillClient, Any],
) -> None:
    """A budget of 30 and slices of 100: every unit is still usable, and not one more."""
    client, lease_of = make_lease
    client.set_budget("c1", 30)
    approved = 0
    with lease_of("agent", "c1", slice_units=100) as lease:
        for _ in range(40):
            run = lease.preflight(1)
            if run.approved:
                approved += 1
                run.record(1)
        refused = lease.preflight(1)
    assert approved == 30
    assert (refused.reason, refused.scope) == ("budget_exhausted", "customer")
    budget = client.get_budget("c1")
    assert (budget.spent, budget.reserved) == (30, 0)


def test_a_run_larger_than_a_slice_gets_its_own(make_lease: tuple[AgentBillClient, Any]) -> None:
    client, lease_of = make_lease
    with lease_of("agent", "c1", slice_units=5) as lease:
        big = lease.preflight(12)
        assert big.approved
        big.record(9)
    assert client.get_budget("c1").spent == 9


def test_closing_with_runs_open_charges_their_estimates(
    make_lease: tuple[AgentBillClient, Any],
) -> None:
    client, lease_of = make_lease
    lease = lease_of("agent", "c1", slice_units=10)
    done, running = lease.preflight(2), lease.preflight(3)
    done.record(1)
    lease.close()
    running.record(1)  # after the close: changes nothing
    budget = client.get_budget("c1")
    assert (budget.spent, budget.reserved) == (1 + 3, 0)
    with pytest.raises(InvalidRequestError) as info:
        lease.preflight(1)
    assert info.value.field == "lease"


def test_a_slice_near_its_ttl_is_settled_and_replaced(
    make_lease: tuple[AgentBillClient, Any],
) -> None:
    client, lease_of = make_lease
    with lease_of("agent", "c1", slice_units=10, ttl=1) as lease:
        first = lease.preflight(1)
        first.record(1)
        time.sleep(0.85)  # past 80% of the slice's 1 s ttl: no more local decisions on it
        second = lease.preflight(1)
        assert second.reservation_id != first.reservation_id
        assert client.get_budget("c1").spent == 1  # the first slice was settled
        second.record(1)
    assert client.get_budget("c1").spent == 2


def test_bad_lease_arguments_name_the_field(redis_server: RedisServer, namespace: str) -> None:
    with AgentBillClient(redis_url=redis_server.url, namespace=namespace) as client:
        cases: list[tuple[dict[str, Any], str]] = [
            ({"slice_units": 0}, "slice_units"),
            ({"slice_units": 5, "ttl": 0}, "ttl"),
        ]
        for kwargs, field in cases:
            with pytest.raises(InvalidRequestError) as info:
                client.lease("agent", "c1", **kwargs)
            assert info.value.field == field
        with (
            client.lease("agent", "c1", slice_units=5) as lease,
            pytest.raises(InvalidRequestError) as info,
        ):
            lease.preflight(-1)
        assert info.value.field == "estimated_units"


def _leaser(url: str, namespace: str, tries: int, out: mp.Queue[int]) -> None:
    with (
        AgentBillClient(redis_url=url, namespace=namespace) as client,
        client.lease("agent", "hot", slice_units=10) as lease,
    ):
        approved = 0
        for _ in range(tries):
            run = lease.preflight(1)
            if run.approved:
                approved += 1
                run.record(1)
    out.put(approved)


def test_racing_processes_with_leases_never_overspend(
    redis_server: RedisServer, namespace: str
) -> None:
    """4 processes x 100 runs of 1 unit, slices of 10, a budget of 137."""
    limit, procs_n = 137, 4
    with AgentBillClient(redis_url=redis_server.url, namespace=namespace) as admin:
        admin.set_budget("hot", limit)
    ctx = mp.get_context("spawn")
    out: mp.Queue[int] = ctx.Queue()
    procs = [
        ctx.Process(target=_leaser, args=(redis_server.url, namespace, 100, out))
        for _ in range(procs_n)
    ]
    for p in procs:
        p.start()
    approved = sum(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    with AgentBillClient(redis_url=redis_server.url, namespace=namespace) as admin:
        budget = admin.get_budget("hot")
    assert approved <= limit  # no overspend, ever
    assert budget.spent == approved  # every local decision was charged, once
    assert (budget.reserved, budget.open_reservations) == (0, 0)
    # Slices held by others at the moment a process gave up are the only units left unused.
    assert approved >= limit - procs_n * 10


def test_a_slice_whose_reply_was_lost_is_reserved_once(
    proxy: ReplyLosingProxy, redis_server: RedisServer, namespace: str
) -> None:
    """A slice is one preflight with a client-made reservation id: the client's retry after a
    lost reply finds its own reservation, so the lease holds one slice, not two."""
    with AgentBillClient(redis_url=redis_server.url, namespace=namespace) as looker:
        looker.preflight("agent", 0, "warm-up").release()  # scripts loaded: no NOSCRIPT detour
        with (
            AgentBillClient(redis_url=proxy.url, namespace=namespace) as lossy,
            lossy.lease("agent", "c1", slice_units=10) as lease,
        ):
            proxy.lose_next_replies(1)
            run = lease.preflight(1)
            assert (proxy.lost, run.approved) == (1, True)
            budget = looker.get_budget("c1")
            assert (budget.reserved, budget.open_reservations) == (10, 1)
            run.record(1)
        budget = looker.get_budget("c1")
        assert (budget.spent, budget.reserved, budget.open_reservations) == (1, 0, 0)
