"""A response's usage is read one way, streamed or not (``_usage.read_usage``).

OpenAI-compatible servers and proxies write token counts as floats (``1200.0``) or strings
(``"1200"``). A whole body reaches the wrapper through the SDK's model; a stream is read from
its raw bytes. Before: the stream dropped such counts (charged 250 for 1,450 tokens, or 0)
while the same response unstreamed was charged 1,450. Now both read them as the counts they
are, and a usage that cannot be read at all (a count that is not one, a negative one, or a
required count missing) is charged the reservation, never less.

Real OpenAI and Anthropic SDK clients over the in-process mock, a real redis-server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from agentbill import AgentBillClient
from agentbill.llm._usage import read_usage
from tests._llm_mock import MockLLM
from tests.test_llm import CUSTOMER, Side, call, reader, side

__all__ = ["reader", "side"]

TOKENS = 1_200 + 250


@dataclass
class OddMock(MockLLM):
    """Writes every top-level token count of its usage through ``odd``."""

    odd: Callable[[int], object] = int

    def _oddly(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {k: self.odd(v) if isinstance(v, int) else v for k, v in usage.items()}

    def chat_usage(self) -> dict[str, Any]:
        return self._oddly(super().chat_usage())

    def responses_usage(self) -> dict[str, Any]:
        return self._oddly(super().responses_usage())

    def anthropic_usage(self) -> dict[str, Any]:
        return self._oddly(super().anthropic_usage())


def charged(reader: AgentBillClient) -> tuple[list[int], int]:
    recorded = [e.units for e in reader.events(CUSTOMER) if e.type == "recorded"]
    return recorded, reader.get_budget(CUSTOMER).reserved


@pytest.mark.parametrize("api", ["chat", "responses", "messages"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("odd", [float, str], ids=["float", "string"])
def test_counts_written_as_floats_or_strings_are_charged_as_counts(
    side: Side, reader: AgentBillClient, api: str, stream: bool, odd: Callable[[int], object]
) -> None:
    reader.set_budget(CUSTOMER, 10**9)
    llm = side.wrap(OddMock(odd=odd), api)
    call(side, llm, api, stream=stream)
    assert charged(reader) == ([TOKENS], 0)


@pytest.mark.parametrize("api", ["chat", "messages"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize(
    "odd",
    [lambda n: -n, lambda n: n + 0.5, lambda n: "lots", lambda n: None],
    ids=["negative", "fraction", "words", "null"],
)
def test_a_usage_that_cannot_be_read_is_charged_the_reservation(
    side: Side, reader: AgentBillClient, api: str, stream: bool, odd: Callable[[int], object]
) -> None:
    """Not 0, and not the counts that could be read: the reservation (the call's bound). The
    SDK may refuse such a whole body itself (an error: released, nothing was charged)."""
    reader.set_budget(CUSTOMER, 10**9)
    held: list[int] = []
    mock = OddMock(odd=odd, on_request=lambda: held.append(reader.get_budget(CUSTOMER).reserved))
    llm = side.wrap(mock, api)
    try:
        call(side, llm, api, stream=stream)
    except Exception:
        assert not stream
        assert charged(reader) == ([], 0)
        return
    (reserved,) = held
    assert reserved > 0
    assert charged(reader) == ([reserved], 0)


def test_read_usage() -> None:
    assert read_usage("chat", {"prompt_tokens": 1.0, "completion_tokens": "2"}) == {
        "prompt_tokens": 1,
        "completion_tokens": 2,
    }
    assert read_usage("chat", {"prompt_tokens": 1}) is None
    assert read_usage("chat", {}) is None
    assert read_usage("responses", {"input_tokens": True, "output_tokens": 1}) is None
    nested = {"input_tokens": 3, "output_tokens": 4, "input_tokens_details": {"cached_tokens": "x"}}
    assert read_usage("responses", nested) is None
    anthropic = {"input_tokens": 3, "output_tokens": 4, "cache_read_input_tokens": None}
    assert read_usage("messages", anthropic) == anthropic
    assert read_usage("messages", {**anthropic, "cache_creation_input_tokens": "1e3"}) is None
