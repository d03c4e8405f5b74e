"""check.extend(units) and run.extend(units): more on the same reservation, under every rule.

Against the suite's real redis-server, each body on both clients where it can run there:
an extension is approved only if every rule a preflight checks would pass for the extra units
(the ceiling on the new total, the task ceiling, the customer's and the agent's budgets, their
rate limits; concurrency unaffected), else refused with the typed error and nothing changed
(but the ledger's 'refused' entry); the extra is settled with the rest; a reservation that is
not open cannot be extended; a retry of one extension reserves once; bad input writes nothing;
racing processes never take a budget over and never leave units held.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from multiprocessing.synchronize import Barrier
from typing import Any

import pytest
import redis

from agentbill import (
    AgentBillClient,
    AsyncAgentBillClient,
    BudgetExhaustedError,
    CeilingExceededError,
    Check,
    InvalidRequestError,
    RateLimitedError,
    RunBlockedError,
    TaskCeilingExceededError,
    _core,
)
from agentbill._models import MAX_UNITS
from tests._async_facade import Blocking
from tests._processes import CTX
from tests._servers import RedisServer
from tests.test_accounting import _refused_without_a_write, due, dump
from tests.test_concurrency import BARRIER_TIMEOUT, run_processes

__all__ = ["due"]  # the fixture with due reservations, defined with the accounting tests

AGENT, CUSTOMER = "agent", "u"


def state(c: AgentBillClient, raw: redis.Redis, check: Any) -> tuple[object, ...]:
    """Everything an extension may change but the ledger: budgets, the task, the reservation."""
    customer = c.get_budget(CUSTOMER)
    agent = c.get_budget(CUSTOMER, agent_id=AGENT)
    keys = c._script_settings.keys.customer(CUSTOMER)
    return (
        (customer.spent, customer.reserved, customer.open_reservations),
        (agent.spent, agent.reserved),
        c.get_task(check.task_ref, CUSTOMER) if check.task_ref else None,
        raw.hget(keys.res, check.reservation_id),
        raw.hgetall(keys.budget),
    )


def test_an_extension_is_settled_with_the_rest(both_clients: AgentBillClient) -> None:
    c = both_clients
    c.set_budget(CUSTOMER, 1_000)
    check = c.preflight(AGENT, 100, CUSTOMER, task_ref="t", task_ceiling=500)
    more = check.extend(50)
    assert (more.approved, more.reservation_id, more.estimated_units) == (
        True,
        check.reservation_id,
        150,
    )
    assert more.remaining == 850
    assert check.estimated_units == 100  # the first Check is unchanged
    assert c.get_budget(CUSTOMER).reserved == 150
    assert c.get_budget(CUSTOMER, agent_id=AGENT).reserved == 150
    assert c.get_task("t", CUSTOMER).reserved == 150
    even_more = more.extend(25)
    assert even_more.estimated_units == 175
    settled = check.record(160)  # any Check of the reservation closes it, the whole of it
    assert (settled.charged, settled.released) == (160, 175)
    budget = c.get_budget(CUSTOMER)
    assert (budget.spent, budget.reserved, budget.open_reservations) == (160, 0, 0)
    assert c.get_task("t", CUSTOMER).reserved == 0
    assert c.get_task("t", CUSTOMER).used == 160

    released = c.preflight(AGENT, 10, CUSTOMER).extend(90).release()
    assert released.released == 100
    assert c.get_budget(CUSTOMER).reserved == 0
    ledger = [(e.type, e.units, e.reason) for e in c.events(CUSTOMER)]
    assert ledger.count(("approved", 50, "extended")) == 1
    assert ledger.count(("approved", 90, "extended")) == 1


def test_an_extended_reservation_that_expires_gives_everything_back(
    both_clients: AgentBillClient,
) -> None:
    c = both_clients
    c.preflight(AGENT, 10, CUSTOMER, ttl=1).extend(30)
    assert c.get_budget(CUSTOMER).reserved == 40
    time.sleep(1.1)  # the reservation's ttl: an extension does not move its expiry
    budget = c.get_budget(CUSTOMER)
    assert (budget.reserved, budget.open_reservations, budget.spent) == (0, 0, 0)


RULES: list[tuple[str, type[RunBlockedError], str]] = [
    ("customer budget", BudgetExhaustedError, "customer"),
    ("agent budget", BudgetExhaustedError, "agent"),
    ("task ceiling", TaskCeilingExceededError, "task"),
    ("customer rate", RateLimitedError, "customer"),
    ("agent rate", RateLimitedError, "agent"),
]


@pytest.mark.parametrize(("rule", "error", "scope"), RULES, ids=[r[0] for r in RULES])
def test_each_rule_approves_what_fits_and_refuses_the_rest_changing_nothing(
    both_clients: AgentBillClient,
    raw: redis.Redis,
    rule: str,
    error: type[RunBlockedError],
    scope: str,
) -> None:
    """Every rule has room for 100 units: a 60-unit run extended by 40 fits exactly; one
    more unit is refused by that rule, with its numbers, and changes nothing."""
    c = both_clients
    task = None
    if rule == "customer budget":
        c.set_budget(CUSTOMER, 100)
    elif rule == "agent budget":
        c.set_budget(CUSTOMER, 100, agent_id=AGENT)
    elif rule == "task ceiling":
        task = "t"
    elif rule == "customer rate":
        c.set_rate_limit(CUSTOMER, 100, 3600)
    else:
        c.set_rate_limit(CUSTOMER, 100, 3600, agent_id=AGENT)
    check = c.preflight(AGENT, 60, CUSTOMER, task_ref=task, task_ceiling=100 if task else None)
    assert check.extend(40).estimated_units == 100
    before = state(c, raw, check)
    with pytest.raises(error) as refused:
        check.extend(1)
    assert refused.value.scope == scope
    assert refused.value.check.reservation_id == check.reservation_id
    if error is not RateLimitedError:
        assert refused.value.limit == 100
    assert state(c, raw, check) == before
    assert [e.reason for e in c.events(CUSTOMER) if e.type == "refused"] == [refused.value.reason]
    assert check.record(100).charged == 100


def test_the_ceiling_bounds_the_reservations_new_total(
    redis_server: RedisServer, namespace: str, raw: redis.Redis
) -> None:
    with AgentBillClient(redis_url=redis_server.url, namespace=namespace, ceiling=100) as c:
        check = c.preflight(AGENT, 60, CUSTOMER)
        check.extend(40)
        before = state(c, raw, check)
        with pytest.raises(CeilingExceededError) as refused:
            check.extend(1)
        assert (refused.value.scope, refused.value.limit) == ("request", 100)
        assert state(c, raw, check) == before


def test_concurrency_limits_do_not_refuse_an_extension(both_clients: AgentBillClient) -> None:
    c = both_clients
    c.set_concurrency_limit(CUSTOMER, 1)
    check = c.preflight(AGENT, 5, CUSTOMER)
    assert not c.preflight(AGENT, 5, CUSTOMER).approved  # one run in flight: the limit
    assert check.extend(20).estimated_units == 25  # no run is added
    assert c.get_budget(CUSTOMER).open_reservations == 1


@pytest.mark.parametrize("closed_by", ["record", "release", "expiry", "never made"])
def test_a_reservation_that_is_not_open_cannot_be_extended(
    both_clients: AgentBillClient, raw: redis.Redis, closed_by: str
) -> None:
    c = both_clients
    check = c.preflight(AGENT, 10, CUSTOMER, ttl=1)
    if closed_by == "record":
        check.record(3)
    elif closed_by == "release":
        check.release()
    elif closed_by == "expiry":
        time.sleep(1.1)  # due, and not reaped yet
    else:
        check.release()
        check = _with_id(check, f"rsv.{c._script_settings.keys.customer(CUSTOMER).tag}.{'0' * 24}")
    before = dump(raw, c.namespace)
    with pytest.raises(InvalidRequestError) as info:
        check.extend(5)
    assert info.value.field == "reservation_id"
    assert dump(raw, c.namespace) == before


def _with_id(check: Any, rid: str) -> Any:
    """The same Check naming another reservation id (behind the async client's facade too)."""
    target = getattr(check, "_target", None)
    if target is None:
        return dataclasses.replace(check, reservation_id=rid)
    return Blocking(dataclasses.replace(target, reservation_id=rid), check._runner)


@pytest.mark.parametrize("units", [0, -1, 1.5, True, "5", None, MAX_UNITS + 1])
def test_bad_units_are_refused_naming_the_field_and_nothing_is_written(
    both_clients: AgentBillClient, raw: redis.Redis, units: object
) -> None:
    check = both_clients.preflight(AGENT, 10, CUSTOMER)
    before = dump(raw, both_clients.namespace)
    with pytest.raises(InvalidRequestError) as info:
        check.extend(units)  # type: ignore[arg-type]
    assert info.value.field == "units"
    assert dump(raw, both_clients.namespace) == before


def test_a_refused_check_or_an_offline_one_cannot_be_extended(client: AgentBillClient) -> None:
    client.set_budget(CUSTOMER, 5)
    refused = client.preflight(AGENT, 10, CUSTOMER)
    with pytest.raises(InvalidRequestError) as info:
        refused.extend(1)
    assert info.value.field == "reservation_id"
    offline = dataclasses.replace(client.preflight(AGENT, 1, CUSTOMER), offline=True)
    with pytest.raises(InvalidRequestError) as info:
        offline.extend(1)
    assert info.value.field == "reservation_id"


def test_errors_leave_redis_exactly_as_it_was(due: AgentBillClient, raw: redis.Redis) -> None:
    """With due reservations and outcomes present (a script that reaped first would write)."""
    check = due.preflight(AGENT, 5, CUSTOMER)
    other_agent = dataclasses.replace(check, agent_id="other")
    _refused_without_a_write(raw, due, "agent_id", lambda: other_agent.extend(1))
    _refused_without_a_write(raw, due, "units", lambda: check.extend(MAX_UNITS - 1))
    check.release()
    _refused_without_a_write(raw, due, "reservation_id", lambda: check.extend(1))


def test_a_retried_extension_reserves_once(client: AgentBillClient) -> None:
    """The client's retry after a lost reply resends the same request id: the first answer
    comes back and nothing more is reserved."""
    client.set_budget(CUSTOMER, 100)
    check = client.preflight(AGENT, 10, CUSTOMER)
    plan = _core.plan_extend(client._script_settings, check, 30, Check)
    first = client._run(plan)
    again = client._run(plan)
    assert first == again
    assert first.estimated_units == 40
    assert client.get_budget(CUSTOMER).reserved == 40
    refusal = _core.plan_extend(client._script_settings, check, 90, Check)
    assert client._run(refusal) == client._run(refusal)  # a refusal is answered the same
    assert [e.type for e in client.events(CUSTOMER)].count("refused") == 1


def test_run_extend_covers_the_whole_block(both_clients: AgentBillClient) -> None:
    c = both_clients
    c.set_budget(CUSTOMER, 100)
    if isinstance(c, AgentBillClient):  # the async client's blocks: the test below
        with c.run(AGENT, 10, CUSTOMER, charge_estimate=True) as run:
            assert run.extend(30).estimated_units == 40
            with pytest.raises(BudgetExhaustedError):
                run.extend(61)
        assert c.get_budget(CUSTOMER).spent == 40  # the estimate charged is the whole
        with c.run(AGENT, 10, CUSTOMER) as run:
            run.extend(20)
            run.record(25)
        assert (c.get_budget(CUSTOMER).spent, c.get_budget(CUSTOMER).reserved) == (65, 0)


def test_async_run_extend_covers_the_whole_block(redis_server: RedisServer, namespace: str) -> None:
    async def main() -> tuple[int, int]:
        async with AsyncAgentBillClient(redis_url=redis_server.url, namespace=namespace) as c:
            await c.set_budget(CUSTOMER, 100)
            async with c.run(AGENT, 10, CUSTOMER, charge_estimate=True) as run:
                assert (await run.extend(30)).estimated_units == 40
                with pytest.raises(BudgetExhaustedError):
                    await run.extend(61)
            budget = await c.get_budget(CUSTOMER)
            return budget.spent, budget.reserved

    assert asyncio.run(main()) == (40, 0)


# -- racing processes ------------------------------------------------------------------------------


def extender(url: str, namespace: str, barrier: Barrier) -> tuple[int, int]:
    """Preflight 10 and extend by 10 until refused, then record the whole; repeat until even
    a preflight is refused. (units recorded, extensions approved)."""
    recorded = extended = 0
    with AgentBillClient(redis_url=url, namespace=namespace) as c:
        barrier.wait(BARRIER_TIMEOUT)
        while True:
            check = c.preflight(AGENT, 10, CUSTOMER)
            if not check.approved:
                return recorded, extended
            total = check
            while True:
                try:
                    total = total.extend(10)
                except BudgetExhaustedError:
                    break
                extended += 1
            check.record(total.estimated_units)
            recorded += total.estimated_units


@pytest.mark.slow
def test_racing_extensions_never_take_a_budget_over(
    redis_server: RedisServer, namespace: str
) -> None:
    with AgentBillClient(redis_url=redis_server.url, namespace=namespace) as c:
        c.set_budget(CUSTOMER, 5_000)
        barrier = CTX.Barrier(4)
        results = run_processes(extender, [(redis_server.url, namespace, barrier)] * 4)
        budget = c.get_budget(CUSTOMER)
    assert budget.spent == sum(r for r, _ in results)
    assert budget.spent <= 5_000
    assert budget.spent > 5_000 - 4 * 10  # each worker stopped only when even 10 did not fit
    assert (budget.reserved, budget.open_reservations) == (0, 0)
    assert sum(e for _, e in results) > 0


def settler(url: str, namespace: str, rids: list[str], kind: str) -> int:
    """Record 7 on each reservation (kind 'record'), or extend each by 5 ('extend'); returns
    how many extensions were approved."""
    approved = 0
    with AgentBillClient(redis_url=url, namespace=namespace) as c:
        for rid in rids:
            check = Check(
                approved=True,
                reason=None,
                reservation_id=rid,
                expires_at=None,
                remaining=None,
                limit=None,
                agent_id=AGENT,
                customer_id=CUSTOMER,
                estimated_units=10,
                _client=c,
            )
            if kind == "record":
                check.record(7)
                continue
            try:
                check.extend(5)
            except InvalidRequestError as exc:
                if exc.field != "reservation_id":  # else closed first: nothing extended
                    raise
            else:
                approved += 1
    return approved


@pytest.mark.slow
def test_an_extension_racing_a_settle_from_another_process_is_settled_or_refused(
    redis_server: RedisServer, namespace: str
) -> None:
    """One process records each of 300 reservations while another extends each: whichever
    lands first, the record charges 7, and nothing stays held."""
    with AgentBillClient(redis_url=redis_server.url, namespace=namespace) as c:
        rids = [c.preflight(AGENT, 10, CUSTOMER).reservation_id for _ in range(300)]
        args = [
            (redis_server.url, namespace, rids, "record"),
            (redis_server.url, namespace, rids, "extend"),
        ]
        _, approved = run_processes(settler, args)
        budget = c.get_budget(CUSTOMER)
        extensions = [e for e in c.events(CUSTOMER, limit=10_000) if e.reason == "extended"]
    assert (budget.spent, budget.reserved, budget.open_reservations) == (300 * 7, 0, 0)
    assert len(extensions) == approved
