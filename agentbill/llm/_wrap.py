"""``client.wrap(llm_client, ...)``: the provider's own client, with its model calls metered.

The wrapped client is a copy of the one given (``llm_client.with_options()``: the same class,
settings and HTTP connection pool), whose metered methods are replaced, on that copy only, by
functions that preflight before calling the original and settle after. Everything else is the
SDK's own, so the copy behaves and type-checks as the original; ``with_raw_response``,
``with_streaming_response`` and the SDKs' stream helpers go through the metered methods too,
and ``copy()`` / ``with_options()`` of the wrapped client return wrapped clients. The original
client is left unmetered.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar, cast

from agentbill import _core
from agentbill._exceptions import InvalidRequestError
from agentbill._gate import _admit, _admit_async
from agentbill._install import pip_install
from agentbill._learned import Learner
from agentbill._models import validate_units
from agentbill.llm._estimate import resolve
from agentbill.llm._meter import AsyncTicket, SyncTicket, SyncTicketClient, TicketClient
from agentbill.llm._plan import OPERATIONS, CallPlan, Operation, Provider, Settings, plan_call
from agentbill.llm._pricing import Pricer

C = TypeVar("C")

CLIENT_CLASSES: tuple[tuple[Provider, str, str, str], ...] = (
    ("openai", "openai", "OpenAI", "AsyncOpenAI"),
    ("anthropic", "anthropic", "Anthropic", "AsyncAnthropic"),
)


class WrapClient(TicketClient, Protocol):
    """What ``wrap`` calls on either client (this package sits below both): its settings
    (``_script_settings``) to validate the arguments, and what a ticket calls."""

    @property
    def _script_settings(self) -> _core.ScriptSettings: ...


class SyncWrapClient(SyncTicketClient, WrapClient, Protocol):
    """What ``wrap`` calls on AgentBillClient."""


def identify(llm_client: object) -> tuple[Provider, bool]:
    """(provider, is async) of an SDK client. Looks only at SDKs already imported: a client of
    one exists only if its SDK was imported, and agentbill imports none."""
    for provider, module, sync_name, async_name in CLIENT_CLASSES:
        sdk = sys.modules.get(module)
        if sdk is None:
            continue
        if isinstance(llm_client, getattr(sdk, sync_name)):
            return provider, False
        if isinstance(llm_client, getattr(sdk, async_name)):
            return provider, True
    raise InvalidRequestError(
        "llm_client", "must be an OpenAI, AsyncOpenAI, Anthropic or AsyncAnthropic client"
    )


def settings_for(
    client: WrapClient,
    llm_client: object,
    is_async: bool,
    *,
    agent_id: object,
    customer_id: object,
    task_ref: object,
    task_ceiling: object,
    unit: object,
    estimate: object,
    prices: object,
    default_max_output_tokens: object,
) -> Settings:
    """Validate wrap's arguments (InvalidRequestError naming the first bad one)."""
    provider, llm_is_async = identify(llm_client)
    if llm_is_async != is_async:
        name = type(llm_client).__name__
        twin = "AsyncAgentBillClient" if llm_is_async else "AgentBillClient"
        raise InvalidRequestError("llm_client", f"{name} must be wrapped by {twin}.wrap")
    _core.validate_gate(
        client._script_settings, agent_id, 1, customer_id, task_ref, task_ceiling, None
    )
    if unit not in ("token", "usd") or not isinstance(unit, str):
        raise InvalidRequestError("unit", "must be 'token' or 'usd'")
    estimator = resolve(estimate)
    cap = validate_units("default_max_output_tokens", default_max_output_tokens)
    if cap < 1:
        raise InvalidRequestError("default_max_output_tokens", "must be at least 1")
    pricer = None
    if unit == "usd":
        pricer = Pricer(provider, _prices(prices))
    elif prices is not None:
        raise InvalidRequestError("prices", "applies to unit='usd' only")
    return Settings(
        provider=provider,
        agent_id=str(agent_id),
        customer_id=customer_id if isinstance(customer_id, str) else None,
        task_ref=task_ref if isinstance(task_ref, str) else None,
        task_ceiling=task_ceiling if isinstance(task_ceiling, int) else None,
        unit="usd" if unit == "usd" else "token",
        estimator=estimator,
        pricer=pricer,
        default_max_output_tokens=cap,
        learned=estimate == "learned" and isinstance(estimate, str),
    )


def _prices(prices: object) -> dict[str, Any]:
    try:
        from genai_prices.types import ModelPrice
    except ImportError:
        raise ImportError(
            f"unit='usd' prices calls with genai-prices: {pip_install('llm')}"
        ) from None
    if prices is None:
        return {}
    if not isinstance(prices, Mapping) or not all(
        isinstance(k, str) and isinstance(v, ModelPrice) for k, v in prices.items()
    ):
        raise InvalidRequestError("prices", "must map model names to genai_prices.types.ModelPrice")
    return dict(prices)


def preflight_of(s: Settings, plan: CallPlan) -> dict[str, Any]:
    """The gate's preflight arguments for one call (see ``_gate._admit``): the call's
    reservation is its own, unadoptable and out of the client's book, closed only by its id."""
    return {
        "agent_id": s.agent_id,
        "estimated_units": plan.units,
        "customer_id": s.customer_id,
        "task_ref": s.task_ref,
        "task_ceiling": s.task_ceiling,
        "ttl": None,
    }


