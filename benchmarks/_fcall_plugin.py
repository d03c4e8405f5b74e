"""A pytest plugin that sends the clients' single script calls as FCALL of the hoisted library
(benchmarks/_functions.py): the suite's tests then check that library's behaviour.

``.venv/bin/python -m pytest -q -p benchmarks._fcall_plugin tests/test_preflight.py``

For checking the library, not a product path: pipelined calls (batches, replicated durability)
still send EVALSHA of the same scripts, and a test that installs the movable clock
(tests/_clock.py) keeps its EVALSHA scripts, since the library holds the production clock.
Expected failures: tests that count EVALSHA or intercept it (test_lease's ``evalsha_calls``,
test_outage's ReplyLosingProxy).
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import pytest
import redis

import agentbill._client as client_module
from agentbill import _scripts
from benchmarks._functions import library

TEXT, NAMES = library("hoisted")
_production_bind = _scripts.bind  # what agentbill._client imported
_production_source = _scripts.source
calls = {"sync": 0, "async": 0}


def _missing(exc: redis.ResponseError) -> bool:
    return "Function not found" in str(exc)


class FunctionScript:
    """Stands where a redis-py Script stood: ``sha`` and ``script`` for pipelines, and a call
    that sends FCALL, loading the library once if the server answers "Function not found"."""

    def __init__(self, client: Any, op: str, script: Any) -> None:
        self.client, self.name = client, NAMES[op]
        self.sha, self.script = script.sha, script.script

    def __call__(self, keys: tuple[str, ...], args: tuple[str | int, ...]) -> Any:
        return self._acall(self.client.fcall(self.name, len(keys), *keys, *args), keys, args)

    async def _acall(
        self, sent: Awaitable[Any], keys: tuple[str, ...], args: tuple[str | int, ...]
    ) -> Any:
        calls["async"] += 1
        try:
            return await sent
        except redis.ResponseError as exc:
            if not _missing(exc):
                raise
        await self.client.function_load(TEXT, replace=True)
        return await self.client.fcall(self.name, len(keys), *keys, *args)


class SyncFunctionScript(FunctionScript):
    def __call__(self, keys: tuple[str, ...], args: tuple[str | int, ...]) -> Any:
        calls["sync"] += 1
        try:
            return self.client.fcall(self.name, len(keys), *keys, *args)
        except redis.ResponseError as exc:
            if not _missing(exc):
                raise
        self.client.function_load(TEXT, replace=True)
        return self.client.fcall(self.name, len(keys), *keys, *args)


def bind(client: Any) -> dict[str, Any]:
    scripts = _production_bind(client)
    if _scripts.source is not _production_source:  # a test's movable clock
        return scripts
    aio = isinstance(client, (redis.asyncio.Redis, redis.asyncio.RedisCluster))
    kind = FunctionScript if aio else SyncFunctionScript
    return {op: kind(client, op, s) for op, s in scripts.items()}


client_module.bind = bind  # type: ignore[attr-defined]  # the name BaseClient.__init__ calls


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    terminalreporter.write_line(f"script calls sent as FCALL: {calls}")
