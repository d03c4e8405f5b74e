"""Estimates that learn: statistics kept by the settle script, and "learned" reservations.

Against the suite's real redis-server: every record that closes a reservation adds its sample
to the agent's statistics (and a wrapped LLM call's to the agent's for that model), read back
by ``client.estimates``; percentiles converge on what the runs used, within a bin (25%), and
follow a change within the documented window; ``"learned"`` reserves the bound until 20
samples, then their p95, never above the bound, for gates, run blocks and wrapped calls;
racing processes making learned wrapped calls against one dollar never take it over.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Iterator
from multiprocessing.synchronize import Barrier
from typing import Any

import pytest
import redis
from hypothesis import given

from agentbill import (
    AgentBillClient,
    AsyncAgentBillClient,
    Estimates,
    InvalidRequestError,
    RunBlockedError,
    _learned,
)
from agentbill._core import stats_bin_top
from agentbill._results import LEARN_AFTER
from tests._llm_mock import MockLLM
from tests._processes import CTX
from tests._servers import RedisServer
from tests.test_concurrency import BARRIER_TIMEOUT, run_processes
from tests.test_properties import FUZZ, bad_units

AGENT, CUSTOMER = "agent", "u"


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """Learners read the statistics on every run (not at most once a second)."""
    monkeypatch.setattr(_learned, "REFRESH", 0.0)


def run(c: AgentBillClient, estimate: int, actual: int) -> None:
    c.preflight(AGENT, estimate, CUSTOMER).record(actual)


def test_bins_hold_a_quarter_of_a_power_of_two() -> None:
    """The tops stats_bin_top gives for Lua's bin_of: every integer lands in the bin whose top
    is the smallest at or above it, at most 25% above."""
    tops = [stats_bin_top(i) for i in range(-1, 4 * 53)]
    assert tops[:12] == [0, 1, 1, 1, 1, 2, 2, 3, 3, 4, 5, 6]
    assert tops == sorted(tops)
    for x in [1, 2, 3, 7, 8, 9, 100, 5_000, 123_456_789, 2**52 + 1]:
        top = min(t for t in tops if t >= x)
        assert top <= max(x * 1.25, x + 1)


def test_percentiles_converge_on_what_the_runs_used(both_clients: AgentBillClient) -> None:
    c = both_clients
    rng = random.Random(7)
    used = [rng.randint(1, 1_000) for _ in range(150)]
    for actual in used:
        run(c, 2_000, actual)
    stats = c.estimates(AGENT, CUSTOMER)
    assert isinstance(stats, Estimates)
    assert (stats.agent_id, stats.customer_id, stats.model) == (AGENT, CUSTOMER, None)
    assert stats.samples == 150
    assert stats.mean_actual == pytest.approx(sum(used) / 150)
    assert stats.mean_estimate == 2_000
    assert stats.actual_to_estimate == pytest.approx(sum(used) / (150 * 2_000))
    ordered = sorted(used)
    for q, got in ((50, stats.p50), (95, stats.p95), (99, stats.p99)):
        true = ordered[math.ceil(150 * q / 100) - 1]
        assert got is not None
        assert true <= got <= true * 1.25, (q, true, got)
    assert sum(n for _, n in stats.histogram) == 150
    empty = c.estimates("nobody", CUSTOMER)
    assert (empty.samples, empty.p95, empty.mean_actual, empty.histogram) == (0, None, None, ())


def test_only_records_that_close_a_reservation_are_samples(client: AgentBillClient) -> None:
    client.preflight(AGENT, 50, CUSTOMER).release()
    assert client.record(AGENT, 30, CUSTOMER).status == "direct"  # no reservation, no estimate
    client.preflight(AGENT, 50, CUSTOMER).record(0)
    client.preflight(AGENT, 50, CUSTOMER)
    assert client.record(AGENT, 20, CUSTOMER).status == "recorded"  # closed it, without an id
    client.preflight(AGENT, 50, CUSTOMER).record(40, success=False)  # a release
    late = client.preflight(AGENT, 50, CUSTOMER)
    late.release()
    assert late.record(45).status == "late"  # its estimate was given back before
    stats = client.estimates(AGENT, CUSTOMER)
    assert stats.samples == 2
    assert stats.histogram == ((0, 1), (stats_bin_top_of(20), 1))
    assert (stats.mean_actual, stats.mean_estimate) == (10, 50)


def test_a_lease_slice_is_not_a_sample(client: AgentBillClient) -> None:
    """A slice's record is the sum of many runs' units: not one run's actual."""
    with client.lease(AGENT, CUSTOMER, slice_units=100) as lease:
        for _ in range(5):
            lease.preflight(10).record(7)
    assert client.get_budget(CUSTOMER).spent == 35
    assert client.estimates(AGENT, CUSTOMER).samples == 0


