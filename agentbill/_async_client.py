"""AsyncAgentBillClient: AgentBillClient's twin on redis.asyncio, the same methods awaited."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

import redis.asyncio as aioredis

from agentbill import _core, _topology
from agentbill._check import ThresholdCrossing
from agentbill._client import (
    UNSETTLED,
    Ask,
    BaseClient,
    Batch,
    Flush,
    LoadLibrary,
    Pipeline,
    SendBatch,
    from_url,
)
from agentbill._durability import asend_on_nodes
from agentbill._exceptions import (
    StoreUnavailableError,
)
from agentbill._gate import AsyncRun, Gate, UnitsUsed
from agentbill._lease import AsyncLease
from agentbill._models import ClientSettings, Preflight
from agentbill._outage import (
    LAST_DELIVERY,
    AsyncFlusher,
    deliver_until_async,
    warn_undelivered,
)
from agentbill._results import (
    AsyncCheck,
    BudgetStatus,
    Estimates,
    Event,
    Settlement,
    TaskStatus,
    Usage,
)
from agentbill._retry import Heal, translated

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

if TYPE_CHECKING:
    from genai_prices.types import ModelPrice

    from agentbill.llm import EstimateSpec

LLM = TypeVar("LLM")
REDIS_TYPES = (aioredis.Redis, aioredis.RedisCluster)
REDIS_TYPES_TEXT = "must be a redis.asyncio Redis or RedisCluster"


class AsyncAgentBillClient(BaseClient[AsyncCheck]):
    """The asyncio twin of :class:`AgentBillClient`: same parameters, results and errors.

    ``redis`` is a ready ``redis.asyncio.Redis`` (or ``RedisCluster``). Methods are awaited;
    ``preflight`` returns an :class:`AsyncCheck` whose ``record``/``release`` are awaited too.
    """

    _flusher: AsyncFlusher

    def __init__(
        self,
        api_key: str | None = None,
        ceiling: int | None = None,
        *,
        redis_url: str | None = None,
        redis: aioredis.Redis | aioredis.RedisCluster | None = None,
        namespace: str = "agentbill",
        reservation_ttl: int = 3600,
        idempotency_ttl: int = 24 * 3600,
        outcome_retention: int = 24 * 3600,
        task_retention: int = 30 * 24 * 3600,
        idle_retention: int = 90 * 24 * 3600,
        reap_limit: int = 100,
        connect_timeout: float = 0.5,
        socket_timeout: float = 1.0,
        retry_attempts: int = 3,
        retry_deadline: float = 1.0,
        max_connections: int = 50,
        on_outage: Literal["fail_closed", "fail_open", "allowance"] = "fail_closed",
        outage_allowance: int | None = None,
        ledger_max_len: int = 100_000,
        background_settle: bool = False,
        durability: Literal["primary", "replicated"] = "primary",
        durability_replicas: int = 1,
        on_threshold: Callable[[ThresholdCrossing], object] | None = None,
        metrics: bool | CollectorRegistry = False,
        metrics_customers: bool = False,
        trace_customers: bool = False,
    ) -> None:
        arguments = locals()
        self._open(arguments, REDIS_TYPES, REDIS_TYPES_TEXT, _connect)
        self._flusher = AsyncFlusher(self.flush)
        self._make_check = functools.partial(AsyncCheck, _client=self)
        self._instrument(arguments)

    async def _answer(self, ask: Ask) -> object:
        """Do what a dialogue of the base asks (see ``_core.adrive``)."""
        if isinstance(ask, SendBatch):
            return await self._send_batch(ask.calls)
        if isinstance(ask, Pipeline):
            return await self._pipeline(ask.commands, ask.wait)
        if isinstance(ask, LoadLibrary):
            await _topology.aload_library(self._redis, self._library)
            return None
        if isinstance(ask, Flush):
            return await self.flush()
        await asyncio.sleep(ask.seconds)
        return None

    async def _send(self, plan: _core.Plan[_core.T]) -> _core.T:
        call = plan.call
        if self._waits([call]):
            # The call and WAIT in one pipelined round trip (see _durability).
            return self._decode_one(plan, await self._send_batch([call]))
        with translated():
            reply = await self._retry.acall(lambda: self._call_alone(call))
        return plan.decode(cast(_core.Reply, reply))

    async def _call_alone(self, call: _core.Call) -> object:
        """See :meth:`AgentBillClient._call_alone`."""
        fcall = self._library.fcall(call.script, call.keys, call.args)
        try:
            return await self._redis.execute_command(*fcall)
        except aioredis.ResponseError as exc:
            return await _core.adrive(self._after_one(call, exc), self._answer)

    async def _run(self, plan: _core.Plan[_core.T]) -> _core.T:
        result = await self._send(plan)
        self._notify(result)
        if self._outage.due() and not self._settings.background_settle:
            await self.flush()
        return result

    async def _pipeline(
        self, commands: list[list[Any]], wait: bool
    ) -> tuple[list[object], list[object]]:
        """See :meth:`AgentBillClient._pipeline`."""
        after = self._wait if wait else None
        if after is not None and isinstance(self._redis, aioredis.RedisCluster):
            return await asend_on_nodes(self._redis, commands, after)
        pipe = self._redis.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        if after is None:
            return list(await pipe.execute(raise_on_error=False)), []
        pipe.execute_command(*after)
        answered = list(await pipe.execute(raise_on_error=False))
        return answered[:-1], answered[-1:]

    async def _send_batch(self, calls: list[_core.Call]) -> list[object]:
        """See :meth:`AgentBillClient._send_batch`."""
        batch = Batch.of(calls)
        with translated():
            return await self._retry.acall(
                lambda: _core.adrive(self._attempt_batch(batch), self._answer)
            )

    async def _settle(
        self, plan: _core.Plan[Settlement], release: bool = False, surely: bool = False
    ) -> Settlement:
        if self._settings.background_settle:
            return self._settle_later(plan, release)
        try:
            settlement = await self._run(plan)
        except UNSETTLED as exc:
            return self._offline_settlement(plan, exc, release, surely)
        self._outage.landed(plan, release)
        return settlement

    async def _settle_surely(
        self,
        reservation_id: str,
        units: int | None,
        agent_id: str,
        customer_id: str | None,
        task_ref: str | None,
        **options: Any,
    ) -> Settlement:
        """See :meth:`AgentBillClient._settle_surely`."""
        plan = self._plan_close(reservation_id, units, agent_id, customer_id, task_ref, **options)
        settlement = await self._settle(plan, release=units is None, surely=True)
        self._closed(plan, settlement, release=units is None)
        return settlement

    def _deliver_until(self, deadline: float) -> int:
        """The exit delivery of an async client: its loop is gone (or busy), so the queue is
        sent on a loop of its own, through new connections like the client's (its own belong
        to its loop)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            return self._outage.stats().queued  # inside a running loop: it cannot be blocked
        twin = self._twin()
        if twin is None:
            return self._outage.stats().queued

        async def deliver() -> int:
            try:
                return await deliver_until_async(twin.flush, deadline)
            finally:
                await twin._redis.aclose()

        return asyncio.run(deliver())

    def _twin(self) -> AsyncAgentBillClient | None:
        """A client with this one's settings and queue, over new connections made like this
        one's (None for Redis Cluster)."""
        pool = getattr(self._redis, "connection_pool", None)
        if pool is None or isinstance(self._redis, aioredis.RedisCluster):
            return None
        options = dict(pool.connection_kwargs)
        if isinstance(pool, aioredis.BlockingConnectionPool):
            options["timeout"] = None
        fresh = type(pool)(
            connection_class=pool.connection_class,
            max_connections=pool.max_connections,
            **options,
        )
        twin = AsyncAgentBillClient.__new__(AsyncAgentBillClient)
        BaseClient.__init__(twin, self._settings, aioredis.Redis(connection_pool=fresh), True)
        twin._outage = self._outage
        twin._flusher = AsyncFlusher(twin.flush)
        return twin

    async def flush(self) -> int:
        """See :meth:`AgentBillClient.flush`."""
        return await _core.adrive(self._flush(), self._answer)

    # -- runs ----------------------------------------------------------------------------------

    async def preflight(
        self,
        agent_id: str,
        estimated_units: int,
        customer_id: str | None = None,
        *,
        task_ref: str | None = None,
        task_ceiling: int | None = None,
        idempotency_key: str | None = None,
        ttl: int | None = None,
    ) -> AsyncCheck:
        """See :meth:`AgentBillClient.preflight`."""
        plan = self._plan_preflight(
            agent_id, estimated_units, customer_id, task_ref, task_ceiling, idempotency_key, ttl
        )
        return await self._preflight(plan)

    async def _preflight(self, plan: _core.Plan[AsyncCheck], track: bool = True) -> AsyncCheck:
        try:
            check = await self._run(plan)
        except StoreUnavailableError as exc:
            return self._offline_check(plan, exc, owned=not track)
        self._approved(plan, check, track)
        return check

    async def _reserve_slice(
        self, agent_id: str, units: int, customer_id: str | None, task_ref: str | None, ttl: int
    ) -> AsyncCheck:
        """See :meth:`AgentBillClient._reserve_slice`."""
        plan = self._plan_preflight(
            agent_id, units, customer_id, task_ref, None, None, ttl, adoptable=False
        )
        return await self._preflight(plan, track=False)

    async def _extend(self, check: AsyncCheck, units: object) -> AsyncCheck:
        """See :meth:`AsyncCheck.extend`."""
        plan = _core.plan_extend(self._script_settings, check, units, self._make_check)
        return (await self._run(plan)).raise_for_refusal()

    async def estimates(
        self, agent_id: str, customer_id: str | None = None, *, model: str | None = None
    ) -> Estimates:
        """See :meth:`AgentBillClient.estimates`."""
        return await self._run(
            _core.plan_estimates(self._script_settings, agent_id, customer_id, model)
        )

    async def preflight_many(self, requests: Iterable[Preflight]) -> list[AsyncCheck]:
        """See :meth:`AgentBillClient.preflight_many`."""
        return await _core.adrive(self._preflight_many(requests), self._answer)

    def lease(
        self,
        agent_id: str,
        customer_id: str | None = None,
        *,
        slice_units: int,
        task_ref: str | None = None,
        ttl: int = 60,
    ) -> AsyncLease:
        """See :meth:`AgentBillClient.lease`."""
        return self._lease(AsyncLease, agent_id, customer_id, slice_units, task_ref, ttl)

    async def record(
        self,
        agent_id: str,
        units: int,
        customer_id: str | None = None,
        *,
        reservation_id: str | None = None,
        task_ref: str | None = None,
        success: bool = True,
        idempotency_key: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Settlement:
        """See :meth:`AgentBillClient.record`."""
        plan = self._plan_record(
            agent_id,
            units,
            customer_id,
            reservation_id,
            task_ref,
            success,
            idempotency_key,
            metadata,
        )
        settlement = await self._settle(plan)
        self._recorded(plan, settlement)
        return settlement

    async def release(
        self,
        reservation_id: str | None = None,
        *,
        idempotency_key: str | None = None,
        customer_id: str | None = None,
    ) -> Settlement:
        """See :meth:`AgentBillClient.release`."""
        plan = _core.plan_release(
            self._script_settings, reservation_id, idempotency_key, customer_id
        )
        settlement = await self._settle(plan, release=True)
        self._released(plan, settlement)
        return settlement

    def gate(
        self,
        agent_id: str,
        estimated_units: int | Literal["learned"],
        customer_id: str | None = None,
        *,
        units: UnitsUsed[Any] = None,
        task_ref: str | None = None,
        task_ceiling: int | None = None,
        ttl: int | None = None,
        bound: int | None = None,
    ) -> Gate:
        """See :meth:`AgentBillClient.gate`; decorates ``async def`` functions only."""
        return self._gate(
            agent_id=agent_id,
            estimated_units=estimated_units,
            customer_id=customer_id,
            units=units,
            task_ref=task_ref,
            task_ceiling=task_ceiling,
            ttl=ttl,
            bound=bound,
        )

    def run(
        self,
        agent_id: str,
        estimated_units: int | Literal["learned"],
        customer_id: str | None = None,
        *,
        task_ref: str | None = None,
        task_ceiling: int | None = None,
        ttl: int | None = None,
        charge_estimate: bool = False,
        bound: int | None = None,
    ) -> AsyncRun:
        """A gated block: ``async with client.run(...) as run: ...; await run.record(units)``.

        Preflights on entry (typed RunBlockedError on refusal); releases if the block raises;
        a block left without a record releases, or charges the estimate if
        ``charge_estimate``. Bad arguments raise InvalidRequestError at once.
        """
        return self._block(
            AsyncRun,
            charge_estimate,
            bound,
            agent_id=agent_id,
            estimated_units=estimated_units,
            customer_id=customer_id,
            task_ref=task_ref,
            task_ceiling=task_ceiling,
            ttl=ttl,
        )

    def wrap(
        self,
        llm_client: LLM,
        *,
        agent_id: str,
        customer_id: str | None = None,
        task_ref: str | None = None,
        task_ceiling: int | None = None,
        unit: Literal["token", "usd"] = "token",
        estimate: EstimateSpec = "bound",
        prices: Mapping[str, ModelPrice] | None = None,
        default_max_output_tokens: int = 4096,
    ) -> LLM:
        """See :meth:`AgentBillClient.wrap`: for ``AsyncOpenAI`` and ``AsyncAnthropic``; the
        wrapped client's methods are awaited as before, and its round trips to Redis are too.
        Not awaited itself."""
        from agentbill.llm._wrap import wrap_async

        return wrap_async(
            self,
            llm_client,
            agent_id=agent_id,
            customer_id=customer_id,
            task_ref=task_ref,
            task_ceiling=task_ceiling,
            unit=unit,
            estimate=estimate,
            prices=prices,
            default_max_output_tokens=default_max_output_tokens,
        )

    # -- admin ---------------------------------------------------------------------------------

    async def set_budget(
        self,
        customer_id: str | None,
        limit: int | None,
        *,
        period: Literal["hour", "day", "week", "month"] | None = None,
        tz: str = "UTC",
        agent_id: str | None = None,
        thresholds: Sequence[int] = (),
    ) -> BudgetStatus:
        """See :meth:`AgentBillClient.set_budget`."""
        return await self._run(
            _core.plan_set_budget(
                self._script_settings, customer_id, limit, period, tz, agent_id, thresholds
            )
        )

    async def set_rate_limit(
        self,
        customer_id: str | None,
        units: int | None,
        per_seconds: int | None,
        *,
        burst: int | None = None,
        agent_id: str | None = None,
    ) -> BudgetStatus:
        """See :meth:`AgentBillClient.set_rate_limit`."""
        return await self._run(
            _core.plan_set_rate_limit(
                self._script_settings, customer_id, units, per_seconds, burst, agent_id
            )
        )

    async def set_concurrency_limit(
        self, customer_id: str | None, max_in_flight: int | None, *, agent_id: str | None = None
    ) -> BudgetStatus:
        """See :meth:`AgentBillClient.set_concurrency_limit`."""
        return await self._run(
            _core.plan_set_concurrency_limit(
                self._script_settings, customer_id, max_in_flight, agent_id
            )
        )

    async def get_budget(
        self, customer_id: str | None = None, *, agent_id: str | None = None
    ) -> BudgetStatus:
        """See :meth:`AgentBillClient.get_budget`."""
        return await self._run(_core.plan_get_budget(self._script_settings, customer_id, agent_id))

    async def get_usage(self, customer_id: str | None = None, *, limit: int = 100) -> Usage:
        """See :meth:`AgentBillClient.get_usage`."""
        return await self._run(_core.plan_get_usage(self._script_settings, customer_id, limit))

    async def events(
        self, customer_id: str | None = None, *, since: str | None = None, limit: int | None = None
    ) -> list[Event]:
        """See :meth:`AgentBillClient.events`."""
        pages = _core.plan_events(self._script_settings, customer_id, since, limit)
        return await _core.adrive(pages, self._run)

    async def open_task(
        self, task_ref: str, ceiling: int | None, customer_id: str | None = None
    ) -> TaskStatus:
        """See :meth:`AgentBillClient.open_task`."""
        return await self._run(
            _core.plan_open_task(self._script_settings, task_ref, ceiling, customer_id)
        )

    async def get_task(self, task_ref: str, customer_id: str | None = None) -> TaskStatus:
        """See :meth:`AgentBillClient.get_task`."""
        return await self._run(_core.plan_get_task(self._script_settings, task_ref, customer_id))

    # -- lifecycle -----------------------------------------------------------------------------

    async def close(self) -> None:
        """See :meth:`AgentBillClient.close`."""
        await self._flusher.stop()
        if self._outage.has_queued:
            deadline = time.monotonic() + LAST_DELIVERY
            if await deliver_until_async(self.flush, deadline):
                warn_undelivered(self._outage.stats())
        if self._owns_redis:
            await self._redis.aclose()

    async def __aenter__(self) -> AsyncAgentBillClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _connect(settings: ClientSettings) -> tuple[aioredis.Redis, Heal | None]:
    return from_url(aioredis.Redis, aioredis.BlockingConnectionPool, settings)
