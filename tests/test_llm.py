"""client.wrap(...): real OpenAI and Anthropic SDK clients, an in-process mock API, real Redis.

Every test body runs with AgentBillClient wrapping the sync SDK clients and with
AsyncAgentBillClient wrapping the async ones. The mock (tests/_llm_mock.py) serves the
providers' documented JSON bodies and SSE streams and counts the requests it receives; nothing
goes to the network. Expected charges are genai-prices' price of the usage the mock reported,
in micro-dollars rounded up (and, for two calls, worked out by hand from the list prices).
"""

from __future__ import annotations

import asyncio
import functools
import math
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, assert_type

import anthropic
import genai_prices
import openai
import pytest
from genai_prices.types import ModelPrice
from openai.types.chat import ChatCompletion

from agentbill import (
    AgentBillClient,
    AsyncAgentBillClient,
    BudgetExhaustedError,
    InvalidRequestError,
    TaskCeilingExceededError,
)
from agentbill.llm import LLMRequest, UnknownModelPriceError
from tests._llm_mock import MockLLM
from tests._servers import RedisServer
from tests.conftest import namespace_keys

CUSTOMER = "acme"
AGENT = "writer"
MESSAGES = [{"role": "user", "content": "Summarise the budget rules in one line."}]
PATHS = {"chat": "/v1/chat/completions", "responses": "/v1/responses", "messages": "/v1/messages"}
MODELS = {"chat": "gpt-4o", "responses": "gpt-4o", "messages": "claude-sonnet-4-5"}


@dataclass
class Side:
    """One of the two clients, with the means to run a call on it."""

    name: str
    client: AgentBillClient | AsyncAgentBillClient
    runner: asyncio.Runner | None

    @property
    def is_async(self) -> bool:
        return self.runner is not None

    def sdk(self, mock: MockLLM, api: str) -> Any:
        if api == "messages":
            return mock.async_anthropic() if self.is_async else mock.anthropic()
        return mock.async_openai() if self.is_async else mock.openai()

    def wrap(self, mock: MockLLM, api: str, **options: Any) -> Any:
        options.setdefault("agent_id", AGENT)
        options.setdefault("customer_id", CUSTOMER)
        return self.client.wrap(self.sdk(mock, api), **options)

    def run(self, sync: Callable[[], Any], coro: Callable[[], Any]) -> Any:
        if self.runner is None:
            return sync()
        return self.runner.run(coro())


@pytest.fixture(params=["sync", "async"])
def side(
    request: pytest.FixtureRequest, redis_server: RedisServer, namespace: str
) -> Iterator[Side]:
    if request.param == "sync":
        with AgentBillClient(redis_url=redis_server.url, namespace=namespace) as c:
            yield Side("sync", c, None)
        return
    with asyncio.Runner() as runner:
        ac = AsyncAgentBillClient(redis_url=redis_server.url, namespace=namespace)
        yield Side("async", ac, runner)
        runner.run(ac.close())


@pytest.fixture
def reader(redis_server: RedisServer, namespace: str) -> Iterator[AgentBillClient]:
    """A sync client on the same namespace, to read budgets and the ledger."""
    with AgentBillClient(redis_url=redis_server.url, namespace=namespace) as c:
        yield c


def kwargs_for(api: str, stream: bool, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"model": MODELS[api]}
    if api == "chat":
        out.update(messages=MESSAGES, max_tokens=300)
    elif api == "responses":
        out.update(input="Summarise the budget rules in one line.", max_output_tokens=300)
    else:
        out.update(messages=MESSAGES, max_tokens=300)
    if stream:
        out["stream"] = True
    out.update(extra)
    return out


def method(llm: Any, api: str) -> Any:
    if api == "chat":
        return llm.chat.completions.create
    if api == "responses":
        return llm.responses.create
    return llm.messages.create


def call(side: Side, llm: Any, api: str, stream: bool = False, **extra: Any) -> Any:
    """One call through the wrapped client, streams read to the end; returns the result (or
    the list of stream events)."""
    kwargs = kwargs_for(api, stream, **extra)

    def sync() -> Any:
        result = method(llm, api)(**kwargs)
        return list(result) if stream else result

    async def coro() -> Any:
        result = await method(llm, api)(**kwargs)
        return [e async for e in result] if stream else result

    return side.run(sync, coro)


def helper_stream(side: Side, llm: Any) -> Any:
    """Anthropic's ``messages.stream(...)`` helper, read to its final message."""
    kwargs = kwargs_for("messages", False)

    def sync() -> Any:
        with llm.messages.stream(**kwargs) as stream:
            return stream.get_final_message()

    async def coro() -> Any:
        async with llm.messages.stream(**kwargs) as stream:
            return await stream.get_final_message()

    return side.run(sync, coro)


