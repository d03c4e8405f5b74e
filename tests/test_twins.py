"""The sync and async clients are twins: the same public methods with the same parameters."""

from __future__ import annotations

import inspect

from agentbill import AgentBillClient, AsyncAgentBillClient, AsyncCheck, Check


def _public(cls: type) -> dict[str, object]:
    return {
        name: member
        for name, member in inspect.getmembers(cls)
        if not name.startswith("_") and (callable(member) or isinstance(member, property))
    }


def _parameters(fn: object) -> list[tuple[str, object, object]]:
    sig = inspect.signature(fn)  # type: ignore[arg-type]
    # Same names, kinds and defaults; `redis=` differs in type only (sync vs asyncio client).
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def test_clients_expose_the_same_methods_with_the_same_parameters() -> None:
    sync, aio = _public(AgentBillClient), _public(AsyncAgentBillClient)
    assert set(sync) == set(aio)
    for name, member in sync.items():
        if isinstance(member, property):
            continue
        assert _parameters(member) == _parameters(aio[name]), name
        # A decorator, context managers and the LLM wrapper: made, not awaited.
        if name not in {"gate", "run", "lease", "wrap"}:
            assert inspect.iscoroutinefunction(aio[name]), name
    assert _parameters(AgentBillClient.__init__) == _parameters(AsyncAgentBillClient.__init__)


def test_check_twins_match() -> None:
    assert set(_public(Check)) == set(_public(AsyncCheck))
    for name in ("record", "release"):
        assert _parameters(getattr(Check, name)) == _parameters(getattr(AsyncCheck, name))
        assert inspect.iscoroutinefunction(getattr(AsyncCheck, name))
