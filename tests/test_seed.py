"""The product sheet's Python snippets run as written.

Only ``run_agent`` / ``do_the_work`` are defined, and ``AGENTBILL_REDIS_URL`` points at the suite's
server. The third snippet's ``return`` statements need a function around them, so it is wrapped
in one; its body is untouched.
"""

from __future__ import annotations

import textwrap

import pytest

from agentbill import AgentBillClient
from tests._servers import RedisServer

SNIPPET_PREFLIGHT = """
from agentbill import AgentBillClient
# Block any run estimated at more than 50 units
client = AgentBillClient(api_key="agb_your_key", ceiling=50)
check = client.preflight(
agent_id="my_agent",
estimated_units=10, # how many units this run is expected to use
customer_id="user_123" # optional: per-customer enforcement
)
if not check.approved:
    raise Exception(f"Run blocked: {check.reason}")
# Your agent runs here — budget is confirmed
result = run_agent()
# Record actual units used
client.record(agent_id="my_agent", units=10, customer_id="user_123")
"""

SNIPPET_GATE = """
@client.gate(agent_id="my_agent", estimated_units=10, customer_id="user_123")
def run_agent(task: str) -> str:
    # preflight runs before this body
    # record runs after this body completes
    return do_the_work(task)
"""

SNIPPET_ERRORS = """
from agentbill import AgentBillClient, BudgetExhaustedError, CeilingExceededError
try:
    result = run_agent("analyze this")
except CeilingExceededError:
    return {"error": "run exceeds per-request ceiling"}
except BudgetExhaustedError:
    return {"error": "customer budget exhausted"}
"""


@pytest.fixture
def seed_env(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> AgentBillClient:
    monkeypatch.setenv("AGENTBILL_REDIS_URL", redis_server.url)
    admin = AgentBillClient()
    # The seed uses the default namespace and customer "user_123": start from a clean slate.
    with redis_server.client() as r:
        for key in r.scan_iter(match="agentbill:*"):
            r.delete(key)
    return admin


def test_preflight_and_record_snippet(seed_env: AgentBillClient) -> None:
    runs: list[str] = []
    scope: dict[str, object] = {"run_agent": lambda: runs.append("ran")}
    exec(SNIPPET_PREFLIGHT, scope)
    assert runs == ["ran"]
    budget = seed_env.get_budget("user_123")
    assert (budget.spent, budget.reserved, budget.open_reservations) == (10, 0, 0)


def test_preflight_snippet_blocks_when_budget_is_exhausted(seed_env: AgentBillClient) -> None:
    seed_env.set_budget("user_123", 5)
    runs: list[str] = []
    with pytest.raises(Exception, match="Run blocked: budget_exhausted"):
        exec(SNIPPET_PREFLIGHT, {"run_agent": lambda: runs.append("ran")})
    assert runs == []


def _handler(scope: dict[str, object]) -> object:
    body = "def handle():\n" + textwrap.indent(SNIPPET_ERRORS, "    ")
    exec(body, scope)
    return scope["handle"]()  # type: ignore[operator]


def test_gate_and_error_snippets(seed_env: AgentBillClient) -> None:
    work: list[str] = []

    def do_the_work(task: str) -> str:
        work.append(task)
        return f"done: {task}"

    scope: dict[str, object] = {"client": AgentBillClient(ceiling=50), "do_the_work": do_the_work}
    exec(SNIPPET_GATE, scope)
    assert _handler(scope) is None  # approved: no error dict returned
    assert work == ["analyze this"]
    assert seed_env.get_budget("user_123").spent == 10

    seed_env.set_budget("user_123", 15)
    assert _handler(scope) == {"error": "customer budget exhausted"}
    assert work == ["analyze this"]  # the body did not run

    scope["client"] = AgentBillClient(ceiling=5)
    exec(SNIPPET_GATE, scope)
    assert _handler(scope) == {"error": "run exceeds per-request ceiling"}
    assert work == ["analyze this"]