def genai_price(mock: MockLLM, api: str) -> int:
    """genai-prices' price of the usage the mock reports, in micro-dollars rounded up."""
    body = mock.usage_body(PATHS[api], MODELS[api])
    provider = "anthropic" if api == "messages" else "openai"
    flavor = {"chat": "chat", "responses": "responses", "messages": "default"}[api]
    price = genai_prices.extract_usage(body, provider_id=provider, api_flavor=flavor).calc_price()
    return math.ceil(price.total_price * 1_000_000)


def ledger(reader: AgentBillClient) -> list[tuple[str, int]]:
    return [(e.type, e.units) for e in reader.events(CUSTOMER)]


CASES = [
    ("chat", False),
    ("chat", True),
    ("responses", False),
    ("responses", True),
    ("messages", False),
    ("messages", True),
]


@pytest.mark.parametrize(("api", "stream"), CASES)
def test_a_call_is_charged_genai_prices_price_of_its_usage(
    side: Side, reader: AgentBillClient, api: str, stream: bool
) -> None:
    reader.set_budget(CUSTOMER, 5_000_000)  # $5.00
    mock = MockLLM()
    llm = side.wrap(mock, api, unit="usd")
    result = call(side, llm, api, stream)
    expected = genai_price(mock, api)
    budget = reader.get_budget(CUSTOMER)
    assert (budget.spent, budget.reserved) == (expected, 0)
    # (The mock's usage is not that of this short prompt, so it is above the reservation:
    # charged in full all the same. test_llm_tokens shows the bound holding for real counts.)
    (approved, _), recorded = ledger(reader)
    assert (approved, recorded) == ("approved", ("recorded", expected))
    assert len(mock.requests) == 1
    if not stream:
        assert result.usage is not None  # the SDK's own typed response, untouched


def test_charges_match_the_list_prices_worked_out_by_hand(
    side: Side, reader: AgentBillClient
) -> None:
    mock = MockLLM()
    # gpt-4o: 800 uncached input at $2.50/M, 400 cached at $1.25/M, 250 output (50 of them
    # reasoning) at $10/M: $0.002 + $0.0005 + $0.0025 = 5,000 micro-dollars.
    call(side, side.wrap(mock, "chat", unit="usd"), "chat")
    assert reader.get_budget(CUSTOMER).spent == 5_000
    # claude-sonnet-4-5: 500 input at $3/M, 300 cache writes at $3.75/M, 400 cache reads at
    # $0.30/M, 250 output at $15/M: 1,500 + 1,125 + 120 + 3,750 = 6,495 micro-dollars more.
    call(side, side.wrap(mock, "messages", unit="usd"), "messages")
    assert reader.get_budget(CUSTOMER).spent == 5_000 + 6_495


def test_anthropic_stream_helper_is_metered(side: Side, reader: AgentBillClient) -> None:
    mock = MockLLM()
    message = helper_stream(side, side.wrap(mock, "messages", unit="usd"))
    assert message.usage.output_tokens == mock.completion_tokens
    budget = reader.get_budget(CUSTOMER)
    assert (budget.spent, budget.reserved) == (genai_price(mock, "messages"), 0)


@pytest.mark.parametrize("api", ["chat", "responses", "messages"])
def test_token_units_are_input_plus_output_as_reported(
    side: Side, reader: AgentBillClient, api: str
) -> None:
    mock = MockLLM()
    call(side, side.wrap(mock, api), api)
    call(side, side.wrap(mock, api), api, stream=True)
    # Cached input and cache writes are input tokens; reasoning tokens are output tokens.
    assert reader.get_budget(CUSTOMER).spent == 2 * (mock.prompt_tokens + mock.completion_tokens)


@pytest.mark.parametrize(("api", "stream"), [*CASES, ("helper", True)])
def test_a_refusal_raises_the_typed_error_and_sends_nothing(
    side: Side, reader: AgentBillClient, api: str, stream: bool
) -> None:
    reader.set_budget(CUSTOMER, 100)  # 100 micro-dollars: less than any bound
    mock = MockLLM()
    llm = side.wrap(mock, "messages" if api == "helper" else api, unit="usd")
    attempt = functools.partial(helper_stream, side, llm) if api == "helper" else None
    with pytest.raises(BudgetExhaustedError) as refused:
        attempt() if attempt else call(side, llm, api, stream)
    assert refused.value.customer_id == CUSTOMER
    assert mock.requests == []
    budget = reader.get_budget(CUSTOMER)
    assert (budget.spent, budget.reserved) == (0, 0)


