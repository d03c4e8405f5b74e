"""Leases: slices of a budget reserved once, runs decided locally, and no overspend.

Each test body runs on the sync and the async client (the async lease behind the suite's
blocking facade); the race runs real processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing as mp
import random
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentbill import (
    AgentBillClient,
    AsyncAgentBillClient,
    Check,
    InvalidRequestError,
    LeaseCheck,
)
from agentbill._lease import LeaseBook
from tests._faults import ReplyLosingProxy, proxy, wait_until
from tests._processes import CTX
from tests._servers import RedisServer

T = TypeVar("T")

__all__ = ["proxy"]  # the reply-losing proxy fixture, defined in tests/_faults.py


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

    def flush(self) -> int:
        """Deliver what the lease's client has queued."""
        left: int = self._runner.run(self._lease._client.flush())
        return left

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


def fcall_calls(raw: redis.Redis) -> int:
    return int(raw.info("commandstats").get("cmdstat_fcall", {"calls": 0})["calls"])


def test_runs_are_decided_locally_within_a_slice(
    make_lease: tuple[AgentBillClient, Any], raw: redis.Redis
) -> None:
    client, lease_of = make_lease
    client.set_budget("c1", 100)
    client.preflight("agent", 0, "warm-up").release()  # the library is loaded: no reload detour
    with lease_of("agent", "c1", slice_units=10) as lease:
        before = fcall_calls(raw)
        runs = [lease.preflight(1) for _ in range(10)]
        assert fcall_calls(raw) - before == 1  # one slice, ten decisions
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


def test_with_on_the_async_clients_lease_says_async_with(
    redis_server: RedisServer, namespace: str
) -> None:
    """The twin of test_run's: ``with`` where ``async with`` is meant names the fix."""

    async def main() -> None:
        async with AsyncAgentBillClient(redis_url=redis_server.url, namespace=namespace) as c:
            with pytest.raises(TypeError, match="use `async with`"), c.lease("a", slice_units=5):
                pass

    asyncio.run(main())


