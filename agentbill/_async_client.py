"""AsyncAgentBillClient: AgentBillClient's twin on redis.asyncio, the same methods awaited."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

import redis
import redis.asyncio as aioredis

from agentbill import _core
from agentbill._check import ThresholdCrossing
from agentbill._client import (
    BaseClient,
    check_callback,
    from_url,
)
from agentbill._durability import WRITES, asend_on_nodes
from agentbill._exceptions import (
    AgentBillError,
    InvalidRequestError,
    StoreBusyError,
    StoreError,
    StoreUnavailableError,
)
from agentbill._gate import AsyncRun, Gate, Units
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
from agentbill._retry import Heal, translate
from agentbill._scripts import pipeline_args
from agentbill._telemetry import instrument

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

if TYPE_CHECKING:
    from genai_prices.types import ModelPrice

    from agentbill.llm import EstimateSpec

LLM = TypeVar("LLM")
REDIS_TYPES = (aioredis.Redis, aioredis.RedisCluster)
REDIS_TYPES_TEXT = "must be a redis.asyncio Redis or RedisCluster"


class AsyncAgentBillClient(BaseClient):
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
        on_threshold: Callable[[ThresholdCrossing], object] | None = None,
        metrics: bool | CollectorRegistry = False,
        metrics_customers: bool = False,
        trace_customers: bool = False,
    ) -> None:
        settings = _core.settings_from(
            api_key=api_key,
            ceiling=ceiling,
            redis_url=redis_url,
            namespace=namespace,
            reservation_ttl=reservation_ttl,
            idempotency_ttl=idempotency_ttl,
            outcome_retention=outcome_retention,
            task_retention=task_retention,
            idle_retention=idle_retention,
            reap_limit=reap_limit,
            connect_timeout=connect_timeout,
            socket_timeout=socket_timeout,
            retry_attempts=retry_attempts,
            retry_deadline=retry_deadline,
            max_connections=max_connections,
            on_outage=on_outage,
            outage_allowance=outage_allowance,
            ledger_max_len=ledger_max_len,
            background_settle=background_settle,
            durability=durability,
        )
        check_callback(on_threshold)
        owns, heal = redis is None, None
        if redis is None:
            redis, heal = _connect(settings)
        elif not isinstance(redis, REDIS_TYPES):
            raise InvalidRequestError("redis", REDIS_TYPES_TEXT)
        super().__init__(settings, redis, owns, on_threshold, heal)
        self._flusher = AsyncFlusher(self.flush)
        self._telemetry = instrument(self, metrics, metrics_customers, trace_customers)

    async def _send(self, plan: _core.Plan[_core.T]) -> _core.T:
        if self._wait is not None and plan.call.script in WRITES:
            # The script and WAIT in one pipelined round trip (see _durability).
            answer = (await self._send_batch([plan.call]))[0]
            if isinstance(answer, Exception):
                raise translate(answer) from answer
            return plan.decode(cast(_core.Reply, answer))
        script = self._scripts[plan.call.script]
        keys, args = plan.call.keys, plan.call.args
        try:
            reply = await self._retry.acall(lambda: script(keys=keys, args=args))
        except (redis.RedisError, OSError) as exc:
            raise translate(exc) from exc
        return plan.decode(reply)

    async def _run(self, plan: _core.Plan[_core.T]) -> _core.T:
        result = await self._send(plan)
        self._notify(result)
        if self._outage.due() and not self._settings.background_settle:
            await self.flush()
        return result

    async def _pipeline(self, commands: list[list[Any]]) -> tuple[list[object], list[object]]:
        """Each command's EVALSHA in one pipelined round trip (one per node on a cluster) and,
        with replicated durability, WAIT after them on the same connection: the answers in
        order, and WAIT's replies."""
        if self._wait is not None and isinstance(self._redis, aioredis.RedisCluster):
            return await asend_on_nodes(self._redis, commands, self._wait)
        pipe = self._redis.pipeline(transaction=False)
        for args in commands:
            pipe.execute_command("EVALSHA", *args)
        if self._wait is None:
            return list(await pipe.execute(raise_on_error=False)), []
        pipe.execute_command(*self._wait)
        answered = list(await pipe.execute(raise_on_error=False))
        return answered[:-1], answered[-1:]

    async def _send_batch(self, calls: list[_core.Call]) -> list[object]:
        """See :meth:`AgentBillClient._send_batch`."""
        replies: list[object] = [None] * len(calls)
        pending = list(range(len(calls)))

        async def attempt() -> list[object]:
            nonlocal pending
            for _ in range(2):
                commands = [
                    pipeline_args(self._scripts[calls[i].script], calls[i].keys, calls[i].args)
                    for i in pending
                ]
                answered, acks = await self._pipeline(commands)
                if self._wait is not None:
                    self._confirm(calls, answered, acks, pending, replies)
                missing = _core.take_answers(pending, answered, replies)
                for name in {calls[i].script for i in missing}:
                    await self._redis.script_load(self._scripts[name].script)
                pending = missing
                if not pending:
                    return replies
            raise StoreError("Redis answered NOSCRIPT right after the script was loaded")

        try:
            return await self._retry.acall(attempt)
        except (redis.RedisError, OSError) as exc:
            raise translate(exc) from exc

    async def _settle(
        self, plan: _core.Plan[Settlement], release: bool = False, surely: bool = False
    ) -> Settlement:
        if self._settings.background_settle:
            return self._settle_later(plan, release)
        try:
            settlement = await self._run(plan)
        except StoreUnavailableError as exc:
            return self._offline_settlement(plan, exc, release, surely)
        self._outage.settled(plan, release)
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
        if units is None:
            settlement = await self._settle(plan, release=True, surely=True)
            self._released(plan, settlement)
        else:
            settlement = await self._settle(plan, surely=True)
            self._recorded(plan, settlement)
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
        # Another thread (or the background) may be sending a batch: its outcome is waited
        # for, and what it puts back is tried here, so that 0 means every settlement queued
        # before this call is in Redis.
        wait_until = (
            time.monotonic() + self._settings.retry_deadline + 2 * self._settings.socket_timeout
        )
        while True:
            batch = self._outage.take()
            if not batch:
                if not self._outage.in_flight or time.monotonic() >= wait_until:
                    break
                await asyncio.sleep(0.01)
                continue
            try:
                replies = await self._send_batch([item.plan.call for item in batch])
            except StoreUnavailableError as exc:
                self._outage.put_back(batch, busy=isinstance(exc, StoreBusyError))
                break
            except AgentBillError as exc:
                self._undeliverable(batch, exc)
                break
            except BaseException:  # cancelled or interrupted: the batch stays queued
                self._outage.put_back(batch)
                raise
            if not self._delivered(batch, replies):
                break
        return self._outage.stats().queued

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

    def _plan_preflight(
        self,
        agent_id: object,
        estimated_units: object,
        customer_id: object = None,
        task_ref: object = None,
        task_ceiling: object = None,
        idempotency_key: object = None,
        ttl: object = None,
        adoptable: bool = True,
    ) -> _core.Plan[AsyncCheck]:
        """A validated preflight, not sent: the gate reads its reservation id first, so it can
        release it if the preflight is interrupted, whether or not Redis reserved."""
        return _core.plan_preflight(
            self._policy,
            agent_id,
            estimated_units,
            customer_id,
            task_ref,
            task_ceiling,
            idempotency_key,
            ttl,
            functools.partial(AsyncCheck, _client=self),
            adoptable=adoptable,
        )

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
        make = functools.partial(AsyncCheck, _client=self)
        plan = _core.plan_extend(self._policy, check, units, make)
        return (await self._run(plan)).raise_for_refusal()

    async def estimates(
        self, agent_id: str, customer_id: str | None = None, *, model: str | None = None
    ) -> Estimates:
        """See :meth:`AgentBillClient.estimates`."""
        return await self._run(_core.plan_estimates(self._policy, agent_id, customer_id, model))

    async def preflight_many(self, requests: Iterable[Preflight]) -> list[AsyncCheck]:
        """See :meth:`AgentBillClient.preflight_many`."""
        plans = _core.plan_preflight_many(
            self._policy, requests, functools.partial(AsyncCheck, _client=self)
        )
        if not plans:
            return []
        try:
            replies = await self._send_batch([plan.call for plan in plans])
        except StoreUnavailableError as exc:
            return [self._offline_check(plan, exc) for plan in plans]
        checks, failed = _core.decode_batch(plans, replies)
        if failed is not None:
            releases = self._batch_releases(checks)
            answers: list[object] | None = None
            try:
                answers = await self._send_batch([release.call for release in releases])
            except StoreUnavailableError:
                pass
            finally:
                self._queue_unanswered(releases, answers)
                index, error = failed
                raise _core.batch_error(index, translate(error)) from error
        for check in checks:
            self._notify(check)
            self._track(cast(AsyncCheck, check))
        if self._outage.has_queued:
            await self.flush()
        return cast(list[AsyncCheck], checks)

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
        plan = _core.plan_record(
            self._policy,
            agent_id,
            units,
            customer_id,
            reservation_id,
            task_ref,
            success,
            idempotency_key,
            metadata,
            self._own,
            offline_key=self._outage.offline_key,
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
        plan = _core.plan_release(self._policy, reservation_id, idempotency_key, customer_id)
        settlement = await self._settle(plan, release=True)
        self._released(plan, settlement)
        return settlement

    def gate(
        self,
        agent_id: str,
        estimated_units: int | Literal["learned"],
        customer_id: str | None = None,
        *,
        units: Units[Any] = None,
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
        _core.validate_gate(
            self._policy,
            agent_id,
            estimated_units,
            customer_id,
            task_ref,
            task_ceiling,
            ttl,
            charge_estimate=charge_estimate,
            bound=bound,
        )
        return AsyncRun(
            self,
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
                self._policy, customer_id, limit, period, tz, agent_id, thresholds
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
                self._policy, customer_id, units, per_seconds, burst, agent_id
            )
        )

    async def set_concurrency_limit(
        self, customer_id: str | None, max_in_flight: int | None, *, agent_id: str | None = None
    ) -> BudgetStatus:
        """See :meth:`AgentBillClient.set_concurrency_limit`."""
        return await self._run(
            _core.plan_set_concurrency_limit(self._policy, customer_id, max_in_flight, agent_id)
        )

    async def get_budget(
        self, customer_id: str | None = None, *, agent_id: str | None = None
    ) -> BudgetStatus:
        """See :meth:`AgentBillClient.get_budget`."""
        return await self._run(_core.plan_get_budget(self._policy, customer_id, agent_id))

    async def get_usage(self, customer_id: str | None = None, *, limit: int = 100) -> Usage:
        """See :meth:`AgentBillClient.get_usage`."""
        return await self._run(_core.plan_get_usage(self._policy, customer_id, limit))

    async def events(
        self, customer_id: str | None = None, *, since: str | None = None, limit: int | None = None
    ) -> list[Event]:
        """See :meth:`AgentBillClient.events`."""
        pages = _core.plan_events(self._policy, customer_id, since, limit)
        plan = next(pages)
        while True:
            try:
                plan = pages.send(await self._run(plan))
            except StopIteration as done:
                events: list[Event] = done.value
                return events

    async def open_task(
        self, task_ref: str, ceiling: int | None, customer_id: str | None = None
    ) -> TaskStatus:
        """See :meth:`AgentBillClient.open_task`."""
        return await self._run(_core.plan_open_task(self._policy, task_ref, ceiling, customer_id))

    async def get_task(self, task_ref: str, customer_id: str | None = None) -> TaskStatus:
        """See :meth:`AgentBillClient.get_task`."""
        return await self._run(_core.plan_get_task(self._policy, task_ref, customer_id))

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
