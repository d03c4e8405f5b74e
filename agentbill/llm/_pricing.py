"""Units of a call: tokens as the provider reports them, or micro-dollars priced by genai-prices.

genai-prices (pydantic's maintained price database, bundled in the package: no network) reads
the provider's whole ``usage`` object (cached input, cache writes of either lifetime, reasoning
tokens, server tool calls) and prices it for the model the response names. A price is turned
into integer micro-dollars rounded *up*, so a charge is never below the provider's bill.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import ROUND_CEILING, Decimal
from typing import TYPE_CHECKING, Literal

from agentbill._exceptions import InvalidRequestError

if TYPE_CHECKING:
    from genai_prices.types import ModelPrice, Provider

Unit = Literal["token", "usd"]
MICRO_USD = 1_000_000
"""Units per US dollar with ``unit="usd"``."""

FLAVORS = {"chat": "chat", "responses": "responses", "messages": "default"}
"""genai-prices' name for each API's usage shape."""


class UnknownModelPriceError(InvalidRequestError):
    """``unit="usd"`` and genai-prices has no price for the model: the call is refused before
    anything is sent (never charged as $0). Pass the model's price in ``wrap(prices=...)``."""

    def __init__(self, model: str, provider: str) -> None:
        super().__init__(
            "model",
            f"genai-prices has no {provider} price for {model!r}; pass "
            f"wrap(..., prices={{{model!r}: genai_prices.types.ModelPrice(...)}})",
        )
        self.model = model
        self.provider = provider

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.model, self.provider))


def micro_usd(price: Decimal) -> int:
    """A USD amount as integer micro-dollars, rounded up."""
    return int((price * MICRO_USD).to_integral_value(rounding=ROUND_CEILING))


def _provider(provider: str) -> Provider:
    from genai_prices.data_snapshot import get_snapshot

    return get_snapshot().find_provider(None, provider, None)


def reported_tokens(flavor: str, usage: Mapping[str, object]) -> int:
    """Input plus output tokens as the provider reports them (cached and cache-write tokens
    included, reasoning tokens being part of the output)."""

    def n(key: str) -> int:
        value = usage.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    if flavor == "chat":
        return n("prompt_tokens") + n("completion_tokens")
    if flavor == "responses":
        return n("input_tokens") + n("output_tokens")
    return (
        n("input_tokens")
        + n("cache_creation_input_tokens")
        + n("cache_read_input_tokens")
        + n("output_tokens")
    )


class Pricer:
    """Prices of one wrapped client: genai-prices', overridden by the user's ``prices``."""

    def __init__(self, provider: str, prices: Mapping[str, ModelPrice]) -> None:
        self.provider = provider
        self._prices = dict(prices)

    def _model_price(self, model: str) -> tuple[ModelPrice | None, bool]:
        """(the user's price, known): known is False when neither the user nor genai-prices
        has a price for ``model``."""
        if model in self._prices:
            return self._prices[model], True
        from genai_prices.data_snapshot import get_snapshot

        try:
            get_snapshot().find_provider_model(model, None, self.provider, None)
        except LookupError:
            return None, False
        return None, True

    def require(self, model: str) -> None:
        """Raise UnknownModelPriceError unless ``model`` has a price."""
        if not self._model_price(model)[1]:
            raise UnknownModelPriceError(model, self.provider)

    def _price(self, model: str, usage: object, context: Mapping[str, str]) -> Decimal:
        from genai_prices import calc_price

        own, known = self._model_price(model)
        if own is not None:
            return own.calc_price(usage)["total_price"]
        if not known:
            raise UnknownModelPriceError(model, self.provider)
        calc = calc_price(usage, model, provider_id=self.provider, price_context=context or None)
        return calc.total_price

    def bound(
        self, model: str, input_tokens: int, output_tokens: int, context: Mapping[str, str]
    ) -> int:
        """Micro-dollars of the most ``input_tokens`` in and ``output_tokens`` out can cost:
        every input token at the dearest input price (plain, or written to the cache for 5
        minutes or an hour), every output token at the output price."""
        from genai_prices import Usage

        plain = Usage(input_tokens=input_tokens, output_tokens=output_tokens)
        dearest = self._price(model, plain, context)
        for extra in (
            {"cache_write_tokens": input_tokens},
            {"cache_write_tokens": input_tokens, "cache_write_1h_tokens": input_tokens},
        ):
            usage = Usage(input_tokens=input_tokens, output_tokens=output_tokens, **extra)
            try:
                dearest = max(dearest, self._price(model, usage, context))
            except ValueError:  # the model has no such price: that usage cannot occur
                continue
        return micro_usd(dearest)

    def charge(
        self,
        flavor: str,
        body: Mapping[str, object],
        fallback_model: str,
        context: Mapping[str, str],
    ) -> int:
        """Micro-dollars of a response (``body``: its ``model`` and ``usage``), priced for the
        model it names, else for ``fallback_model`` (the requested one) when genai-prices and
        the user's prices do not know the named one."""
        model_ref, usage = _provider(self.provider).extract_usage(body, api_flavor=FLAVORS[flavor])
        model = model_ref or fallback_model
        if not self._model_price(model)[1]:
            model = fallback_model
        return micro_usd(self._price(model, usage, context))


def units(
    unit: Unit,
    pricer: Pricer | None,
    flavor: str,
    body: Mapping[str, object],
    fallback_model: str,
    context: Mapping[str, str],
) -> int:
    """The units a complete response (``body`` holding ``model`` and ``usage``) costs."""
    usage = body.get("usage")
    if not isinstance(usage, Mapping):
        raise ValueError("the response has no usage")
    if unit == "token":
        return reported_tokens(flavor, usage)
    assert pricer is not None
    return pricer.charge(flavor, body, fallback_model, context)