def test_async_with_on_the_sync_clients_lease_says_with(client: AgentBillClient) -> None:
    async def main() -> None:
        with pytest.raises(TypeError, match="use `with`"):
            async with client.lease("a", slice_units=5):
                pass

    asyncio.run(main())


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
    out: mp.Queue[int] = CTX.Queue()
    procs = [
        CTX.Process(target=_leaser, args=(redis_server.url, namespace, 100, out))
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
        looker.preflight("agent", 0, "warm-up").release()  # the library loaded: no reload detour
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


# -- a run's record and release behave like a Check's (issue 16, finding 3) ----------------------


def test_a_run_recorded_then_released_is_charged_once(
    make_lease: tuple[AgentBillClient, Any],
) -> None:
    """The try/finally that always releases: 4 runs of record(5) + release() charge 20."""
    client, lease_of = make_lease
    with lease_of("agent", "c1", slice_units=100) as lease:
        for _ in range(4):
            run = lease.preflight(10)
            try:
                recorded = run.record(5)
            finally:
                released = run.release()
            assert (recorded.status, recorded.charged, recorded.replayed) == ("recorded", 5, False)
            assert released == replace(recorded, replayed=True)  # a no-op: the first outcome
    budget = client.get_budget("c1")
    assert (budget.spent, budget.reserved, budget.open_reservations) == (20, 0, 0)


def test_a_run_recorded_twice_charges_its_first_record(
    make_lease: tuple[AgentBillClient, Any],
) -> None:
    client, lease_of = make_lease
    with lease_of("agent", "c1", slice_units=100) as lease:
        run = lease.preflight(10)
        first = run.record(3)
        again = run.record(7)
        assert (again.status, again.charged, again.replayed) == ("recorded", 3, True)
        assert first.reservation_id == run.reservation_id
    assert client.get_budget("c1").spent == 3


def test_a_record_after_a_release_is_charged_late(
    make_lease: tuple[AgentBillClient, Any],
) -> None:
    """As for a Check: a release never erases a record. The record is charged, flagged late,
    with its slice, or with the next slice settled (or on close) if its own was settled."""
    client, lease_of = make_lease
    with lease_of("agent", "c1", slice_units=10) as lease:
        run = lease.preflight(4)
        assert run.release().status == "released"
        late = run.record(9)
        assert (late.status, late.charged, late.late, late.replayed) == ("late", 9, True, False)
        assert run.release() == replace(late, replayed=True)  # closed: nothing changes
        assert run.record(1) == replace(late, replayed=True)

        early = lease.preflight(1)  # the same slice: 9 + 1 fits in 10
        early.release()
        lease.preflight(10).record(10)  # a second slice; the first is settled first (9)
        assert client.get_budget("c1").spent == 9
        lease.preflight(10).release()  # a third; the second is settled (10)
        assert client.get_budget("c1").spent == 9 + 10
        early.record(5)  # its slice is settled: charged with the next one settled
        last = lease.preflight(11)  # a fourth; the third is settled (0 + 5)
        assert client.get_budget("c1").spent == 9 + 10 + 5
        last.release()
    budget = client.get_budget("c1")
    assert (budget.spent, budget.reserved, budget.open_reservations) == (24, 0, 0)


def test_a_run_recorded_after_its_release_and_the_leases_close_is_charged_late(
    make_lease: tuple[AgentBillClient, Any],
) -> None:
    """Attack a19: as for a Check, a record after the run's release is charged, flagged late,
    even once the lease is closed (charged on its own, through the client's delivery queue: a
    run's record does no I/O). Before: InvalidRequestError, and the units were lost."""
    client, lease_of = make_lease
    lease = lease_of("agent", "c1", slice_units=10)
    run = lease.preflight(4)
    run.release()
    lease.close()
    late = run.record(3)
    assert (late.status, late.charged, late.late, late.replayed) == ("late", 3, True, False)
    assert run.record(3) == replace(late, replayed=True)  # closed once: charged once
    flush = lease.flush if isinstance(lease, BlockingLease) else lease._client.flush
    wait_until(lambda: flush() == 0, "the late record to be delivered")
    budget = client.get_budget("c1")
    assert (budget.spent, budget.reserved, budget.open_reservations) == (3, 0, 0)
    recorded = [(e.units, e.reason) for e in client.events("c1") if e.type == "recorded"]
    assert recorded == [(0, "recorded"), (3, "late")]  # the slice, then the run alone


def test_a_lease_under_a_concurrency_limit_approves_what_plain_preflights_would(
    make_lease: tuple[AgentBillClient, Any],
) -> None:
    """Attack a11: with at most one run in flight and runs made one at a time, plain
    preflights approve every run; a lease approved 5 and then refused ``concurrency_limited``,
    because its used-up slice stayed open while it asked for the next one."""
    client, lease_of = make_lease
    client.set_concurrency_limit("c1", 1)
    plain = []
    for _ in range(8):
        check = client.preflight("agent", 1, "c1")
        plain.append(check.approved)
        if check.approved:
            check.record(1)
    assert plain == [True] * 8
    with lease_of("agent", "c1", slice_units=5) as lease:
        leased = []
        for _ in range(8):
            run = lease.preflight(1)
            leased.append(run.reason or "approved")
            if run.approved:
                run.record(1)
    assert leased == ["approved"] * 8
    budget = client.get_budget("c1")
    assert (budget.spent, budget.reserved, budget.open_reservations) == (16, 0, 0)


def test_a_slice_whose_record_was_interrupted_stays_owed_until_it_is_sent() -> None:
    """No I/O: the book's side of attack a01. A settled slice is handed out again, with the
    same charge, until its record is sent (a transient error queues it; anything else that
    interrupts the send leaves it owed); a second record of a recorded slice charges nothing."""
    book = LeaseBook("agent", "c1", slice_units=10, ttl=60)
    check = Check(
        approved=True, reason=None, reservation_id="r", expires_at=None, remaining=None,
        limit=None, agent_id="agent", customer_id="c1", estimated_units=10,
    )  # fmt: skip
    book.add_slice(check, 10, 1).record(1)
    [settling] = book.to_settle(replacing=True)
    assert settling.charge == 1
    assert book.to_settle() == []  # being sent: not handed out twice at once
    book.unsent(settling)  # the send was interrupted
    [again] = book.to_settle(closing=True)
    assert (again, again.charge) == (settling, 1)
    book.sent(again)
    assert book.to_settle(closing=True) == []
    assert (book.stats().settled, book.stats().charged, book.stats().held) == (1, 1, 0)


def test_a_late_record_no_slice_carries_is_charged_on_close(
    make_lease: tuple[AgentBillClient, Any],
) -> None:
    client, lease_of = make_lease
    client.set_budget("c1", 10)
    lease = lease_of("agent", "c1", slice_units=10, ttl=1)
    run = lease.preflight(10)
    run.release()
    time.sleep(0.85)  # past 80% of the slice's ttl: it is settled on the next round trip
    assert not lease.preflight(11).approved  # settled; no other slice is reserved
    assert lease.stats().held == 0
    run.record(6)  # no slice left to carry it
    lease.close()
    budget = client.get_budget("c1")
    assert (budget.spent, budget.reserved, budget.open_reservations) == (6, 0, 0)


def test_a_bad_record_changes_nothing(make_lease: tuple[AgentBillClient, Any]) -> None:
    client, lease_of = make_lease
    with lease_of("agent", "c1", slice_units=100) as lease:
        run = lease.preflight(10)
        with pytest.raises(InvalidRequestError) as info:
            run.record(-1)
        assert info.value.field == "units"
        assert run.record(4).charged == 4  # still open: the bad call did not close it
    assert client.get_budget("c1").spent == 4


def test_a_refused_run_holds_nothing_to_close(make_lease: tuple[AgentBillClient, Any]) -> None:
    client, lease_of = make_lease
    client.set_budget("c1", 3)
    with lease_of("agent", "c1", slice_units=10) as lease:
        refused = lease.preflight(5)
        assert not refused.approved
        for close in (lambda: refused.record(1), refused.release):
            with pytest.raises(InvalidRequestError) as info:
                close()
            assert info.value.field == "reservation_id"


def test_closing_the_lease_is_a_runs_first_close(
    make_lease: tuple[AgentBillClient, Any],
) -> None:
    client, lease_of = make_lease
    lease = lease_of("agent", "c1", slice_units=10)
    running = lease.preflight(3)
    lease.close()  # charges the open run's estimate
    after = running.record(1)
    assert (after.status, after.charged, after.replayed) == ("recorded", 3, True)
    assert client.get_budget("c1").spent == 3


# -- a slice fits every rule a plain preflight checks (issue 16, finding 4) ----------------------


@pytest.fixture(params=["sync", "async"])
def lease_client(
    request: pytest.FixtureRequest, redis_server: RedisServer, namespace: str
) -> Iterator[Callable[..., tuple[AgentBillClient, Any]]]:
    """make(**client_kwargs) -> (that client, sync, for looking; its leases, on the client under
    test)."""
    with contextlib.ExitStack() as stack:
        runner = stack.enter_context(asyncio.Runner())

        def make(**kwargs: Any) -> tuple[AgentBillClient, Any]:
            looker = stack.enter_context(
                AgentBillClient(redis_url=redis_server.url, namespace=namespace, **kwargs)
            )
            if request.param == "sync":
                return looker, looker.lease
            aclient = AsyncAgentBillClient(
                redis_url=redis_server.url, namespace=namespace, **kwargs
            )
            stack.callback(lambda: runner.run(aclient.close()))
            return looker, lambda *a, **k: BlockingLease(aclient.lease(*a, **k), runner)

        yield make


def _approved(lease: Any, units: int, times: int) -> int:
    approved = 0
    for _ in range(times):
        run = lease.preflight(units)
        if run.approved:
            approved += 1
            run.record(units)
    return approved


def test_slices_fit_the_clients_ceiling(
    lease_client: Callable[..., tuple[AgentBillClient, Any]],
) -> None:
    client, lease_of = lease_client(ceiling=5)
    with lease_of("agent", "c1", slice_units=50) as lease:
        assert _approved(lease, 1, 12) == 12
        over = lease.preflight(6)
        assert (over.approved, over.reason) == (False, "ceiling_exceeded")
        assert lease.preflight(5).approved
    assert client.get_budget("c1").spent == 12 + 5


def test_slices_fit_the_tasks_remaining_ceiling(
    lease_client: Callable[..., tuple[AgentBillClient, Any]],
) -> None:
    client, lease_of = lease_client()
    client.open_task("t", 7, "c1")
    client.record("agent", 3, "c1", task_ref="t")
    with lease_of("agent", "c1", slice_units=50, task_ref="t") as lease:
        assert _approved(lease, 1, 6) == 4
        refused = lease.preflight(1)
        assert (refused.reason, refused.scope) == ("task_ceiling_exceeded", "task")
    assert client.get_task("t", "c1").used == 7


def test_slices_fit_the_agents_budget(
    lease_client: Callable[..., tuple[AgentBillClient, Any]],
) -> None:
    client, lease_of = lease_client()
    client.set_budget("c1", 100)
    client.set_budget("c1", 9, agent_id="agent")
    with lease_of("agent", "c1", slice_units=50) as lease:
        assert _approved(lease, 1, 12) == 9
    assert client.get_budget("c1").spent == 9


@pytest.mark.parametrize("agent", [False, True])
def test_slices_fit_the_rate_limits_burst(
    lease_client: Callable[..., tuple[AgentBillClient, Any]], agent: bool
) -> None:
    client, lease_of = lease_client()
    scope = {"agent_id": "agent"} if agent else {}
    client.set_rate_limit("c1", 6, 3600, burst=6, **scope)
    with lease_of("agent", "c1", slice_units=50) as lease:
        assert _approved(lease, 1, 10) == 6
        refused = lease.preflight(1)
        assert (refused.reason, refused.scope) == ("rate_limited", "agent" if agent else "customer")
    budget = client.get_budget("c1")
    assert (budget.spent, budget.reserved) == (6, 0)


def test_slices_fit_what_the_rate_allows_now(
    lease_client: Callable[..., tuple[AgentBillClient, Any]],
) -> None:
    """A burst of 10 with 7 taken: a slice of 10 waits, a run of 3 (what a plain preflight
    would approve) does not."""
    client, lease_of = lease_client()
    client.set_rate_limit("c1", 10, 3600, burst=10)
    client.preflight("other", 7, "c1").release()
    with lease_of("agent", "c1", slice_units=10) as lease:
        assert lease.preflight(3).approved
        assert not lease.preflight(1).approved


@dataclass(frozen=True)
class RuleState:
    """What a customer's rules and counters look like before the comparison (see _prepare)."""

    ceiling: int | None
    held: int  # units of a reservation another agent holds open
    rate: tuple[bool, int, int, int] | None  # (agent scope?, units per hour, burst, taken)
    spent: int  # charged directly to the customer (by another agent)
    agent_spent: int
    customer_limit: int | None
    agent_limit: int | None
    task: tuple[int, int] | None  # (ceiling, used)
    concurrency: tuple[bool, int] | None  # (agent scope?, max in flight)


def _rate(draw: st.DrawFn) -> tuple[bool, int, int, int]:
    burst = draw(st.integers(1, 20))
    return draw(st.booleans()), draw(st.integers(1, 20)), burst, draw(st.integers(0, burst))


def _maybe(strategy: st.SearchStrategy[T]) -> st.SearchStrategy[T | None]:
    """None (the rule is not set) two times in three: examples where every rule but one or two
    lets the run through are the ones that tell slice sizing apart."""
    return st.sampled_from([True, True, False]).flatmap(
        lambda unset: st.none() if unset else strategy
    )


rule_states = st.builds(
    RuleState,
    ceiling=_maybe(st.integers(1, 20)),
    held=st.integers(0, 10),
    rate=_maybe(st.composite(_rate)()),
    spent=st.integers(0, 30),
    agent_spent=st.integers(0, 20),
    customer_limit=_maybe(st.integers(0, 80)),
    agent_limit=_maybe(st.integers(0, 50)),
    task=_maybe(st.tuples(st.integers(0, 30), st.integers(0, 20))),
    concurrency=_maybe(st.tuples(st.booleans(), st.integers(0, 3))),
)


def _prepare(admin: AgentBillClient, customer: str, s: RuleState) -> None:
    """Bring ``customer`` to state ``s``, the same way for every customer it is used on."""
    if s.held:
        admin.preflight("holder", s.held, customer)  # kept open
    if s.rate is not None:
        on_agent, units, burst, taken = s.rate
        agent = "agent" if on_agent else None
        admin.set_rate_limit(customer, units, 3600, burst=burst, agent_id=agent)
        admin.preflight(agent or "taker", taken, customer).release()  # takes `taken` of the rate
    admin.record("spender", s.spent, customer)
    admin.record("agent", s.agent_spent, customer)
    if s.task is not None:
        ceiling, used = s.task
        admin.open_task("t", ceiling, customer)
        admin.record("spender", used, customer, task_ref="t")
    admin.set_budget(customer, s.customer_limit)
    if s.agent_limit is not None:
        admin.set_budget(customer, s.agent_limit, agent_id="agent")
    if s.concurrency is not None:
        on_agent, max_in_flight = s.concurrency
        admin.set_concurrency_limit(customer, max_in_flight, agent_id="agent" if on_agent else None)


def test_a_lease_approves_what_a_plain_preflight_would(
    lease_client: Callable[..., tuple[AgentBillClient, Any]],
) -> None:
    """On two customers brought to the same state, a fresh lease's decision on a run is the
    plain preflight's, whatever the slice size: every rule a preflight checks, slices fit."""
    admin = lease_client()[0]
    clients: dict[int | None, tuple[AgentBillClient, Any]] = {}
    examples = itertools.count()

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(state=rule_states, slice_units=st.integers(1, 60), units=st.integers(0, 25))
    def compare(state: RuleState, slice_units: int, units: int) -> None:
        n = next(examples)
        if state.ceiling not in clients:
            clients[state.ceiling] = lease_client(ceiling=state.ceiling)
        plain_client, lease_of = clients[state.ceiling]
        task_ref = "t" if state.task is not None else None
        leased, plain = f"L{n}", f"P{n}"
        _prepare(admin, leased, state)
        _prepare(admin, plain, state)
        with lease_of("agent", leased, slice_units=slice_units, task_ref=task_ref) as lease:
            by_lease = lease.preflight(units)
        by_plain = plain_client.preflight("agent", units, plain, task_ref=task_ref)
        assert by_lease.approved == by_plain.approved, (by_lease, by_plain)

    compare()


def test_threads_sharing_a_lease_charge_every_run_once(client: AgentBillClient) -> None:
    """8 threads x 60 runs on one lease, each closed twice (a record, then the release of a
    try/finally; or both from two racing threads): each run's unit is charged exactly once."""
    client.set_budget("c1", 10_000)
    with client.lease("agent", "c1", slice_units=25) as lease:

        def worker(seed: int) -> int:
            rng = random.Random(seed)
            recorded = 0
            for _ in range(60):
                run = lease.preflight(2)
                assert run.approved
                if rng.random() < 0.5:
                    try:
                        recorded += run.record(1).charged
                    finally:
                        run.release()
                else:  # the two closes race from two threads
                    with ThreadPoolExecutor(2) as pair:
                        closes = [pair.submit(run.record, 1), pair.submit(run.release)]
                        outcomes = [c.result() for c in closes]
                    first = next(o for o in outcomes if not o.replayed)
                    recorded += first.charged if first.status == "recorded" else 0
                    recorded += sum(o.charged for o in outcomes if o.status == "late")
            return recorded

        with ThreadPoolExecutor(8) as pool:
            charged = sum(pool.map(worker, range(8)))
    budget = client.get_budget("c1")
    assert (budget.spent, budget.reserved, budget.open_reservations) == (charged, 0, 0)
    assert charged == 8 * 60  # a record always counts: before or after the release