@pytest.mark.parametrize("api", ["chat", "responses", "messages"])
def test_a_provider_error_releases_the_reservation(
    side: Side, reader: AgentBillClient, api: str
) -> None:
    mock = MockLLM(status=500)
    llm = side.wrap(mock, api, unit="usd")
    errors = (openai.InternalServerError, anthropic.InternalServerError)
    with pytest.raises(errors):
        call(side, llm, api)
    with pytest.raises(errors):
        call(side, llm, api, stream=True)
    budget = reader.get_budget(CUSTOMER)
    assert (budget.spent, budget.reserved) == (0, 0)
    assert [kind for kind, _ in ledger(reader)] == ["approved", "released"] * 2


@pytest.mark.parametrize("api", ["chat", "responses", "messages"])
def test_a_stream_broken_off_is_charged_its_reservation(
    side: Side, reader: AgentBillClient, api: str
) -> None:
    """Its usage never arrived, so the call is charged what was reserved: with the default
    estimate, the most it could have cost (never less than the provider bills)."""
    mock = MockLLM()
    llm = side.wrap(mock, api, unit="usd")
    kwargs = kwargs_for(api, True)

    streams: list[Any] = []  # held, so only leaving the loop can settle the call

    def sync() -> None:
        streams.append(method(llm, api)(**kwargs))
        for _ in streams[0]:
            break

    async def coro() -> None:
        streams.append(await method(llm, api)(**kwargs))
        async for _ in streams[0]:
            break
        # An async generator left by `break` is closed by the event loop soon after (asyncio
        # finalizes it in a task of its own); wait for that, not for a fixed time.
        deadline = time.monotonic() + 30
        while reader.get_budget(CUSTOMER).reserved and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    side.run(sync, coro)
    (_, estimate), recorded = ledger(reader)
    assert recorded == ("recorded", estimate)
    budget = reader.get_budget(CUSTOMER)
    assert (budget.spent, budget.reserved) == (estimate, 0)


@pytest.mark.parametrize("api", ["chat", "messages"])
def test_a_cancelled_async_stream_is_charged_its_reservation(
    redis_server: RedisServer, namespace: str, reader: AgentBillClient, api: str
) -> None:
    mock = MockLLM(stall_after=3)  # then the provider goes quiet: only cancellation ends it
    events_seen = 0

    async def main() -> None:
        nonlocal events_seen
        async with AsyncAgentBillClient(redis_url=redis_server.url, namespace=namespace) as ac:
            sdk: Any = mock.async_anthropic() if api == "messages" else mock.async_openai()
            llm = ac.wrap(sdk, agent_id=AGENT, customer_id=CUSTOMER, unit="usd")
            started = asyncio.Event()

            async def consume() -> None:
                nonlocal events_seen
                async for _ in await method(llm, api)(**kwargs_for(api, True)):
                    events_seen += 1
                    started.set()

            task = asyncio.create_task(consume())
            await started.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    assert events_seen >= 1
    assert len(mock.requests) == 1
    (_, estimate), recorded = ledger(reader)
    assert recorded == ("recorded", estimate)
    budget = reader.get_budget(CUSTOMER)
    assert (budget.spent, budget.reserved) == (estimate, 0)


@pytest.mark.parametrize("api", ["chat", "messages"])
def test_a_cancelled_async_call_releases(
    redis_server: RedisServer, namespace: str, reader: AgentBillClient, api: str
) -> None:
    mock = MockLLM(stall_after=0)  # the answer never comes

    async def main() -> None:
        async with AsyncAgentBillClient(redis_url=redis_server.url, namespace=namespace) as ac:
            sdk: Any = mock.async_anthropic() if api == "messages" else mock.async_openai()
            llm = ac.wrap(sdk, agent_id=AGENT, customer_id=CUSTOMER, unit="usd")
            task = asyncio.create_task(method(llm, api)(**kwargs_for(api, False)))
            while not mock.requests:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    assert [kind for kind, _ in ledger(reader)] == ["approved", "released"]
    budget = reader.get_budget(CUSTOMER)
    assert (budget.spent, budget.reserved) == (0, 0)


def test_chat_streams_ask_for_usage_and_hide_it_from_a_caller_who_did_not(
    side: Side, reader: AgentBillClient
) -> None:
    mock = MockLLM()
    llm = side.wrap(mock, "chat")
    chunks = call(side, llm, "chat", stream=True)
    assert mock.requests[-1]["stream_options"] == {"include_usage": True}
    assert chunks
    assert all(chunk.choices for chunk in chunks)  # no usage-only chunk
    asked = call(side, llm, "chat", stream=True, stream_options={"include_usage": True})
    assert asked[-1].choices == []
    assert asked[-1].usage.total_tokens == 1450
    assert reader.get_budget(CUSTOMER).spent == 2 * 1450


