"""Drive an AsyncAgentBillClient through a blocking facade, so one test body runs on both clients.

Every coroutine the async client returns is run to completion on one event loop owned by the
facade; AsyncCheck results are wrapped the same way. Nothing is faked: each call is the async
client's real round trip to the suite's redis-server.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

from agentbill import AsyncAgentBillClient, AsyncCheck


class Blocking:
    def __init__(self, target: Any, runner: asyncio.Runner) -> None:
        self._target = target
        self._runner = runner

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._wrap(self._runner.run(attr(*args, **kwargs)))

        return call

    def _wrap(self, value: Any) -> Any:
        if isinstance(value, list):  # preflight_many
            return [self._wrap(item) for item in value]
        return Blocking(value, self._runner) if isinstance(value, AsyncCheck) else value

    def __bool__(self) -> bool:
        return bool(self._target)

    def __eq__(self, other: object) -> bool:
        return bool(self._target == (other._target if isinstance(other, Blocking) else other))

    def __hash__(self) -> int:
        return hash(self._target)


def blocking_client(client: AsyncAgentBillClient, runner: asyncio.Runner) -> Any:
    return Blocking(client, runner)
