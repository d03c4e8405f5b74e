"""Racing processes making wrapped LLM calls against one dollar budget never exceed it.

Four processes, each with its own AgentBillClient and its own SDK client (OpenAI
chat completions in two of them, Anthropic streams in the other two, against the in-process
mock), start together and call until refused. Every call reserves its bound and is charged
its priced usage, so the budget holds and the ledger adds up to the micro-dollar.
"""

from __future__ import annotations

from multiprocessing.synchronize import Barrier

import pytest

from agentbill import AgentBillClient, RunBlockedError
from tests._llm_mock import MockLLM
from tests._processes import CTX
from tests._servers import RedisServer
from tests.test_concurrency import BARRIER_TIMEOUT, run_processes

DOLLAR = 1_000_000
CALLS = 60
CHARGE = {"openai": 5_000, "anthropic": 6_495}  # the mock's usage, priced (see test_llm)


def caller(url: str, namespace: str, provider: str, barrier: Barrier) -> tuple[int, int, int]:
    """Make CALLS wrapped calls; (approved and charged, refused, requests the mock received)."""
    mock = MockLLM()
    charged = refused = 0
    with AgentBillClient(redis_url=url, namespace=namespace) as client:
        if provider == "openai":
            openai_llm = client.wrap(
                mock.openai(), agent_id=provider, customer_id="acme", unit="usd"
            )
        else:
            anthropic_llm = client.wrap(
                mock.anthropic(), agent_id=provider, customer_id="acme", unit="usd"
            )
        barrier.wait(BARRIER_TIMEOUT)
        for _ in range(CALLS):
            try:
                if provider == "openai":
                    openai_llm.chat.completions.create(
                        model="gpt-4o",
                        messages=[{"role": "user", "content": "One line on budgets, please."}],
                        max_tokens=1_000,
                    )
                else:
                    with anthropic_llm.messages.stream(
                        model="claude-sonnet-4-5",
                        messages=[{"role": "user", "content": "One line on budgets, please."}],
                        max_tokens=1_000,
                    ) as stream:
                        stream.until_done()
            except RunBlockedError:
                refused += 1
            else:
                charged += 1
    return charged, refused, len(mock.requests)


@pytest.mark.slow
def test_racing_processes_never_exceed_one_dollar(
    redis_server: RedisServer, namespace: str
) -> None:
    with AgentBillClient(redis_url=redis_server.url, namespace=namespace) as client:
        client.set_budget("acme", DOLLAR)
        providers = ["openai", "anthropic", "openai", "anthropic"]
        barrier = CTX.Barrier(len(providers))
        results = run_processes(
            caller, [(redis_server.url, namespace, p, barrier) for p in providers]
        )
        budget = client.get_budget("acme")
        events = client.events("acme", limit=10_000)

    spent = sum(CHARGE[p] * charged for p, (charged, _, _) in zip(providers, results, strict=True))
    assert budget.spent == spent
    assert budget.spent <= DOLLAR
    assert budget.reserved == 0
    assert sum(refused for _, refused, _ in results) > 0  # the budget did run out
    for charged, _, requests in results:
        assert requests == charged  # a refused call sent nothing
    assert sum(e.units for e in events if e.type == "recorded") == budget.spent