@pytest.mark.parametrize(
    ("api", "param"), [("chat", "max_completion_tokens"), ("responses", "max_output_tokens")]
)
def test_an_openai_call_without_an_output_cap_is_sent_the_default_one(
    side: Side, reader: AgentBillClient, api: str, param: str
) -> None:
    mock = MockLLM()
    kwargs = kwargs_for(api, False)
    kwargs.pop("max_tokens", None)
    kwargs.pop("max_output_tokens", None)
    seen: list[LLMRequest] = []

    def estimate(request: LLMRequest) -> int:
        seen.append(request)
        return request.bound

    for cap in (4096, 100):
        create = method(side.wrap(mock, api, estimate=estimate, default_max_output_tokens=cap), api)
        side.run(functools.partial(create, **kwargs), functools.partial(create, **kwargs))
        assert mock.requests[-1][param] == cap
        assert seen[-1].max_output_tokens == cap
        assert seen[-1].bound == seen[-1].input_tokens + cap  # tokens: input bound + output cap
    call(side, side.wrap(mock, api), api)  # the caller's own cap (300) is sent unchanged
    assert mock.requests[-1].get(param) is None or mock.requests[-1][param] == 300


def test_an_unknown_model_is_refused_before_anything_unless_priced(
    side: Side, reader: AgentBillClient, raw: Any, namespace: str
) -> None:
    mock = MockLLM()
    llm = side.wrap(mock, "chat", unit="usd")
    with pytest.raises(UnknownModelPriceError) as unknown:
        call(side, llm, "chat", model="acme-private-1")
    assert isinstance(unknown.value, InvalidRequestError)
    assert unknown.value.field == "model"
    assert mock.requests == []
    assert namespace_keys(raw, namespace, ledger=True) == {}

    price = ModelPrice(input_mtok=Decimal("1"), output_mtok=Decimal("2"))
    priced = side.wrap(mock, "chat", unit="usd", prices={"acme-private-1": price})
    call(side, priced, "chat", model="acme-private-1")
    # 1,200 input tokens at $1/M (no cache price given: all at the input price) and 250 output
    # at $2/M: $0.0017.
    assert reader.get_budget(CUSTOMER).spent == 1_700


def test_wrap_checks_its_arguments_and_writes_nothing(side: Side, raw: Any, namespace: str) -> None:
    mock = MockLLM()
    wrong_twin: Any = mock.openai() if side.is_async else mock.async_openai()
    bad: list[tuple[str, Callable[[], object]]] = [
        ("llm_client", lambda: side.client.wrap(wrong_twin, agent_id=AGENT)),
        ("llm_client", lambda: side.client.wrap(object(), agent_id=AGENT)),
        ("agent_id", lambda: side.wrap(mock, "chat", agent_id="")),
        ("customer_id", lambda: side.wrap(mock, "chat", customer_id="\n")),
        ("unit", lambda: side.wrap(mock, "chat", unit="eur")),
        ("estimate", lambda: side.wrap(mock, "chat", estimate="learnt")),
        ("estimate", lambda: side.wrap(mock, "chat", estimate=-1)),
        ("estimate", lambda: side.wrap(mock, "chat", estimate=1.5)),
        ("prices", lambda: side.wrap(mock, "chat", prices={"m": 1})),
        ("prices", lambda: side.wrap(mock, "chat", unit="usd", prices={"m": 1})),
        ("default_max_output_tokens", lambda: side.wrap(mock, "chat", default_max_output_tokens=0)),
    ]
    for field, make in bad:
        with pytest.raises(InvalidRequestError) as exc:
            make()
        assert exc.value.field == field, (field, exc.value)
    llm = side.wrap(mock, "chat", estimate=lambda request: "many")
    with pytest.raises(InvalidRequestError) as exc:
        call(side, llm, "chat")
    assert exc.value.field == "estimate"
    with pytest.raises(InvalidRequestError) as exc:
        call(side, side.wrap(mock, "chat"), "chat", model=None)
    assert exc.value.field == "model"
    assert mock.requests == []
    assert namespace_keys(raw, namespace, ledger=True) == {}


