"""AgentBillClient: one script call per operation, over the logic in ``_core``.

``BaseClient`` holds what the sync and async clients share (settings, policy, properties); each
client method is: plan (validate + build the call, in ``_core``), one round trip, decode.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from agentbill import _core
from agentbill._exceptions import (
    AgentBillError,
    InvalidRequestError,
    StoreError,
    StoreUnavailableError,
)
from agentbill._gate import Gate, Run, Units
from agentbill._lease import AsyncLease, Lease
from agentbill._models import ClientSettings, LeaseRequest, Preflight, validate
from agentbill._outage import (
    Flusher,
    OutageLedger,
    OutageStats,
    warn_offline,
    warn_undelivered,
)
from agentbill._results import (
    BudgetStatus,
    Check,
    Event,
    Settlement,
    TaskStatus,
    ThresholdCrossing,
    Usage,
)
from agentbill._retry import RetryPolicy, translate
from agentbill._scripts import bind, pipeline_args
from agentbill._tenants import auth_options, check_url

if TYPE_CHECKING:
    from genai_prices.types import ModelPrice

    from agentbill.llm import EstimateSpec

ENV_REDIS_URL = "AGENTBILL_REDIS_URL"

logger = logging.getLogger("agentbill")

L = TypeVar("L", Lease, AsyncLease)
LLM = TypeVar("LLM")
LEASE_FIELDS = ("agent_id", "customer_id", "slice_units", "task_ref", "ttl")


def connection_url(settings: ClientSettings) -> str:
    """``redis_url``, else ``$AGENTBILL_REDIS_URL``, else the embedded local server.

    With a tenant key, InvalidRequestError when that is the embedded server (it has no tenants)
    or a URL holding credentials of its own.
    """
    url = settings.redis_url or os.environ.get(ENV_REDIS_URL) or None
    check_url(settings, url)
    if url is not None:
        return url
    from agentbill._local import ensure_local_server

    return ensure_local_server()


def connection_options(settings: ClientSettings) -> dict[str, Any]:
    """What every connection the client builds gets: bounded timeouts, no redis-py retries,
    and the tenant key's username and password if ``api_key`` is one."""
    return {
        "socket_connect_timeout": settings.connect_timeout,
        "socket_timeout": settings.socket_timeout,
        # agentbill's own retry policy (_retry.py) is the only retry layer.
        "retry": Retry(NoBackoff(), 0),
        "retry_on_timeout": False,
        "health_check_interval": 0,
        **auth_options(settings),
    }


