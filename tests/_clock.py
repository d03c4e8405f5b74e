"""Moving a customer's clock in tests, without a hook in the production scripts.

The production prelude reads Redis ``TIME`` and nothing else. Tests that cross period
boundaries load a variant of the scripts (different source, so a different SHA) whose clock adds
the customer's ``_clock_offset`` field (ms): :func:`movable_clock` installs it for the clients a
test builds, and :func:`shift_clock` moves it.
"""

from __future__ import annotations

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


def movable_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients built from now on in this test run the scripts with the movable clock."""
    monkeypatch.setattr(_scripts, "source", _movable_source)


def shift_clock(raw: redis.Redis, namespace: str, customer: str, ms: int) -> None:
    """Move ``customer``'s script clock ``ms`` further (movable-clock scripts only)."""
    raw.hincrby(KeySpace(namespace).customer(customer).budget, CLOCK_OFFSET, ms)
