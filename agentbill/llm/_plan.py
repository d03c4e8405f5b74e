"""A metered call before it is sent (no I/O): which operation, what to reserve, what to send.

``plan_call`` validates the call, adds what metering needs to its arguments (the output cap an
OpenAI call sets none of; ``stream_options.include_usage`` for a chat stream; an uncompressed
body for responses read byte by byte), bounds its cost and asks the estimator what to reserve.
``charge`` turns what the response said into the units to record.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

from agentbill._exceptions import InvalidRequestError
from agentbill.llm._estimate import Estimator, LLMRequest
from agentbill.llm._pricing import Pricer, Unit, units
from agentbill.llm._tokens import input_token_bound
from agentbill.llm._usage import Tally

logger = logging.getLogger("agentbill")

Provider = Literal["openai", "anthropic"]
RAW_RESPONSE_HEADER = "X-Stainless-Raw-Response"
MAX_USAGE_METADATA = 3_000
"""The provider's usage goes into the record's metadata when its JSON is at most this long."""
"""The header the SDKs' ``with_raw_response`` / ``with_streaming_response`` set on a call."""


@dataclass(frozen=True, slots=True)
class Operation:
    """One metered SDK method."""

    name: str
    """``chat.completions.create``: the path to the resource, then the method."""
    flavor: Literal["chat", "responses", "messages"]
    cap_params: tuple[str, ...]
    """The parameters that cap the output, in the order the API prefers them."""
    inject_cap: str | None
    """Where the wrapper puts its default cap when the call sets none (None: the SDK requires
    a cap, so the call already has one)."""
    manager: bool = False
    """The method returns a stream manager that sends the request when entered."""

    @property
    def path(self) -> tuple[str, ...]:
        return tuple(self.name.split(".")[:-1])

    @property
    def method(self) -> str:
        return self.name.rsplit(".", 1)[1]


_CHAT = ("max_completion_tokens", "max_tokens")
OPERATIONS: dict[Provider, tuple[Operation, ...]] = {
    "openai": (
        Operation("chat.completions.create", "chat", _CHAT, "max_completion_tokens"),
        Operation("chat.completions.parse", "chat", _CHAT, "max_completion_tokens"),
        Operation("responses.create", "responses", ("max_output_tokens",), "max_output_tokens"),
        Operation("responses.parse", "responses", ("max_output_tokens",), "max_output_tokens"),
    ),
    "anthropic": (
        Operation("messages.create", "messages", ("max_tokens",), None),
        Operation("messages.parse", "messages", ("max_tokens",), None),
        Operation("messages.stream", "messages", ("max_tokens",), None, manager=True),
    ),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """One wrapped client's metering settings, validated by ``wrap``."""

    provider: Provider
    agent_id: str
    customer_id: str | None
    task_ref: str | None
    task_ceiling: int | None
    unit: Unit
    estimator: Estimator
    pricer: Pricer | None
    default_max_output_tokens: int
    learned: bool = False
    """``estimate="learned"``: the meter reserves from the agent's statistics for the model."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CallPlan:
    request: LLMRequest
    units: int
    """What the preflight reserves; also what a call that ends without usage is charged."""
    kwargs: dict[str, object]
    drop_usage_chunk: bool
    context: Mapping[str, str] = field(default_factory=dict)
    """genai-prices' price context (service tier, speed) the request asked for."""

    @property
    def flavor(self) -> str:
        return "messages" if self.request.provider == "anthropic" else self._openai_flavor()

    def _openai_flavor(self) -> str:
        return "responses" if self.request.operation.startswith("responses.") else "chat"

    def tally(self) -> Tally:
        return Tally(self.flavor, self.drop_usage_chunk)


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _headers(value: object) -> dict[str, object]:
    return dict(value) if isinstance(value, Mapping) else {}


def plan_call(s: Settings, op: Operation, kwargs: Mapping[str, object]) -> CallPlan:
    """Validate and prepare one call; raises InvalidRequestError (``model``, ``estimate``) or
    UnknownModelPriceError before anything is reserved or sent."""
    # A one-shot iterable of messages must survive being read twice (here, then by the SDK).
    params = {k: list(v) if isinstance(v, Iterator) else v for k, v in kwargs.items()}
    model = params.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("model", "must be the model's name (a non-empty str)")
    stream = op.manager or params.get("stream") is True
    cap = next((c for c in (_int(params.get(p)) for p in op.cap_params) if c is not None), None)
    if cap is None:
        cap = s.default_max_output_tokens
        if op.inject_cap is not None:
            params[op.inject_cap] = cap
    choices = _int(params.get("n")) if op.flavor == "chat" else None
    output_tokens = cap * max(choices or 1, 1)

    drop = False
    if stream and op.flavor == "chat":
        options = params.get("stream_options")
        if not (isinstance(options, Mapping) and options.get("include_usage") is True):
            params["stream_options"] = {**_headers(options), "include_usage": True}
            drop = True  # the caller did not ask for the usage chunk: they will not see it
    headers = _headers(params.get("extra_headers"))
    raw = str(headers.get(RAW_RESPONSE_HEADER, "")).lower() == "stream"
    if (stream or raw) and not any(k.lower() == "accept-encoding" for k in headers):
        # The wrapper reads these bodies byte by byte as they pass; keep them uncompressed.
        params["extra_headers"] = {**headers, "Accept-Encoding": "identity"}

    input_tokens, counted_by = input_token_bound(s.provider, model, params)
    context = {k: v for k in ("service_tier", "speed") if isinstance(v := params.get(k), str)}
    if s.unit == "usd":
        assert s.pricer is not None
        s.pricer.require(model)
        bound = s.pricer.bound(model, input_tokens, output_tokens, context)
    else:
        bound = input_tokens + output_tokens
    request = LLMRequest(
        provider=s.provider,
        operation=op.name,
        model=model,
        params=params,
        stream=stream,
        unit=s.unit,
        input_tokens=input_tokens,
        counted_by=counted_by,
        max_output_tokens=output_tokens,
        bound=bound,
    )
    return CallPlan(
        request=request,
        units=s.estimator(request),
        kwargs=params,
        drop_usage_chunk=drop,
        context=context,
    )


def charge(s: Settings, plan: CallPlan, tally: Tally) -> tuple[int, dict[str, object]]:
    """The units to record for a response, and the record's metadata. A response whose usage
    never arrived (a stream broken off, closed early or cut by an error) is charged the
    reservation: with ``estimate="bound"``, the most it could have cost."""
    meta: dict[str, object] = {"model": tally.model or plan.request.model, "estimate": plan.units}
    usage = tally.readable_usage()
    if usage is None:
        if tally.complete:
            logger.warning(
                "agentbill: could not read %s's usage %r; charging the estimate",
                tally.model,
                tally.usage,
            )
        return plan.units, {**meta, "usage": None}
    context = dict(plan.context)
    if tally.service_tier is not None and s.provider == "openai":
        context["service_tier"] = tally.service_tier
    try:
        used = units(s.unit, s.pricer, plan.flavor, tally.body(), plan.request.model, context)
    except (LookupError, ValueError) as exc:
        logger.warning(
            "agentbill: could not price %s's usage (%s); charging the estimate", tally.model, exc
        )
        return plan.units, {**meta, "usage": None}
    if len(json.dumps(usage)) > MAX_USAGE_METADATA:  # records take 4 KiB of metadata
        return used, {**meta, "usage": None}
    return used, {**meta, "usage": usage}