class BaseClient:
    """What both clients share: validated settings, the policy the scripts take, the scripts."""

    def __init__(
        self,
        settings: ClientSettings,
        client: Any,
        owns_client: bool,
        on_threshold: Callable[[ThresholdCrossing], object] | None = None,
    ) -> None:
        self._settings = settings
        self._policy = _core.Policy.from_settings(settings)
        self._redis: Any = client
        self._owns_redis = owns_client
        self._scripts = bind(client)
        self._outage = OutageLedger(settings.on_outage, settings.outage_allowance)
        self._on_threshold = on_threshold

    def _notify(self, result: object) -> None:
        """Pass the thresholds a call crossed to ``on_threshold``; its errors are logged, never
        raised into the run (the decision stands either way)."""
        if self._on_threshold is None:
            return
        for crossing in getattr(result, "crossed", ()):
            try:
                self._on_threshold(crossing)
            except Exception:
                logger.exception("agentbill: on_threshold raised for %r", crossing)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(namespace={self.namespace!r}, ceiling={self.ceiling!r})"

    @property
    def namespace(self) -> str:
        return self._settings.namespace

    @property
    def ceiling(self) -> int | None:
        return self._settings.ceiling

    @property
    def outage_stats(self) -> OutageStats:
        """What this process approved offline and queued while Redis was unreachable."""
        return self._outage.stats()

    def _offline_check(self, plan: _core.Plan[_core.T], exc: StoreUnavailableError) -> _core.T:
        """The preflight's decision when Redis cannot answer: the outage policy's, or ``exc``."""
        if plan.offline is None or self._outage.fails_closed:
            raise exc
        check: Any = plan.offline()
        if check.approved:
            if not self._outage.approve(check.reservation_id, check.estimated_units):
                raise exc
            warn_offline(check, self._outage.mode, exc)
        return cast(_core.T, check)

    def _offline_settlement(
        self, plan: _core.Plan[Settlement], exc: StoreUnavailableError, release: bool
    ) -> Settlement:
        """A record/release Redis cannot take now: queued by the outage policy, or ``exc``."""
        if self._outage.fails_closed:
            raise exc
        rid = plan.reservation_id
        if release and self._outage.is_offline(rid):
            self._outage.settled(rid)  # Redis never held it: nothing to tell it
            return _core.queued_settlement(rid, "released")
        self._outage.enqueue(plan, rid)
        return _core.queued_settlement(rid)

    def _batch_releases(self, checks: list[Any]) -> list[_core.Call]:
        """Calls releasing what this batch itself approved (not replays of earlier calls)."""
        return [
            _core.plan_release(self._policy, c.reservation_id, None, None).call
            for c in checks
            if c is not None and c.approved and not c.replayed and not c.offline
        ]

    def _delivered(self, batch: list[Any], replies: list[object]) -> None:
        """Account for a delivered batch of queued settlements, item by item."""
        for item, reply in zip(batch, replies, strict=True):
            if isinstance(reply, Exception):
                self._outage.dropped(item, translate(reply))
                continue
            self._notify(item.plan.decode(reply))
            self._outage.delivered(item)

    def _lease(self, cls: type[L], *args: object) -> L:
        """``cls`` (Lease or AsyncLease) for validated lease arguments."""
        req = validate(LeaseRequest, **dict(zip(LEASE_FIELDS, args, strict=True)))
        client: Any = self  # the client whose twin cls is
        return cls(
            client,
            req.agent_id,
            req.customer_id,
            slice_units=req.slice_units,
            task_ref=req.task_ref,
            ttl=req.ttl,
        )

    def _gate(self, **kwargs: Any) -> Gate:
        _core.validate_gate(
            self._policy,
            kwargs["agent_id"],
            kwargs["estimated_units"],
            kwargs["customer_id"],
            kwargs["task_ref"],
            kwargs["task_ceiling"],
            kwargs["ttl"],
            units=kwargs["units"],
        )
        return Gate(self, **kwargs)


REDIS_TYPES = (redis.Redis, RedisCluster)
REDIS_TYPES_TEXT = "must be a redis.Redis or redis.cluster.RedisCluster (not a URL: use redis_url)"


def check_callback(on_threshold: object) -> None:
    """``on_threshold`` is None or callable: checked before anything connects."""
    if on_threshold is not None and not callable(on_threshold):
        raise InvalidRequestError("on_threshold", "must be a callable of ThresholdCrossing")


def from_url(factory: Callable[..., Any], settings: ClientSettings) -> Any:
    """``factory(url, ...)`` for the connection URL; a URL redis-py cannot use is an
    InvalidRequestError naming redis_url (never quoting it: it may hold a password)."""
    url = connection_url(settings)
    try:
        return factory(url, **connection_options(settings))
    except ValueError:
        raise InvalidRequestError(
            "redis_url", "is not a Redis URL redis-py can use (redis://, rediss:// or unix://)"
        ) from None


