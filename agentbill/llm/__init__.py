"""LLM metering: ``client.wrap(OpenAI())`` meters every model call against the budgets.

``AgentBillClient.wrap`` / ``AsyncAgentBillClient.wrap`` return the provider's own client with
its model calls (OpenAI ``chat.completions.create`` / ``.parse`` and ``responses.create`` /
``.parse``; Anthropic ``messages.create`` / ``.parse`` / ``.stream``; streaming or not)
preflighted before the HTTP request and recorded from the response's ``usage`` after it, in
tokens or in micro-dollars priced by genai-prices. Needs ``pip install 'agentbill-redis[llm]'`` for
``unit="usd"`` and tiktoken counts; the provider SDKs are the user's. Importing ``agentbill``
imports none of this.
"""

from agentbill.llm._estimate import DEFAULT_MAX_OUTPUT_TOKENS, EstimateSpec, Estimator, LLMRequest
from agentbill.llm._pricing import MICRO_USD, UnknownModelPriceError
from agentbill.llm._tokens import install_encoding, tiktoken_cache_dir

__all__ = [
    "DEFAULT_MAX_OUTPUT_TOKENS",
    "MICRO_USD",
    "EstimateSpec",
    "Estimator",
    "LLMRequest",
    "UnknownModelPriceError",
    "install_encoding",
    "tiktoken_cache_dir",
]
