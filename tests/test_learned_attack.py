""" "learned" estimates under statistics an adversary (or a quiet agent) can shape.

Runs that report 0 units make the p95 0. Before: "learned" then reserved 0, and a
reservation of 0 fits any budget, even one spent to the last unit, so every such run was
admitted there and charged what it used on top: a budget spent in full kept approving. Now a
learned reservation is at least 1 unit: a run is admitted only where one unit still fits.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import redis

from agentbill import AgentBillClient, RunBlockedError, _learned
from agentbill._results import LEARN_AFTER
from tests._llm_mock import MockLLM
from tests._processes import CTX
from tests._servers import RedisServer
from tests.test_concurrency import BARRIER_TIMEOUT, run_processes
from tests.test_learned import AGENT, CUSTOMER, DOLLAR, approved, approved_call, run


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_learned, "REFRESH", 0.0)


def test_runs_reporting_zero_never_make_a_spent_budget_admit_runs(
    client: AgentBillClient, fresh: None
) -> None:
    c = client
    c.set_budget(CUSTOMER, 1_000)
    for _ in range(LEARN_AFTER + 5):
        run(c, 100, 0)
    assert c.estimates(AGENT, CUSTOMER).p95 == 0
    c.record(AGENT, 1_000, CUSTOMER)  # the budget is spent to the last unit
    ran: list[int] = []

    @c.gate(AGENT, "learned", CUSTOMER, bound=100, units=60)
    def body() -> None:
        ran.append(1)

    with pytest.raises(RunBlockedError):
        body()
    with pytest.raises(RunBlockedError), c.run(AGENT, "learned", CUSTOMER, bound=100) as block:
        block.record(60)
    assert ran == []
    budget = c.get_budget(CUSTOMER)
    assert (budget.spent, budget.reserved) == (1_000, 0)


def test_a_learned_reservation_is_at_least_one_unit(client: AgentBillClient, fresh: None) -> None:
    c = client
    for _ in range(LEARN_AFTER):
        run(c, 100, 0)
    assert c.estimates(AGENT, CUSTOMER).learned(100) == 1
    with c.run(AGENT, "learned", CUSTOMER, bound=100) as block:
        assert block.check.estimated_units == 1
        block.record(0)


def varying_caller(url: str, namespace: str, barrier: Any, seed: int) -> tuple[int, list[int]]:
    """Learned wrapped calls whose output varies (50 to 800 tokens, and 4,000 one call in 25) until
    refused 5 times: (calls refused, units each approved call was charged)."""
    _learned.REFRESH = 0.0  # read before every call (see test_learned's learned_caller)
    rng = random.Random(seed)
    mock = MockLLM()

    def vary() -> None:
        mock.completion_tokens = 4_000 if rng.random() < 0.04 else rng.randint(50, 800)

    mock.on_request = vary
    refused = 0
    with AgentBillClient(redis_url=url, namespace=namespace) as c:
        llm = c.wrap(
            mock.openai(), agent_id=AGENT, customer_id=CUSTOMER, unit="usd", estimate="learned"
        )
        barrier.wait(BARRIER_TIMEOUT)
        while refused < 5:
            if not approved_call(llm):
                refused += 1
    return refused, [len(mock.requests)]


@pytest.mark.slow
def test_eight_racing_processes_with_varying_usage_stay_within_the_documented_overrun(
    redis_server: RedisServer, namespace: str
) -> None:
    """README: a learned budget can go over by at most the sum, over the calls in flight, of
    (bound - reservation); 8 processes have at most 8 calls in flight, each under its bound.
    Every call is charged exactly what it used, and nothing stays held."""
    processes = 8
    with AgentBillClient(redis_url=redis_server.url, namespace=namespace) as c:
        c.set_budget(CUSTOMER, DOLLAR)
        barrier = CTX.Barrier(processes)
        args = [(redis_server.url, namespace, barrier, seed) for seed in range(processes)]
        results = run_processes(varying_caller, args)
        budget = c.get_budget(CUSTOMER)
        asked = approved(c)
        bound = max(asked)  # the first calls reserve their bound
        recorded = [e.units for e in c.events(CUSTOMER) if e.type == "recorded"]
    assert budget.reserved == 0
    assert budget.spent == sum(recorded)
    assert len(recorded) == sum(sent for _, (sent,) in results)  # every call sent was charged
    assert budget.spent <= DOLLAR + processes * (bound - 1)
    assert min(asked) < bound / 2  # the later calls reserved what was learned


def test_a_statistics_key_stays_small_whatever_the_records_report(
    client: AgentBillClient, raw: redis.Redis
) -> None:
    """400 records spread over 0 to 2^39 units (every bin an actual can fall in, and one
    enormous outlier): the key keeps two generations of at most 3 + 217 fields each, and the
    percentiles of a steady window are not moved by one outlier."""
    c = client
    for i in range(400):
        units = 0 if i % 41 == 40 else 2 ** (i % 40) + i
        run(c, 2**40, units)
    key = c._script_settings.keys.customer(CUSTOMER).stats(AGENT)
    assert raw.hlen(key) <= 1 + 2 * (3 + 217)
    memory = raw.memory_usage(key)
    assert memory is not None
    assert memory < 16_384
    for _ in range(LEARN_AFTER * 10):  # a steady window of 40s, then one enormous record
        run(c, 100, 40)
    run(c, 2**50, 2**50)
    stats = c.estimates(AGENT, CUSTOMER)
    assert stats.p95 == stats.p50 == 47  # the top of 40's bin
    assert stats.learned(100) == 47