class AgentBillClient(BaseClient):
    """Budget enforcement for agent runs, against a Redis shared by every worker.

    Connects to ``redis`` (a ready ``redis.Redis`` or ``RedisCluster``) if given, else
    ``redis_url``, else the ``AGENTBILL_REDIS_URL`` environment variable, else an embedded local
    server shared by every process on this machine. ``ceiling`` caps the estimate of any single
    run; ``namespace`` prefixes every key, so clients with different namespaces never see each
    other's data. ``on_outage`` decides what a preflight does when Redis cannot answer:
    ``"fail_closed"`` raises StoreUnavailableError; ``"fail_open"`` approves offline;
    ``"allowance"`` approves offline up to ``outage_allowance`` units held by this process.
    Offline runs' settlements are queued and delivered once Redis answers (see ``flush``).
    ``background_settle``: ``record`` and ``release`` queue their call and return at once
    (status ``queued``); a background thread delivers the queue in pipelined batches, and
    ``close()`` (or leaving the ``with`` block) delivers what is left.

    Raises InvalidRequestError for bad settings, StoreUnavailableError when the embedded server
    cannot be started.
    """

    def __init__(
        self,
        api_key: str | None = None,
        ceiling: int | None = None,
        *,
        redis_url: str | None = None,
        redis: redis.Redis | RedisCluster | None = None,
        namespace: str = "agentbill",
        reservation_ttl: int = 3600,
        idempotency_ttl: int = 24 * 3600,
        outcome_retention: int = 24 * 3600,
        reap_limit: int = 100,
        connect_timeout: float = 0.5,
        socket_timeout: float = 1.0,
        retry_attempts: int = 3,
        retry_deadline: float = 1.0,
        on_outage: Literal["fail_closed", "fail_open", "allowance"] = "fail_closed",
        outage_allowance: int | None = None,
        ledger_max_len: int = 100_000,
        background_settle: bool = False,
        on_threshold: Callable[[ThresholdCrossing], object] | None = None,
    ) -> None:
        settings = _core.settings_from(
            api_key=api_key,
            ceiling=ceiling,
            redis_url=redis_url,
            namespace=namespace,
            reservation_ttl=reservation_ttl,
            idempotency_ttl=idempotency_ttl,
            outcome_retention=outcome_retention,
            reap_limit=reap_limit,
            connect_timeout=connect_timeout,
            socket_timeout=socket_timeout,
            retry_attempts=retry_attempts,
            retry_deadline=retry_deadline,
            on_outage=on_outage,
            outage_allowance=outage_allowance,
            ledger_max_len=ledger_max_len,
            background_settle=background_settle,
        )
        check_callback(on_threshold)
        owns = redis is None
        if redis is None:
            redis = _connect(settings)
        elif not isinstance(redis, REDIS_TYPES):
            raise InvalidRequestError("redis", REDIS_TYPES_TEXT)
        super().__init__(settings, redis, owns, on_threshold)
        self._retry = RetryPolicy(settings.retry_attempts, settings.retry_deadline)
        self._flusher = Flusher(self.flush)

    def _send(self, plan: _core.Plan[_core.T]) -> _core.T:
        script = self._scripts[plan.call.script]
        keys, args = plan.call.keys, plan.call.args
        try:
            reply = self._retry.call(lambda: script(keys=keys, args=args))
        except (redis.RedisError, OSError) as exc:
            raise translate(exc) from exc
        return plan.decode(reply)

    def _run(self, plan: _core.Plan[_core.T]) -> _core.T:
        """One round trip; then, if an outage left settlements queued, deliver them."""
        result = self._send(plan)
        self._notify(result)
        if self._outage.has_queued and not self._settings.background_settle:
            self.flush()
        return result

    def _send_batch(self, calls: list[_core.Call]) -> list[object]:
        """Every call in one pipelined round trip (each script call atomic on its own); the
        replies in order, an item Redis refused as its exception. Items answered NOSCRIPT are
        sent again once their script is loaded; a retry after a transport error resends only
        unanswered items, which carry their request ids, so none lands twice."""
        replies: list[object] = [None] * len(calls)
        pending = list(range(len(calls)))

        def attempt() -> list[object]:
            nonlocal pending
            for _ in range(2):
                pipe = self._redis.pipeline(transaction=False)
                for i in pending:
                    c = calls[i]
                    args = pipeline_args(self._scripts[c.script], c.keys, c.args)
                    pipe.execute_command("EVALSHA", *args)
                answered = pipe.execute(raise_on_error=False)
                missing = _core.take_answers(pending, answered, replies)
                for name in {calls[i].script for i in missing}:
                    self._redis.script_load(self._scripts[name].script)
                pending = missing
                if not pending:
                    return replies
            raise StoreError("Redis answered NOSCRIPT right after the script was loaded")

        try:
            return self._retry.call(attempt)
        except (redis.RedisError, OSError) as exc:
            raise translate(exc) from exc

    def _settle(self, plan: _core.Plan[Settlement], release: bool = False) -> Settlement:
        if self._settings.background_settle:
            self._outage.enqueue(plan, plan.reservation_id)
            self._flusher.wake()
            return _core.queued_settlement(plan.reservation_id)
        try:
            settlement = self._run(plan)
        except StoreUnavailableError as exc:
            return self._offline_settlement(plan, exc, release)
        self._outage.settled(plan.reservation_id)
        return settlement

    def flush(self) -> int:
        """Deliver the queued settlements (an outage's, or all of them with
        ``background_settle``), oldest first, in pipelined batches, each exactly once (it keeps
        its request id). Runs by itself after every successful round trip (with
        ``background_settle``, in the background). Returns how many are still queued (Redis
        still unreachable)."""
        while batch := self._outage.take():
            try:
                replies = self._send_batch([item.plan.call for item in batch])
            except StoreUnavailableError:
                self._outage.put_back(batch)
                break
            except AgentBillError as exc:
                for item in batch:
                    self._outage.dropped(item, exc)
                continue
            except BaseException:  # cancelled or interrupted: the batch stays queued
                self._outage.put_back(batch)
                raise
            self._delivered(batch, replies)
        else:
            # Another thread (or the background) may be sending a batch: wait for its outcome,
            # so that 0 means every settlement queued before this call is in Redis.
            deadline = (
                time.monotonic() + self._settings.retry_deadline + 2 * self._settings.socket_timeout
            )
            while self._outage.in_flight and time.monotonic() < deadline:
                time.sleep(0.01)
        return self._outage.stats().queued

    # -- runs ----------------------------------------------------------------------------------

    def preflight(
        self,
        agent_id: str,
        estimated_units: int,
        customer_id: str | None = None,
        *,
        task_ref: str | None = None,
        task_ceiling: int | None = None,
        idempotency_key: str | None = None,
        ttl: int | None = None,
    ) -> Check:
        """Check every rule and, only if all pass, reserve ``estimated_units``. One atomic call.

        Returns a Check; a refusal is returned (``approved`` False, ``reason`` set), not raised.
        ``customer_id`` None is the customer named "default". ``task_ceiling`` opens an unknown
        ``task_ref`` with that ceiling; for a known task it is ignored. ``ttl`` (seconds,
        default ``reservation_ttl``) is how long an unsettled reservation holds its units.
        The same ``idempotency_key`` with the same arguments returns the first approval.

        Raises InvalidRequestError (nothing written), StoreUnavailableError (nothing approved).
        """
        plan = _core.plan_preflight(
            self._policy,
            agent_id,
            estimated_units,
            customer_id,
            task_ref,
            task_ceiling,
            idempotency_key,
            ttl,
            functools.partial(Check, _client=self),
        )
        try:
            return self._run(plan)
        except StoreUnavailableError as exc:
            return self._offline_check(plan, exc)

    def preflight_many(self, requests: Iterable[Preflight]) -> list[Check]:
        """Many preflights in one round trip: one Check per ``Preflight`` in order, each decided
        atomically on its own, exactly as ``preflight`` would (a batch is not atomic as a
        whole: items are decided in order, and other workers' calls may land in between).

        Raises InvalidRequestError naming ``requests[i].<field>`` (nothing sent) for bad input;
        if Redis refuses an item (an idempotency key reused with other arguments), what the
        batch approved is released and that item's error raised. StoreUnavailableError: the
        outage policy decides each item, as for ``preflight``.
        """
        plans = _core.plan_preflight_many(
            self._policy, requests, functools.partial(Check, _client=self)
        )
        if not plans:
            return []
        try:
            replies = self._send_batch([plan.call for plan in plans])
        except StoreUnavailableError as exc:
            return [self._offline_check(plan, exc) for plan in plans]
        checks, failed = _core.decode_batch(plans, replies)
        if failed is not None:
            try:
                self._send_batch(self._batch_releases(checks))
            finally:
                index, error = failed
                raise _core.batch_error(index, translate(error)) from error
        for check in checks:
            self._notify(check)
        if self._outage.has_queued:
            self.flush()
        return cast(list[Check], checks)

    def lease(
        self,
        agent_id: str,
        customer_id: str | None = None,
        *,
        slice_units: int,
        task_ref: str | None = None,
        ttl: int = 60,
    ) -> Lease:
        """Reserve slices of the budget and decide runs locally: ``lease.preflight(units)`` costs
        no round trip while the current slice (``slice_units``, at most half of what the budget
        has left, never less than the ask) has room; ``run.record(units)`` is local; slices are
        settled with what their runs used. A slice is an ordinary reservation, so overspend
        stays exactly zero; the cost is that a slice held here is unavailable to other
        workers until it is settled. ``ttl`` is each slice's. Use it as a context manager (or
        call ``close()``)."""
        return self._lease(Lease, agent_id, customer_id, slice_units, task_ref, ttl)

    def record(
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
        """Record the units a run actually used.

        With ``reservation_id``: close that reservation, charging ``units`` in full (even above
        the estimate) and releasing the whole estimate. Without it: close the oldest open
        reservation of (customer, agent, task_ref), or charge ``units`` directly if none is
        open. ``success=False`` releases without charging. Closing twice charges once.

        Raises InvalidRequestError (nothing written), StoreUnavailableError.
        """
        return self._settle(
            _core.plan_record(
                self._policy,
                agent_id,
                units,
                customer_id,
                reservation_id,
                task_ref,
                success,
                idempotency_key,
                metadata,
            )
        )

    def release(
        self,
        reservation_id: str | None = None,
        *,
        idempotency_key: str | None = None,
        customer_id: str | None = None,
    ) -> Settlement:
        """Close a reservation without charging: its units return to every scope at once.

        Name it by ``reservation_id``, or by the ``idempotency_key`` of the preflight that made
        it (with that preflight's ``customer_id``): this works from any process, and also when
        the preflight's reply never arrived. Status ``noop`` when that preflight reserved
        nothing; releasing twice releases once.

        Raises InvalidRequestError (neither or both given), StoreUnavailableError.
        """
        return self._settle(
            _core.plan_release(self._policy, reservation_id, idempotency_key, customer_id),
            release=True,
        )

    def gate(
        self,
        agent_id: str,
        estimated_units: int,
        customer_id: str | None = None,
        *,
        units: Units[Any] = None,
        task_ref: str | None = None,
        task_ceiling: int | None = None,
        ttl: int | None = None,
    ) -> Gate:
        """Decorate a function (``def`` or ``async def``) so every call is preflighted first.

        On refusal the body does not run and the typed RunBlockedError is raised. After the body
        returns, ``units`` is recorded: an int, a callable of the result, or by default the
        estimate. If the body raises anything (KeyboardInterrupt and cancellation too), the
        reservation is released and the exception re-raised. Bad arguments raise
        InvalidRequestError when decorating.
        """
        return self._gate(
            agent_id=agent_id,
            estimated_units=estimated_units,
            customer_id=customer_id,
            units=units,
            task_ref=task_ref,
            task_ceiling=task_ceiling,
            ttl=ttl,
        )

    def run(
        self,
        agent_id: str,
        estimated_units: int,
        customer_id: str | None = None,
        *,
        task_ref: str | None = None,
        task_ceiling: int | None = None,
        ttl: int | None = None,
        charge_estimate: bool = False,
    ) -> Run:
        """A gated block: ``with client.run(...) as run: ...; run.record(units)``.

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
        )
        return Run(
            self,
            charge_estimate,
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
        """A copy of ``llm_client`` (``OpenAI`` or ``Anthropic``; the async ones go to
        AsyncAgentBillClient) whose model calls are preflighted before the HTTP request and
        recorded from the response's usage after it; see ``agentbill.llm``. ``unit``: tokens,
        or micro-dollars priced by genai-prices (``prices`` adds or overrides a model's price).
        ``estimate``: ``"bound"`` (the most the call can cost), an int, or a callable of
        ``agentbill.llm.LLMRequest``. A refusal raises the typed RunBlockedError and sends
        nothing; a call that raises is released.

        Raises InvalidRequestError naming the bad argument (a sync/async mismatch names
        ``llm_client``)."""
        from agentbill.llm._wrap import wrap_sync

        return wrap_sync(
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

    def set_budget(
        self,
        customer_id: str | None,
        limit: int | None,
        *,
        period: Literal["hour", "day", "week", "month"] | None = None,
        tz: str = "UTC",
        agent_id: str | None = None,
        thresholds: Sequence[int] = (),
    ) -> BudgetStatus:
        """Set the budget of the customer, or with ``agent_id`` of that agent within it
        (``limit`` None: unlimited). ``period``: None for a lifetime budget, else a calendar
        hour, day, week (ISO, from Monday) or month in time zone ``tz`` (IANA), after which a
        fresh budget starts by itself. ``thresholds``: percents of the limit whose crossing (by
        spent + reserved) is written to the ledger and passed to ``on_threshold``, once per
        period. Lowering a limit below what is spent and reserved only refuses new runs.
        Returns that scope's status."""
        return self._run(
            _core.plan_set_budget(
                self._policy, customer_id, limit, period, tz, agent_id, thresholds
            )
        )

    def set_rate_limit(
        self,
        customer_id: str | None,
        units: int | None,
        per_seconds: int | None,
        *,
        burst: int | None = None,
        agent_id: str | None = None,
    ) -> BudgetStatus:
        """Limit the customer (or with ``agent_id`` that agent) to ``units`` per
        ``per_seconds`` sustained, in bursts of up to ``burst`` units (default ``units``):
        GCRA on the estimates preflights reserve; a refused preflight consumes nothing.
        ``units`` None removes the limit."""
        return self._run(
            _core.plan_set_rate_limit(
                self._policy, customer_id, units, per_seconds, burst, agent_id
            )
        )

    def set_concurrency_limit(
        self, customer_id: str | None, max_in_flight: int | None, *, agent_id: str | None = None
    ) -> BudgetStatus:
        """At most ``max_in_flight`` open reservations (runs in flight) for the customer, or
        with ``agent_id`` for that agent; None removes the limit."""
        return self._run(
            _core.plan_set_concurrency_limit(self._policy, customer_id, max_in_flight, agent_id)
        )

    def get_budget(
        self, customer_id: str | None = None, *, agent_id: str | None = None
    ) -> BudgetStatus:
        """The budget of the customer (or of one agent) in its current period: limit, spent,
        reserved, remaining, open reservations, the period's bounds and the other limits."""
        return self._run(_core.plan_get_budget(self._policy, customer_id, agent_id))

    def get_usage(self, customer_id: str | None = None) -> Usage:
        """The customer's budget and each of its agents', in one round trip."""
        return self._run(_core.plan_get_usage(self._policy, customer_id))

    def events(
        self, customer_id: str | None = None, *, since: str | None = None, limit: int | None = None
    ) -> list[Event]:
        """The customer's ledger, oldest first: after the event whose ``id`` is ``since``, at
        most ``limit`` of them. The ledger keeps the last ``ledger_max_len`` (about)."""
        return self._run(_core.plan_events(self._policy, customer_id, since, limit))

    def open_task(
        self, task_ref: str, ceiling: int | None, customer_id: str | None = None
    ) -> TaskStatus:
        """Open a task of the customer with a ceiling (``None``: no ceiling), or change it."""
        return self._run(_core.plan_open_task(self._policy, task_ref, ceiling, customer_id))

    def get_task(self, task_ref: str, customer_id: str | None = None) -> TaskStatus:
        """The task's ceiling, used, reserved and remaining (``exists`` False if never seen)."""
        return self._run(_core.plan_get_task(self._policy, task_ref, customer_id))

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Deliver what an outage left queued, if Redis answers, then close the connections
        this client opened (not a ``redis=`` client you passed in)."""
        self._flusher.stop()
        if self._outage.has_queued and self.flush():
            warn_undelivered(self._outage.stats())
        if self._owns_redis:
            self._redis.close()

    def __enter__(self) -> AgentBillClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _connect(settings: ClientSettings) -> redis.Redis:
    client: redis.Redis = from_url(redis.Redis.from_url, settings)
    return client
