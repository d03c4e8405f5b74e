"""Moving a customer's clock in tests, without a hook in the production scripts.

The production prelude reads Redis ``TIME`` and nothing else. Tests that cross period
boundaries load a variant of the Functions library (built by ``_scripts.build`` from a changed
prelude, so it has another name and lives beside the production one) whose clock adds the
customer's ``_clock_offset`` field (ms): :func:`movable_clock` installs it for the clients a
test builds, and :func:`shift_clock` moves it.
"""

from __future__ import annotations

from functools import cache

import pytest
import redis

from agentbill import _scripts
from agentbill._keys import KeySpace

PRODUCTION_CLOCK = """local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end"""

MOVABLE_CLOCK = """local function now_ms()
  local t = redis.call('TIME')
  local shift = tonumber(redis.call('HGET', K.budget, '_clock_offset') or '0')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + shift
end"""

CLOCK_OFFSET = "_clock_offset"

_production_source = _scripts.source


def _movable_source(operation: str) -> str:
    if operation != _scripts.PRELUDE:
        return _production_source(operation)
    text = _production_source(operation)
    assert PRODUCTION_CLOCK in text, "lua/_common.lua's now_ms() changed: update tests/_clock.py"
    return text.replace(PRODUCTION_CLOCK, MOVABLE_CLOCK)


@cache
def movable_library() -> _scripts.Library:
    """The library with the movable clock (its own name: it lives beside the production one)."""
    return _scripts.build(_movable_source)


def movable_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients built from now on in this test call the library with the movable clock."""
    monkeypatch.setattr(_scripts, "installed", movable_library)


def shift_clock(raw: redis.Redis, namespace: str, customer: str, ms: int) -> None:
    """Move ``customer``'s script clock ``ms`` further (movable-clock scripts only)."""
    raw.hincrby(KeySpace(namespace).customer(customer).budget, CLOCK_OFFSET, ms)