class SyncMeter:
    """Preflights for one wrapped client, with AgentBillClient."""

    def __init__(self, client: SyncWrapClient, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.learner = (
            Learner(client, settings.agent_id, settings.customer_id) if settings.learned else None
        )

    def preflight(self, plan: CallPlan) -> SyncTicket:
        if self.learner is not None:
            units = self.learner.units(plan.request.bound, plan.request.model)
            plan = dataclasses.replace(plan, units=cast(int, units))
        check = _admit(self.client, preflight_of(self.settings, plan))
        return SyncTicket(self.client, self.settings, plan, check)

    def method(self, op: Operation, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def metered(*args: Any, **kwargs: Any) -> Any:
            plan = plan_call(self.settings, op, kwargs)
            if op.manager:
                return _metered_manager(original(*args, **plan.kwargs), self, plan)
            ticket = self.preflight(plan)
            try:
                result = original(*args, **plan.kwargs)
            except BaseException:
                ticket.release()
                raise
            return ticket.attach(result)

        return metered


class AsyncMeter:
    """Preflights for one wrapped client, with AsyncAgentBillClient."""

    def __init__(self, client: WrapClient, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.learner = (
            Learner(client, settings.agent_id, settings.customer_id) if settings.learned else None
        )

    async def preflight(self, plan: CallPlan) -> AsyncTicket:
        if self.learner is not None:
            units = self.learner.units(plan.request.bound, plan.request.model)
            if inspect.isawaitable(units):
                units = await units
            plan = dataclasses.replace(plan, units=units)
        check = await _admit_async(self.client, preflight_of(self.settings, plan))
        return AsyncTicket(self.client, self.settings, plan, check)

    def method(self, op: Operation, original: Callable[..., Any]) -> Callable[..., Any]:
        if op.manager:  # a plain function returning a manager entered with `async with`

            @functools.wraps(original)
            def manager(*args: Any, **kwargs: Any) -> Any:
                plan = plan_call(self.settings, op, kwargs)
                return _metered_manager(original(*args, **plan.kwargs), self, plan)

            return manager

        @functools.wraps(original)
        async def metered(*args: Any, **kwargs: Any) -> Any:
            plan = plan_call(self.settings, op, kwargs)
            ticket = await self.preflight(plan)
            try:
                result = await original(*args, **plan.kwargs)
            except BaseException:  # CancelledError and timeouts too
                await ticket.release()
                raise
            return await ticket.attach(result)

        return metered


def _sync_manager_class(cls: type[Any]) -> type:
    def __enter__(self: Any) -> Any:
        meter, plan = self._agentbill
        ticket = meter.preflight(plan)
        try:
            stream = cls.__enter__(self)
        except BaseException:
            ticket.release()
            raise
        return ticket.attach(stream)

    return type(cls.__name__, (cls,), {"__enter__": __enter__, "__qualname__": cls.__qualname__})


def _async_manager_class(cls: type[Any]) -> type:
    async def __aenter__(self: Any) -> Any:
        meter, plan = self._agentbill
        try:
            ticket = await meter.preflight(plan)
        except BaseException:
            for pending in vars(self).values():  # the request, made but never to be awaited
                if inspect.iscoroutine(pending):
                    pending.close()
            raise
        try:
            stream = await cls.__aenter__(self)
        except BaseException:
            await ticket.release()
            raise
        return await ticket.attach(stream)

    return type(cls.__name__, (cls,), {"__aenter__": __aenter__, "__qualname__": cls.__qualname__})


_MANAGERS: dict[type, type] = {}


def _metered_manager(manager: Any, meter: SyncMeter | AsyncMeter, plan: CallPlan) -> Any:
    """A stream manager (``messages.stream(...)``) that preflights when entered, just before
    it sends the request: one never entered reserves nothing."""
    cls = type(manager)
    if cls not in _MANAGERS:
        is_async = hasattr(cls, "__aenter__")
        _MANAGERS[cls] = _async_manager_class(cls) if is_async else _sync_manager_class(cls)
    manager.__class__ = _MANAGERS[cls]
    manager._agentbill = (meter, plan)
    return manager


def install(llm_client: C, meter: SyncMeter | AsyncMeter) -> C:
    """A copy of ``llm_client`` whose metered methods go through ``meter``."""
    copy: Any = llm_client.with_options()  # type: ignore[attr-defined]
    for op in OPERATIONS[meter.settings.provider]:
        resource = copy
        for name in op.path:
            resource = getattr(resource, name)
        original = getattr(resource, op.method, None)
        if original is not None:  # an SDK version without this method
            setattr(resource, op.method, meter.method(op, original))
    unmetered_copy = copy.copy

    @functools.wraps(unmetered_copy)
    def metered_copy(*args: Any, **kwargs: Any) -> Any:
        return install(unmetered_copy(*args, **kwargs), meter)

    copy.copy = metered_copy
    copy.with_options = metered_copy
    return copy  # type: ignore[no-any-return]


def wrap_sync(client: SyncWrapClient, llm_client: C, **options: object) -> C:
    settings = settings_for(client, llm_client, False, **options)
    return install(llm_client, SyncMeter(client, settings))


def wrap_async(client: WrapClient, llm_client: C, **options: object) -> C:
    settings = settings_for(client, llm_client, True, **options)
    return install(llm_client, AsyncMeter(client, settings))