def test_the_window_follows_a_change(client: AgentBillClient) -> None:
    """Two generations of 100: a rise shows once more than 5% of the window is above the old
    p95; what was, is gone after at most 200 records."""
    for _ in range(100):
        run(client, 5_000, 10)
    for _ in range(6):
        run(client, 5_000, 1_000)
    assert client.estimates(AGENT, CUSTOMER).p95 == stats_bin_top_of(1_000)
    for _ in range(200):
        run(client, 5_000, 10)
    stats = client.estimates(AGENT, CUSTOMER)
    assert stats.p99 == stats_bin_top_of(10)
    assert 100 <= stats.samples <= 200


def stats_bin_top_of(units: int) -> int:
    return min(t for t in (stats_bin_top(i) for i in range(-1, 4 * 53)) if t >= units)


def test_statistics_are_kept_per_customer_cluster_safe_and_expire(
    client: AgentBillClient, raw: redis.Redis
) -> None:
    run(client, 10, 5)
    keys = client._script_settings.keys.customer(CUSTOMER)
    stats_key = keys.stats(AGENT)
    assert stats_key.startswith(keys.prefix + ":")  # the customer's hash tag
    assert 0 < raw.pttl(stats_key) <= 90 * 86_400_000  # the idle retention
    assert client.estimates(AGENT, "someone else").samples == 0


def test_estimates_checks_its_arguments(client: AgentBillClient) -> None:
    for kwargs, field in (
        ({"agent_id": ""}, "agent_id"),
        ({"agent_id": None}, "agent_id"),
        ({"agent_id": AGENT, "customer_id": "\n"}, "customer_id"),
        ({"agent_id": AGENT, "model": ""}, "model"),
        ({"agent_id": AGENT, "model": 5}, "model"),
    ):
        with pytest.raises(InvalidRequestError) as info:
            client.estimates(**kwargs)
        assert info.value.field == field


# -- "learned" for gates and run blocks --------------------------------------------------------


def approved(c: AgentBillClient) -> list[int]:
    return [e.units for e in c.events(CUSTOMER, limit=10_000) if e.type == "approved"]


def test_a_learned_gate_reserves_the_bound_then_the_p95(
    both_clients: AgentBillClient, fresh: None
) -> None:
    c = both_clients
    if isinstance(c, AgentBillClient):

        @c.gate(AGENT, "learned", CUSTOMER, bound=500, units=40)
        def body() -> None:
            pass

        for _ in range(LEARN_AFTER + 5):
            body()
    else:
        aclient = c._target

        @aclient.gate(AGENT, "learned", CUSTOMER, bound=500, units=40)
        async def abody() -> None:
            pass

        async def calls() -> None:
            for _ in range(LEARN_AFTER + 5):
                await abody()

        c._runner.run(calls())
    asked = approved(c)
    assert asked[:LEARN_AFTER] == [500] * LEARN_AFTER  # the bound, until 20 samples
    assert asked[LEARN_AFTER:] == [stats_bin_top_of(40)] * 5  # 47: 40's bin
    assert c.get_budget(CUSTOMER).spent == 40 * (LEARN_AFTER + 5)


def test_a_learned_run_block_never_reserves_above_its_bound(
    client: AgentBillClient, fresh: None
) -> None:
    for _ in range(LEARN_AFTER):
        run(client, 1_000, 900)  # the agent's runs used 900 ...
    with client.run(AGENT, "learned", CUSTOMER, bound=300) as block:  # ... this one, <= 300
        assert block.check.estimated_units == 300
        block.record(250)
    with client.run(AGENT, "learned", CUSTOMER, bound=5_000) as block:
        assert block.check.estimated_units == stats_bin_top_of(900)
        block.record(900)


def test_learned_needs_a_bound_and_a_bound_needs_learned(client: AgentBillClient) -> None:
    for make, field in (
        (lambda: client.gate(AGENT, "learned", CUSTOMER), "bound"),
        (lambda: client.run(AGENT, "learned", CUSTOMER), "bound"),
        (lambda: client.run(AGENT, "learned", CUSTOMER, bound=-1), "bound"),
        (lambda: client.gate(AGENT, 10, CUSTOMER, bound=20), "bound"),
        (lambda: client.run(AGENT, "learnt", CUSTOMER, bound=20), "estimated_units"),  # type: ignore[arg-type]
    ):
        with pytest.raises(InvalidRequestError) as info:
            make()
        assert info.value.field == field


@FUZZ
@given(bound=bad_units(optional=False))
def test_a_bad_bound_is_named_when_the_gate_or_block_is_made(
    client: AgentBillClient, bound: object
) -> None:
    for make in (client.gate, client.run):
        with pytest.raises(InvalidRequestError) as info:
            make(AGENT, "learned", CUSTOMER, bound=bound)  # type: ignore[arg-type]
        assert info.value.field == "bound"


