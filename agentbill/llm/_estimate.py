"""What a wrapped call reserves: the request described, and the estimators that price it.

An :class:`Estimator` is any callable of an :class:`LLMRequest` returning the units to reserve.
``estimate="bound"`` reserves ``request.bound``, the most the call can cost; an int reserves
that many units for every call. The request carries everything an estimator needs (provider,
operation, model, the parameters as sent, the bound and how it was counted), so an estimator
that learns from past calls fits the same protocol. ``estimate="learned"`` reserves the p95 of
what this agent's recent calls to the same model used, up to the bound (``agentbill._learned``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol, TypeAlias

from agentbill._exceptions import InvalidRequestError
from agentbill._models import validate_units
from agentbill.llm._pricing import Unit
from agentbill.llm._tokens import Counter

DEFAULT_MAX_OUTPUT_TOKENS = 4096
"""The output cap a wrapped OpenAI call is sent with when it sets none (``wrap(...,
default_max_output_tokens=...)`` changes it), so that its bound holds."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LLMRequest:
    """One metered call, described before it is sent."""

    provider: Literal["openai", "anthropic"]
    operation: str
    """``chat.completions.create``, ``responses.create``, ``messages.create``, ..."""
    model: str
    """The model the request names (the response may name a dated version of it)."""
    params: Mapping[str, object]
    """The call's keyword arguments as they will be sent (with the wrapper's additions)."""
    stream: bool
    unit: Unit
    input_tokens: int
    """An upper bound on the input tokens (see ``counted_by``)."""
    counted_by: Counter
    """``tiktoken`` (OpenAI models, encoding cached) or ``utf8-bytes`` (one token per byte)."""
    max_output_tokens: int
    """The output cap: the request's, else the wrapper's default (sent with the request)."""
    bound: int
    """The most this call can cost, in ``unit``: ``input_tokens`` at the dearest input price
    plus ``max_output_tokens`` at the output price (tokens: their sum)."""


class Estimator(Protocol):
    """Anything that maps a request to the units to reserve for it."""

    def __call__(self, request: LLMRequest, /) -> int: ...


EstimateSpec: TypeAlias = Literal["bound", "learned"] | int | Estimator


def bound(request: LLMRequest) -> int:
    """``estimate="bound"``: the most the call can cost."""
    return request.bound


def resolve(spec: object) -> Estimator:
    """The estimator ``wrap(estimate=...)`` names, or InvalidRequestError naming estimate."""
    if spec == "bound" and isinstance(spec, str):
        return bound
    if spec == "learned" and isinstance(spec, str):
        return bound  # the meter reserves from the statistics, up to this (see _wrap)
    if isinstance(spec, int) and not isinstance(spec, bool):
        units = validate_units("estimate", spec)
        return lambda _request: units
    if callable(spec) and not isinstance(spec, str | bytes | type):
        return _checked(spec)
    raise InvalidRequestError(
        "estimate", "must be 'bound', 'learned', a number of units, or a callable of LLMRequest"
    )


def _checked(fn: Callable[[LLMRequest], object]) -> Estimator:
    def estimate(request: LLMRequest) -> int:
        return validate_units("estimate", fn(request))

    return estimate
