""" "learned" estimates under statistics an adversary (or a quiet agent) can shape.

Runs that report 0 units make the p95 0. Before: "learned" then reserved 0, and a
reservation of 0 fits any budget, even one spent to the last unit, so every such run was
admitted there and charged what it used on top: a budget spent in full kept approving. Now a
learned reservation is at least 1 unit: a run is admitted only where one unit still fits.
"""

from __future__ import annotations

import pytest

from agentbill import AgentBillClient, RunBlockedError, _learned
from agentbill._results import LEARN_AFTER
from tests.test_learned import AGENT, CUSTOMER, run


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