def test_estimate_an_int_or_a_callable_of_the_request(side: Side, reader: AgentBillClient) -> None:
    mock = MockLLM()
    call(side, side.wrap(mock, "chat", estimate=1_234), "chat")
    seen: list[LLMRequest] = []

    def half(request: LLMRequest) -> int:
        seen.append(request)
        return request.bound // 2

    call(side, side.wrap(mock, "messages", unit="usd", estimate=half), "messages", stream=True)
    (request,) = seen
    assert (request.provider, request.operation, request.model) == (
        "anthropic",
        "messages.create",
        "claude-sonnet-4-5",
    )
    assert (request.stream, request.unit, request.counted_by) == (True, "usd", "utf8-bytes")
    assert request.max_output_tokens == request.params["max_tokens"] == 300
    assert [units for kind, units in ledger(reader) if kind == "approved"] == [
        1_234,
        request.bound // 2,
    ]


def test_the_wrapped_client_is_the_sdk_client_and_the_original_stays_unmetered(
    reader: AgentBillClient,
) -> None:
    mock = MockLLM()
    original = mock.openai()
    llm = reader.wrap(original, agent_id=AGENT, customer_id=CUSTOMER, unit="usd")
    assert_type(llm, openai.OpenAI)
    assert isinstance(llm, openai.OpenAI)
    assert llm is not original
    completion = llm.chat.completions.create(model="gpt-4o", messages=[], max_tokens=5)
    assert_type(completion, ChatCompletion)

    original.chat.completions.create(model="gpt-4o", messages=[], max_tokens=5)
    assert reader.get_budget(CUSTOMER).spent == 5_000  # the original's call was not metered

    # Copies, raw responses, streamed responses and the SDK's stream helper are metered too.
    llm.with_options(timeout=5).chat.completions.create(model="gpt-4o", messages=[])
    raw = llm.with_raw_response.chat.completions.create(model="gpt-4o", messages=[])
    assert raw.parse().usage is not None
    with llm.with_streaming_response.chat.completions.create(
        model="gpt-4o", messages=[], stream=True
    ) as streamed:
        lines = list(streamed.iter_lines())
    assert lines
    assert not any('"choices": []' in line for line in lines)
    with llm.chat.completions.stream(model="gpt-4o", messages=[]) as helper:
        helper.get_final_completion()
    budget = reader.get_budget(CUSTOMER)
    assert (budget.spent, budget.reserved) == (5 * 5_000, 0)
    assert len(mock.requests) == 6


def test_importing_agentbill_imports_no_sdk_price_table_or_tokenizer() -> None:
    probe = (
        "import sys, agentbill\n"
        "print(sorted(m for m in ('openai', 'anthropic', 'genai_prices', 'tiktoken', 'httpx2',"
        " 'agentbill.llm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_calls_count_in_their_task_under_its_ceiling(side: Side, reader: AgentBillClient) -> None:
    mock = MockLLM()
    llm = side.wrap(mock, "chat", task_ref="report-7", task_ceiling=10_000)
    call(side, llm, "chat")
    task = reader.get_task("report-7", CUSTOMER)
    assert (task.ceiling, task.used, task.reserved) == (10_000, 1_450, 0)
    with pytest.raises(TaskCeilingExceededError):
        call(side, llm, "chat", max_tokens=9_000)  # its bound is above what the task has left
    assert len(mock.requests) == 1


@pytest.mark.parametrize("api", ["chat", "messages"])
def test_a_stream_closed_before_its_end_is_charged_its_reservation(
    side: Side, reader: AgentBillClient, api: str
) -> None:
    mock = MockLLM()
    llm = side.wrap(mock, api, unit="usd")
    kwargs = kwargs_for(api, True)

    def sync() -> None:
        stream = method(llm, api)(**kwargs)
        next(stream)
        stream.close()

    async def coro() -> None:
        stream = await method(llm, api)(**kwargs)
        await anext(stream)
        await stream.close()

    side.run(sync, coro)
    (_, estimate), recorded = ledger(reader)
    assert recorded == ("recorded", estimate)
    budget = reader.get_budget(CUSTOMER)
    assert (budget.spent, budget.reserved) == (estimate, 0)


def test_a_price_in_fractions_of_a_micro_dollar_is_rounded_up(
    side: Side, reader: AgentBillClient
) -> None:
    # gpt-4o-mini: 800 input at $0.15/M, 401 cached at $0.075/M, 250 output at $0.60/M:
    # 120 + 30.075 + 150 = 300.075 micro-dollars, charged as 301.
    mock = MockLLM(prompt_tokens=1_201, cached_tokens=401)
    call(side, side.wrap(mock, "chat", unit="usd"), "chat", model="gpt-4o-mini")
    assert reader.get_budget(CUSTOMER).spent == 301