def test_a_learned_gate_reserves_its_bound_when_the_statistics_cannot_be_read(
    redis_server: RedisServer, namespace: str, fresh: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agentbill import StoreUnavailableError

    with AgentBillClient(redis_url=redis_server.url, namespace=namespace) as c:
        for _ in range(LEARN_AFTER):
            run(c, 100, 10)

        def unreadable(*args: object, **kwargs: object) -> Estimates:
            raise StoreUnavailableError("down")

        monkeypatch.setattr(c, "estimates", unreadable)
        with c.run(AGENT, "learned", CUSTOMER, bound=100) as block:
            assert block.check.estimated_units == 100


# -- "learned" for wrapped LLM calls -------------------------------------------------------------

CHARGE = 5_000  # what the mock's gpt-4o usage costs, in micro-dollars (see test_llm)


def chat(llm: Any) -> Any:
    return llm.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Budgets?"}], max_tokens=4_000
    )


@pytest.fixture
def wrapped(redis_server: RedisServer, namespace: str) -> Iterator[tuple[AgentBillClient, Any]]:
    with AgentBillClient(redis_url=redis_server.url, namespace=namespace) as c:
        llm = c.wrap(
            MockLLM().openai(), agent_id=AGENT, customer_id=CUSTOMER, unit="usd", estimate="learned"
        )
        yield c, llm


def test_a_wrapped_call_learns_per_model_and_reserves_less_than_its_bound(
    wrapped: tuple[AgentBillClient, Any], fresh: None
) -> None:
    c, llm = wrapped
    for _ in range(LEARN_AFTER + 3):
        chat(llm)
    stats = c.estimates(AGENT, CUSTOMER, model="gpt-4o")
    assert stats.samples == LEARN_AFTER + 3
    assert stats.mean_actual == CHARGE
    assert c.estimates(AGENT, CUSTOMER).samples == LEARN_AFTER + 3  # the agent's, all models
    assert c.estimates(AGENT, CUSTOMER, model="gpt-4o-mini").samples == 0
    asked = approved(c)
    bound = asked[0]
    assert bound > 2 * CHARGE
    assert asked[:LEARN_AFTER] == [bound] * LEARN_AFTER
    assert asked[LEARN_AFTER:] == [stats_bin_top_of(CHARGE)] * 3  # 5,119 of a 40,000+ bound
    budget = c.get_budget(CUSTOMER)
    assert (budget.spent, budget.reserved) == ((LEARN_AFTER + 3) * CHARGE, 0)


def test_an_async_wrapped_call_learns_too(
    redis_server: RedisServer, namespace: str, fresh: None
) -> None:
    async def main() -> list[int]:
        async with AsyncAgentBillClient(redis_url=redis_server.url, namespace=namespace) as c:
            llm = c.wrap(
                MockLLM().async_openai(),
                agent_id=AGENT,
                customer_id=CUSTOMER,
                unit="usd",
                estimate="learned",
            )
            for _ in range(LEARN_AFTER + 1):
                await llm.chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": "?"}], max_tokens=4_000
                )
            return [e.units for e in await c.events(CUSTOMER) if e.type == "approved"]

    asked = asyncio.run(main())
    assert asked[-1] == stats_bin_top_of(CHARGE) < asked[0]


DOLLAR = 1_000_000


def approved_call(llm: Any) -> bool:
    """One wrapped call: True if it was approved (and charged), False if refused."""
    try:
        chat(llm)
    except RunBlockedError:
        return False
    return True


def learned_caller(url: str, namespace: str, barrier: Barrier) -> tuple[int, int, int]:
    """Wrapped learned calls until refused 5 times: (charged calls, refused, requests sent).
    The statistics are read before every call: with the once-a-second refresh, the calls can
    spend the whole dollar within the first second, on the bound read at the start."""
    _learned.REFRESH = 0.0
    mock = MockLLM()
    outcomes: list[bool] = []
    with AgentBillClient(redis_url=url, namespace=namespace) as c:
        llm = c.wrap(
            mock.openai(), agent_id=AGENT, customer_id=CUSTOMER, unit="usd", estimate="learned"
        )
        barrier.wait(BARRIER_TIMEOUT)
        while outcomes.count(False) < 5:
            outcomes.append(approved_call(llm))
    return outcomes.count(True), outcomes.count(False), len(mock.requests)


@pytest.mark.slow
def test_racing_processes_with_learned_estimates_never_exceed_one_dollar(
    redis_server: RedisServer, namespace: str
) -> None:
    with AgentBillClient(redis_url=redis_server.url, namespace=namespace) as c:
        c.set_budget(CUSTOMER, DOLLAR)
        barrier = CTX.Barrier(4)
        results = run_processes(learned_caller, [(redis_server.url, namespace, barrier)] * 4)
        budget = c.get_budget(CUSTOMER)
        asked = approved(c)
    calls = sum(charged for charged, _, _ in results)
    assert budget.spent == calls * CHARGE
    assert budget.spent <= DOLLAR
    assert budget.spent > DOLLAR - stats_bin_top_of(CHARGE)  # learned: the last calls fit
    assert budget.reserved == 0
    for charged, _, requests in results:
        assert requests == charged  # a refused call sent nothing
    assert min(asked) < max(asked) / 5  # learned reservations, well below the bound
