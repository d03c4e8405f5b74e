"""AgentBillClient: one script call per operation, over the logic in ``_core``.

``BaseClient`` holds what the sync and async clients share (settings, properties, every step
that is not I/O); each client method is: plan (validate + build the call, in ``_core``), one
round trip, decode.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar, cast

import redis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import MovedError
from redis.retry import Retry

from agentbill import _core, _scripts, _topology
from agentbill._check import BaseCheck, ThresholdCrossing
from agentbill._durability import (
    WRITES,
    ReplicaTimeout,
    check_acked,
    send_on_nodes,
    wait_command,
)
from agentbill._exceptions import (
    AgentBillError,
    InvalidRequestError,
    LibraryNotLoadedError,
    StoreBusyError,
    StoreUnavailableError,
)
from agentbill._gate import AsyncRun, Gate, GateClient, Run, UnitsUsed
from agentbill._lease import AsyncLease, Lease
from agentbill._models import ClientSettings, LeaseRequest, Preflight, validate
from agentbill._outage import (
    LAST_DELIVERY,
    AsyncFlusher,
    Flusher,
    OutageLedger,
    OutageStats,
    Queued,
    deliver_at_exit,
    deliver_until,
    idempotency_record,
    warn_offline,
    warn_queued,
    warn_undelivered,
)
from agentbill._own import OwnReservations
from agentbill._results import (
    BudgetStatus,
    Check,
    Estimates,
    Event,
    Settlement,
    TaskStatus,
    Usage,
)
from agentbill._retry import Heal, RetryPolicy, is_transient, translate, translated
from agentbill._scripts import FUNCTION_MISSING, LibraryRemoved
from agentbill._telemetry import OFF, Telemetry, instrument
from agentbill._tenants import auth_options, check_url

if TYPE_CHECKING:
    from genai_prices.types import ModelPrice
    from prometheus_client import CollectorRegistry

    from agentbill.llm import EstimateSpec

ENV_REDIS_URL = "AGENTBILL_REDIS_URL"


# What a record or release may meet having run nothing, and land later: Redis unreachable,
# silent or "not now", or agentbill's library missing where this client may not load it (a
# tenant key, until an operator loads it). See ``_offline_settlement``.
UNSETTLED = (StoreUnavailableError, LibraryNotLoadedError)

logger = logging.getLogger("agentbill")

L = TypeVar("L", Lease, AsyncLease)
B = TypeVar("B", Run, AsyncRun)
C = TypeVar("C", bound=BaseCheck)  # Check or AsyncCheck
LLM = TypeVar("LLM")
LEASE_FIELDS = ("agent_id", "customer_id", "slice_units", "task_ref", "ttl")


# -- what the base's dialogues ask a client to do (see _core.drive) -------------------------------


@dataclass(frozen=True, slots=True)
class SendBatch:
    """Send these calls in one pipelined round trip (``_send_batch``); the answer: the replies."""

    calls: list[_core.Call]


@dataclass(frozen=True, slots=True)
class Pipeline:
    """One attempt's FCALLs (``_pipeline``), ``wait``: followed by WAIT (they write, with
    replicated durability); the answer: (the answers, WAIT's replies)."""

    commands: list[list[Any]]
    wait: bool


@dataclass(frozen=True, slots=True)
class LoadLibrary:
    """Load agentbill's Functions library, which Redis answered "Function not found" for
    (:func:`_topology.load_library`)."""


@dataclass(frozen=True, slots=True)
class Flush:
    """Deliver the queued settlements (``flush``)."""


@dataclass(frozen=True, slots=True)
class Pause:
    """Sleep (the async client: without blocking its loop)."""

    seconds: float


Ask = SendBatch | Pipeline | LoadLibrary | Flush | Pause


@dataclass(slots=True)
class Batch:
    """A batch on its way (see ``_send_batch``): each call's reply so far, and the items still
    owed one. It outlives an attempt: a retry resends only the items still pending."""

    calls: list[_core.Call]
    replies: list[object]
    pending: list[int]

    @classmethod
    def of(cls, calls: list[_core.Call]) -> Batch:
        return cls(calls, [None] * len(calls), list(range(len(calls))))


def connection_url(settings: ClientSettings) -> tuple[str, Heal | None]:
    """``redis_url``, else ``$AGENTBILL_REDIS_URL``, else the embedded local server; with it,
    for the embedded server, what starts that server again should it die.

    With a tenant key, InvalidRequestError when that is the embedded server (it has no tenants)
    or a URL holding credentials of its own.
    """
    url = settings.redis_url or os.environ.get(ENV_REDIS_URL) or None
    check_url(settings, url)
    if url is not None:
        return url, None
    from agentbill._local import ensure_local_server, local_reviver

    return ensure_local_server(), local_reviver()


def connection_options(settings: ClientSettings) -> dict[str, Any]:
    """What every connection the client builds gets: bounded timeouts, no redis-py retries,
    a bounded pool that makes a call wait for a free connection rather than fail (never more
    than ``max_connections``: the client's own slots keep within it), and the tenant key's
    username and password if ``api_key`` is one."""
    return {
        "max_connections": settings.max_connections,
        "timeout": None,  # BlockingConnectionPool: wait for a connection as long as it takes
        "socket_connect_timeout": settings.connect_timeout,
        "socket_timeout": settings.socket_timeout,
        # agentbill's own retry policy (_retry.py) is the only retry layer.
        "retry": Retry(NoBackoff(), 0),
        "retry_on_timeout": False,
        "health_check_interval": 0,
        **auth_options(settings),
    }


class BaseClient(Generic[C]):
    """What both clients share: validated settings (and ``ScriptSettings``, the same in the
    units the scripts take), the scripts, and every step of an operation that is not I/O. An
    operation that needs Redis midway (a batch, ``flush``) is a dialogue here (see
    ``_core.drive``); each client's ``_answer`` does what it asks, called or awaited."""

    _make_check: Callable[..., C]
    """Check or AsyncCheck, bound to the client."""

    def __init__(
        self,
        settings: ClientSettings,
        client: Any,
        owns_client: bool,
        on_threshold: Callable[[ThresholdCrossing], object] | None = None,
        heal: Heal | None = None,
    ) -> None:
        self._settings = settings
        self._script_settings = _core.ScriptSettings.from_settings(settings)
        self._redis: Any = client
        self._owns_redis = owns_client
        self._library = _scripts.installed()
        if isinstance(client, CLUSTER_TYPES):
            _topology.route_functions(client)
        self._outage = OutageLedger(settings.on_outage, settings.outage_allowance)
        self._flusher: Flusher | AsyncFlusher
        deliver_at_exit(self)
        self._on_threshold = on_threshold
        self._own = OwnReservations()
        self._telemetry: Telemetry = OFF
        self._wait = wait_command(
            settings.durability, settings.durability_replicas, settings.socket_timeout
        )
        self._retry = RetryPolicy(
            settings.retry_attempts,
            settings.retry_deadline,
            connections=settings.max_connections,
            # Redis silent for half a socket timeout while a call of ours timed out: down.
            quiet=settings.socket_timeout / 2,
            # One Cluster node can be down while the others answer: no client-wide verdict.
            watch_health=not isinstance(client, CLUSTER_TYPES),
            heal=heal,
        )

    def _open(
        self,
        arguments: dict[str, Any],
        redis_types: tuple[type, ...],
        redis_types_text: str,
        connect: Callable[[ClientSettings], tuple[Any, Heal | None]],
    ) -> None:
        """What a client's constructor does with its ``arguments`` (its ``locals()``): validate
        the settings (the arguments ClientSettings declares), check the callback, connect (or
        check the ``redis`` client given); then :meth:`__init__`."""
        settings = _core.settings_from(
            **{name: arguments[name] for name in ClientSettings.model_fields}
        )
        on_threshold = arguments["on_threshold"]
        check_callback(on_threshold)
        client, heal = arguments["redis"], None
        owns = client is None
        if client is None:
            client, heal = connect(settings)
        elif not isinstance(client, redis_types):
            raise InvalidRequestError("redis", redis_types_text)
        BaseClient.__init__(self, settings, client, owns, on_threshold, heal)

    def _instrument(self, arguments: dict[str, Any]) -> None:
        """The telemetry the constructor's ``arguments`` ask for: its last step."""
        self._telemetry = instrument(
            self,
            arguments["metrics"],
            arguments["metrics_customers"],
            arguments["trace_customers"],
        )

    def _confirm(
        self,
        calls: list[_core.Call],
        answered: list[object],
        acks: list[object],
        pending: list[int],
        replies: list[object],
    ) -> None:
        """Unless WAIT's replies (``acks``) say the replicas have the writes, raise ReplicaTimeout
        with every item left to send again (same request ids: safe). A lone call's "not now"
        reply is raised too, for the retry policy to try again, as it would a call sent
        alone."""
        if len(calls) == 1 and is_transient(cast(Exception, answered[0])):
            raise cast(Exception, answered[0])
        try:
            for acked in acks:
                check_acked(acked, self._settings.durability_replicas)
        except ReplicaTimeout:
            pending[:] = range(len(calls))
            replies[:] = [None] * len(calls)
            raise

    def _approved(self, plan: _core.Plan[Any], check: BaseCheck, track: bool) -> None:
        """What the client remembers of a decision Redis made: its own reservations (for
        records without an id) and approvals under an idempotency key (for offline repeats)."""
        if check.approved:
            self._outage.remember_keyed(plan.idempotency, check)
            if track:
                self._track(check)

    def _recorded(self, plan: _core.Plan[Settlement], settlement: Settlement) -> None:
        """After a record was made (one that raised closed nothing): the reservations it closed
        are no longer this client's to close."""
        self._own.discard(plan.reservation_id or plan.prefer)
        self._own.discard(settlement.reservation_id)

    def _released(self, plan: _core.Plan[Settlement], settlement: Settlement) -> None:
        """After a release was made: the reservation is no longer this client's to close, and
        its idempotency key reserves afresh (offline too)."""
        for rid in (plan.reservation_id, settlement.reservation_id):
            self._own.discard(rid)
            self._outage.forget_keyed(rid)
        if plan.idempotency is not None:
            self._outage.forget_keyed(None, plan.idempotency[0])

    def _track(self, check: BaseCheck) -> None:
        """Remember an approval, so this client's records without an id close its own
        reservations first (see ``_own``). An offline one too: such a record then closes it
        (and frees its share of an outage allowance), or, if its preflight reached Redis after
        all, the reservation that made."""
        if check.approved and check.reservation_id is not None:
            group = (check.customer_id, check.agent_id, check.task_ref)
            self._own.add(group, check.reservation_id, check.expires_at)

    def _notify(self, result: object) -> None:
        """Count a result Redis decided in the metrics, and pass the thresholds it crossed to
        ``on_threshold``; its errors are logged, never raised into the run (the decision stands
        either way)."""
        self._telemetry.observe(result)
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

    def _offline_check(
        self, plan: _core.Plan[_core.T], exc: StoreUnavailableError, owned: bool = False
    ) -> _core.T:
        """The preflight's decision when Redis cannot answer: the outage policy's, or ``exc``
        (always when Redis answered "not now": busy is not an outage). ``owned``: see
        :meth:`_release_in_doubt`."""
        if plan.offline is None or self._outage.fails_closed or isinstance(exc, StoreBusyError):
            if owned and not isinstance(exc, StoreBusyError):
                self._release_in_doubt(plan)
            raise exc
        prior = self._outage.keyed(plan.idempotency)
        if prior is not None:  # the same key again: one reservation, as Redis would answer
            return cast(_core.T, dataclasses.replace(prior, replayed=True))
        check: Any = plan.offline()
        if check.approved:
            key = idempotency_record(plan)
            if not self._outage.approve(check.reservation_id, check.estimated_units, key):
                raise exc
            self._outage.remember_keyed(plan.idempotency, check)
            warn_offline(check, self._outage.mode, exc)
            if not owned:
                self._track(check)
        self._telemetry.observe(check)
        return cast(_core.T, check)

    def _release_in_doubt(self, plan: _core.Plan[Any]) -> None:
        """A reservation made on a caller's behalf (a gate, a run block, a lease's slice, a
        wrapped LLM call), whose id that caller never sees, failed in doubt: Redis was
        unreachable or silent, and may yet run the preflight (a paused server runs what sat in
        its socket buffer when it wakes). Its release by id is queued for the background
        delivery, so such a reservation never holds its units until its TTL; a release that
        arrives before its preflight is remembered, and the preflight then reserves nothing.
        Not when Redis answered "not now" (busy): nothing was written."""
        if plan.reservation_id is not None:
            release = _core.plan_release(self._script_settings, plan.reservation_id, None, None)
            self._settle_later(release, release=True)

    def _offline_settlement(
        self,
        plan: _core.Plan[Settlement],
        exc: StoreUnavailableError | LibraryNotLoadedError,
        release: bool,
        surely: bool = False,
    ) -> Settlement:
        """A record/release Redis cannot take now: queued by the outage policy (an offline
        run's release too: its preflight may have reached Redis), or ``exc`` (always when Redis
        answered "not now", or lacks the library this client may not load). ``surely`` (a
        settlement no caller can make again, see ``_settle_surely``): queued whatever the
        outage policy (a warning says so where it would have raised), and delivered in the
        background: one that lacks the library ran nothing and lands once an operator loads
        it (the queue keeps it meanwhile, see ``_undeliverable``)."""
        refused = self._outage.fails_closed or isinstance(
            exc, StoreBusyError | LibraryNotLoadedError
        )
        if surely:
            if refused:
                warn_queued(plan, release, exc)
            return self._settle_later(plan, release)
        if refused:
            raise exc
        self._outage.enqueue(plan, release)
        return _core.queued_settlement(plan.reservation_id)

    def _plan_close(
        self,
        reservation_id: str,
        units: int | None,
        agent_id: str,
        customer_id: str | None,
        task_ref: str | None,
        success: bool = True,
        idempotency_key: str | None = None,
        metadata: dict[str, Any] | None = None,
        model: str | None = None,
        learn: bool = True,
    ) -> _core.Plan[Settlement]:
        """The record of ``units`` on a reservation by its id (``units`` None: its release);
        ``model``: an LLM call's, whose statistics it adds its sample to too; ``learn`` False:
        no sample at all (a lease's slice is not one run)."""
        if units is None:
            return _core.plan_release(self._script_settings, reservation_id, None, None)
        return self._plan_record(
            agent_id,
            units,
            customer_id,
            reservation_id,
            task_ref,
            success,
            idempotency_key,
            metadata,
            model=model,
            learn=learn,
        )

    def _plan_record(
        self,
        agent_id: object,
        units: object,
        customer_id: object,
        reservation_id: object,
        task_ref: object,
        success: object = True,
        idempotency_key: object = None,
        metadata: object = None,
        *,
        model: str | None = None,
        learn: bool = True,
    ) -> _core.Plan[Settlement]:
        """A validated record (see ``record``): one without a reservation id prefers this
        client's own oldest open reservation of its group (see ``_own``), and one of a
        reservation approved offline under an idempotency key says so (see ``_outage``)."""
        return _core.plan_record(
            self._script_settings,
            agent_id,
            units,
            customer_id,
            reservation_id,
            task_ref,
            success,
            idempotency_key,
            metadata,
            self._own,
            model=model,
            learn=learn,
            offline_key=self._outage.offline_key,
        )

    def _settle_later(self, plan: _core.Plan[Settlement], release: bool = False) -> Settlement:
        """Queue a settlement for the background delivery (with a backoff until Redis takes
        it, exactly once: it keeps its request id), whatever the outage policy; status
        ``queued``. Sync, for either client: what a lease run recorded after its lease closed
        is charged this way."""
        self._outage.enqueue(plan, release)
        self._flusher.wake()
        return _core.queued_settlement(plan.reservation_id)

    def _last_delivery(self, deadline: float) -> int:
        """Deliver what is queued, trying with a backoff until ``deadline`` (monotonic); how
        many settlements are left, logged (they are lost with this process)."""
        left = self._deliver_until(deadline)
        if left:
            warn_undelivered(self._outage.stats())
        return left

    def _deliver_until(self, deadline: float) -> int:
        """Each client's: deliver the queue, trying until ``deadline``; how many are left."""
        raise NotImplementedError

    def _batch_releases(self, checks: list[Any]) -> list[_core.Plan[Settlement]]:
        """Releases of what a failed batch itself approved (not replays of earlier calls), the
        latest first: a threshold crossing is taken back by the release of the approval that
        made it once the approvals after it are released too."""
        return [
            _core.plan_release(self._script_settings, c.reservation_id, None, None, rollback=True)
            for c in reversed(checks)
            if c is not None and c.approved and not c.replayed and not c.offline
        ]

    def _queue_unanswered(
        self, releases: list[_core.Plan[Settlement]], answers: list[object] | None
    ) -> None:
        """The rollback releases Redis did not take (busy, or unreachable: ``answers`` None)
        go to the background delivery, so that a batch's approvals never stay held."""
        for i, plan in enumerate(releases):
            answer = None if answers is None else answers[i]
            if answers is None or (isinstance(answer, Exception) and is_transient(answer)):
                self._settle_later(plan, release=True)

    def _delivered(self, batch: list[Queued], replies: list[object]) -> bool:
        """Account for a delivered batch of queued settlements, item by item: an item Redis
        answered "not now" is queued again; one it refused for good is dropped (and a dropped
        record's reservation released). An item sent to a node that does not own its slot (a
        plain URL to a cluster node: MOVED) is the connection's fault, not the item's: it waits
        too. False when some item must wait."""
        delivered, busy, dropped = [], [], []
        for item, reply in zip(batch, replies, strict=True):
            if isinstance(reply, Exception):
                error = translate(reply)
                if isinstance(error, StoreUnavailableError) or isinstance(reply, MovedError):
                    busy.append(item)
                else:
                    dropped.append((item, cast(Exception, error)))
                continue
            self._notify(item.plan.decode(cast(_core.Reply, reply)))
            delivered.append(item)
        self._outage.finish(delivered, busy, dropped, self._release_plan)
        return not busy

    def _release_plan(self, reservation_id: str) -> _core.Plan[Settlement]:
        return _core.plan_release(self._script_settings, reservation_id, None, None)

    def _undeliverable(self, batch: list[Queued], exc: AgentBillError) -> None:
        """Redis refused a whole batch with an error that is not any item's own (a revoked key,
        say): nothing is dropped for it; the batch waits, and the error is logged."""
        self._outage.put_back(batch, busy=True)
        logger.warning("agentbill: queued settlements wait: Redis refused their delivery: %s", exc)

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

    def _gate(self, **arguments: Any) -> Gate:
        """The decorator for the arguments of ``gate``, checked now."""
        _core.validate_gate(self._script_settings, **arguments)
        return Gate(cast("GateClient", self), **arguments)  # self is one of the twins

    def _block(self, cls: type[B], charge_estimate: bool, bound: int | None, **preflight: Any) -> B:
        """``cls`` (Run or AsyncRun) for the arguments of ``run``, checked now."""
        _core.validate_gate(
            self._script_settings, **preflight, charge_estimate=charge_estimate, bound=bound
        )
        # self is one of the twins: each fits its block's client Protocol (tests/test_layers.py)
        return cls(cast(Any, self), charge_estimate, bound, **preflight)

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
    ) -> _core.Plan[C]:
        """A validated preflight, not sent: the gate reads its reservation id first, so it can
        release it if the preflight is interrupted, whether or not Redis reserved."""
        return _core.plan_preflight(
            self._script_settings,
            agent_id,
            estimated_units,
            customer_id,
            task_ref,
            task_ceiling,
            idempotency_key,
            ttl,
            self._make_check,
            adoptable=adoptable,
        )

    def _closed(self, plan: _core.Plan[Settlement], settlement: Settlement, release: bool) -> None:
        """After a ``_settle_surely``: see ``_released`` and ``_recorded``."""
        if release:
            self._released(plan, settlement)
        else:
            self._recorded(plan, settlement)

    @staticmethod
    def _decode_one(plan: _core.Plan[_core.T], replies: list[object]) -> _core.T:
        """The result of a call sent alone in a batch (with WAIT, see ``_durability``)."""
        answer = replies[0]
        if isinstance(answer, Exception):
            raise translate(answer) from answer
        return plan.decode(cast(_core.Reply, answer))

    def _attempt_batch(self, batch: Batch) -> Generator[Ask, Any, list[object]]:
        """One attempt at sending ``batch``, a dialogue: every pending item's FCALL in one
        round trip; the items answered "Function not found" go to :meth:`_reloaded`. Returns
        every reply once none is pending."""
        wait = self._waits(batch.calls)
        answered, acks = yield Pipeline(self._commands(batch), wait)
        self._take(batch, answered, acks, wait)
        if batch.pending:
            yield from self._reloaded(batch, wait)
        return batch.replies

    def _reloaded(self, batch: Batch, wait: bool) -> Generator[Ask, Any, list[object]]:
        """The one place the library gets loaded, for single calls and batches alike: Redis
        answered "Function not found" to the pending items of ``batch`` because it lacks the
        library (never loaded there, FUNCTION FLUSH or DELETE, a server restarted empty).
        Those calls ran nothing, so the library is loaded (FUNCTION LOAD REPLACE) and they are
        sent once more, as the same requests (same request ids). Gone again at once (a FUNCTION
        FLUSH racing the reload): LibraryRemoved, a "not now" the retry policy sends again. (A
        server without Functions at all answers another error: a StoreError naming the version
        floor, see ``_retry.translate``.)"""
        yield LoadLibrary()
        answered, acks = yield Pipeline(self._commands(batch), wait)
        self._take(batch, answered, acks, wait)
        if batch.pending:
            raise LibraryRemoved(
                f"Redis answered {FUNCTION_MISSING!r} for agentbill's library"
                f" {self._library.name} right after it was loaded (removed again meanwhile)"
            )
        return batch.replies

    def _waits(self, calls: list[_core.Call]) -> bool:
        """Whether these calls are followed by WAIT: with replicated durability, if any writes
        (see ``_durability``)."""
        return self._wait is not None and any(call.script in WRITES for call in calls)

    def _commands(self, batch: Batch) -> list[list[Any]]:
        """The FCALL of each pending item of ``batch``."""
        fcall, calls = self._library.fcall, batch.calls
        return [fcall(calls[i].script, calls[i].keys, calls[i].args) for i in batch.pending]

    def _take(self, batch: Batch, answered: list[object], acks: list[object], wait: bool) -> None:
        """Keep a round trip's answers to ``batch``'s pending items (WAIT's replies checked
        first); those answered "Function not found" stay pending."""
        if wait:
            self._confirm(batch.calls, answered, acks, batch.pending, batch.replies)
        batch.pending = _core.take_answers(batch.pending, answered, batch.replies)

    def _after_one(self, call: _core.Call, answer: object) -> Generator[Ask, Any, object]:
        """What follows Redis's ``answer`` to ``call`` sent alone (the hot path, see the
        clients' ``_call_alone``): the library loaded and the call sent once more if the answer
        says it is missing; then the reply, or its error raised (the retry policy may send
        it again)."""
        if _scripts.function_missing(answer):
            (answer,) = yield from self._reloaded(Batch([call], [None], [0]), False)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def _flush(self) -> Generator[Ask, Any, int]:
        """``flush`` as a dialogue; see :meth:`AgentBillClient.flush`."""
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
                yield Pause(0.01)
                continue
            try:
                replies = yield SendBatch([item.plan.call for item in batch])
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

    def _preflight_many(self, requests: Iterable[Preflight]) -> Generator[Ask, Any, list[C]]:
        """``preflight_many`` as a dialogue; see :meth:`AgentBillClient.preflight_many`."""
        plans = _core.plan_preflight_many(self._script_settings, requests, self._make_check)
        if not plans:
            return []
        try:
            replies = yield SendBatch([plan.call for plan in plans])
        except StoreUnavailableError as exc:
            return [self._offline_check(plan, exc) for plan in plans]
        checks, failed = _core.decode_batch(plans, replies)
        if failed is not None:
            releases = self._batch_releases(checks)
            answers: list[object] | None = None
            try:
                answers = yield SendBatch([release.call for release in releases])
            except StoreUnavailableError:
                pass
            finally:
                self._queue_unanswered(releases, answers)
                index, error = failed
                raise _core.batch_error(index, translate(error)) from error
        for check in checks:
            self._notify(check)
            self._track(cast(C, check))
        if self._outage.has_queued:
            yield Flush()
        return cast(list[C], checks)


CLUSTER_TYPES: tuple[type, ...] = (RedisCluster, AsyncRedisCluster)

REDIS_TYPES = (redis.Redis, RedisCluster)
REDIS_TYPES_TEXT = "must be a redis.Redis or redis.cluster.RedisCluster (not a URL: use redis_url)"


def check_callback(on_threshold: object) -> None:
    """``on_threshold`` is None or callable: checked before anything connects."""
    if on_threshold is not None and not callable(on_threshold):
        raise InvalidRequestError("on_threshold", "must be a callable of ThresholdCrossing")


def from_url(
    client_class: Any, pool_class: Any, settings: ClientSettings
) -> tuple[Any, Heal | None]:
    """A ``client_class`` over a ``pool_class`` (a BlockingConnectionPool) for the connection
    URL, and what revives the embedded server if that is what it connects to; for a
    ``redis+cluster://`` or ``redis+sentinel://`` URL, redis-py's cluster or Sentinel client
    instead (async when ``client_class`` is). A URL redis-py cannot use is an
    InvalidRequestError naming redis_url (never quoting it: it may hold a password)."""
    url, heal = connection_url(settings)
    options = connection_options(settings)
    try:
        topology = _topology.parse(url)
        if topology is not None:
            asynchronous = client_class is not redis.Redis
            return _topology.connect(topology, options, asynchronous), heal
        pool = pool_class.from_url(url, **options)
        # A query parameter redis-py does not know reaches the connection's constructor,
        # which would refuse it (TypeError) at the first call: built once now, not connected.
        pool.connection_class(**pool.connection_kwargs)
    except _topology.UrlError as exc:
        raise InvalidRequestError("redis_url", str(exc)) from None
    except (ValueError, TypeError):
        raise InvalidRequestError(
            "redis_url", f"is not a Redis URL agentbill can use ({_topology.URL_FORMS})"
        ) from None
    return client_class.from_pool(pool), heal


class AgentBillClient(BaseClient[Check]):
    """Budget enforcement for agent runs, against a Redis shared by every worker.

    Connects to ``redis`` (a ready ``redis.Redis`` or ``RedisCluster``) if given, else
    ``redis_url``, else the ``AGENTBILL_REDIS_URL`` environment variable, else an embedded local
    server shared by every process on this machine. ``ceiling`` caps the estimate of any single
    run; ``namespace`` prefixes every key, so clients with different namespaces never see each
    other's data. ``on_outage`` decides what a preflight does when Redis cannot answer:
    ``"fail_closed"`` raises StoreUnavailableError; ``"fail_open"`` approves offline;
    ``"allowance"`` approves offline up to ``outage_allowance`` units held by this process.
    Offline runs' settlements are queued and delivered once Redis answers (see ``flush``).
    Only Redis unreachable or silent is an outage: Redis answering "not now" (BUSY, OOM, ...)
    raises StoreBusyError, and the client's own load is never one: at most
    ``max_connections`` calls talk to Redis at once, and the others wait for a connection.
    ``background_settle``: ``record`` and ``release`` queue their call and return at once
    (status ``queued``); a background thread delivers the queue in pipelined batches, and
    ``close()`` (or leaving the ``with`` block) delivers what is left.
    ``metrics``: count preflights, units, settlements and errors with prometheus-client (True:
    its default registry; or a ``CollectorRegistry``); ``metrics_customers`` adds a customer
    label. With OpenTelemetry configured, every operation is a span; ``trace_customers`` puts
    the customer id in them. See ``_telemetry``.
    ``durability``: ``"primary"`` (a write returns once the primary has it) or
    ``"replicated"`` (once ``durability_replicas`` replicas have it too: WAIT in the same round
    trip, for half ``socket_timeout``; unconfirmed, the call is in doubt like a lost reply,
    retried with its request id, then StoreUnavailableError). Set ``durability_replicas`` to
    the number of replicas each primary has: with fewer, a failover that leaves the old
    primary up can lose acknowledged writes; with all of them, one replica down makes writes
    fail until it is back. See ``_durability``.

    Raises InvalidRequestError for bad settings, StoreUnavailableError when the embedded server
    cannot be started.
    """

    _flusher: Flusher

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
        self._flusher = Flusher(self.flush)
        self._make_check = functools.partial(Check, _client=self)
        self._instrument(arguments)

    def _answer(self, ask: Ask) -> object:
        """Do what a dialogue of the base asks (see ``_core.drive``)."""
        if isinstance(ask, SendBatch):
            return self._send_batch(ask.calls)
        if isinstance(ask, Pipeline):
            return self._pipeline(ask.commands, ask.wait)
        if isinstance(ask, LoadLibrary):
            _topology.load_library(self._redis, self._library)
            return None
        if isinstance(ask, Flush):
            return self.flush()
        time.sleep(ask.seconds)
        return None

    def _send(self, plan: _core.Plan[_core.T]) -> _core.T:
        call = plan.call
        if self._waits([call]):
            # The call and WAIT in one pipelined round trip (see _durability).
            return self._decode_one(plan, self._send_batch([call]))
        with translated():
            reply = self._retry.call(lambda: self._call_alone(call))
        return plan.decode(cast(_core.Reply, reply))

    def _call_alone(self, call: _core.Call) -> object:
        """One FCALL, sent as it is (no pipeline, no dialogue) unless Redis lacks the library:
        see :meth:`_after_one`."""
        fcall = self._library.fcall(call.script, call.keys, call.args)
        try:
            return self._redis.execute_command(*fcall)
        except redis.ResponseError as exc:
            return _core.drive(self._after_one(call, exc), self._answer)

    def _run(self, plan: _core.Plan[_core.T]) -> _core.T:
        """One round trip; then, if an outage left settlements queued, deliver them."""
        result = self._send(plan)
        self._notify(result)
        if self._outage.due() and not self._settings.background_settle:
            self.flush()
        return result

    def _pipeline(self, commands: list[list[Any]], wait: bool) -> tuple[list[object], list[object]]:
        """The commands (FCALLs) in one pipelined round trip (one per node on a cluster) and,
        if ``wait``, WAIT after them on the same connection: the answers in order (an error
        reply as its exception), and WAIT's replies."""
        after = self._wait if wait else None
        if after is not None and isinstance(self._redis, RedisCluster):
            return send_on_nodes(self._redis, commands, after)
        pipe = self._redis.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        if after is None:
            return list(pipe.execute(raise_on_error=False)), []
        pipe.execute_command(*after)
        answered = list(pipe.execute(raise_on_error=False))
        return answered[:-1], answered[-1:]

    def _send_batch(self, calls: list[_core.Call]) -> list[object]:
        """Every call in one pipelined round trip (each function call atomic on its own); the
        replies in order, an item Redis refused as its exception. Items answered "Function not
        found" are sent again once the library is loaded; a retry after a transport error
        resends only unanswered items, which carry their request ids, so none lands twice."""
        batch = Batch.of(calls)
        with translated():
            return self._retry.call(lambda: _core.drive(self._attempt_batch(batch), self._answer))

    def _settle(
        self, plan: _core.Plan[Settlement], release: bool = False, surely: bool = False
    ) -> Settlement:
        if self._settings.background_settle:
            return self._settle_later(plan, release)
        try:
            settlement = self._run(plan)
        except UNSETTLED as exc:
            return self._offline_settlement(plan, exc, release, surely)
        self._outage.landed(plan, release)
        return settlement

    def _settle_surely(
        self,
        reservation_id: str,
        units: int | None,
        agent_id: str,
        customer_id: str | None,
        task_ref: str | None,
        **options: Any,
    ) -> Settlement:
        """Record ``units`` on a reservation by its id (``units`` None: release it) for a caller
        that cannot make the call again: a gate, a run block, a Celery task or RQ job run, a
        lease's slice. As ``record``/``release``, except that when Redis cannot take it now
        (busy, unreachable or silent) it is queued, whatever the outage policy, and delivered
        in the background with a backoff, exactly once (it keeps its request id); the status
        is ``queued``, and a warning is logged where the outage policy would have raised. A bad
        request still raises. ``options``: a record's ``success``, ``idempotency_key`` and
        ``metadata``."""
        plan = self._plan_close(reservation_id, units, agent_id, customer_id, task_ref, **options)
        settlement = self._settle(plan, release=units is None, surely=True)
        self._closed(plan, settlement, release=units is None)
        return settlement

    def _deliver_until(self, deadline: float) -> int:
        return deliver_until(self.flush, deadline)

    def flush(self) -> int:
        """Deliver the queued settlements (an outage's, or all of them with
        ``background_settle``), oldest first, in pipelined batches, each exactly once (it keeps
        its request id). Runs by itself after every successful round trip (with
        ``background_settle``, in the background). Returns how many are still queued: Redis
        unreachable, silent or answering "not now" (BUSY, OOM, ...); those are kept for the
        next try. A settlement Redis refuses for good is dropped, logged and counted, and a
        dropped record's reservation released (see ``outage_stats``)."""
        return _core.drive(self._flush(), self._answer)

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
        plan = self._plan_preflight(
            agent_id, estimated_units, customer_id, task_ref, task_ceiling, idempotency_key, ttl
        )
        return self._preflight(plan)

    def _preflight(self, plan: _core.Plan[Check], track: bool = True) -> Check:
        try:
            check = self._run(plan)
        except StoreUnavailableError as exc:
            return self._offline_check(plan, exc, owned=not track)
        self._approved(plan, check, track)
        return check

    def _reserve_slice(
        self, agent_id: str, units: int, customer_id: str | None, task_ref: str | None, ttl: int
    ) -> Check:
        """A lease's slice: a preflight whose reservation only a request naming it can close
        (never a record without an id, which would take it from under the lease's runs)."""
        plan = self._plan_preflight(
            agent_id, units, customer_id, task_ref, None, None, ttl, adoptable=False
        )
        return self._preflight(plan, track=False)

    def _extend(self, check: Check, units: object) -> Check:
        """See :meth:`Check.extend`."""
        plan = _core.plan_extend(self._script_settings, check, units, self._make_check)
        return self._run(plan).raise_for_refusal()

    def estimates(
        self, agent_id: str, customer_id: str | None = None, *, model: str | None = None
    ) -> Estimates:
        """What ``agent_id``'s runs of the customer used, next to what they reserved (with
        ``model``: its LLM calls to that model, kept by ``wrap``): count, means and percentiles
        of the actual units over the last 100 to 200 records that closed a reservation. What
        ``"learned"`` estimates reserve from; see "Estimates that learn" in the README."""
        return self._run(_core.plan_estimates(self._script_settings, agent_id, customer_id, model))

    def preflight_many(self, requests: Iterable[Preflight]) -> list[Check]:
        """Many preflights in one round trip: one Check per ``Preflight`` in order, each decided
        atomically on its own, exactly as ``preflight`` would (a batch is not atomic as a
        whole: items are decided in order, and other workers' calls may land in between).

        Raises InvalidRequestError naming ``requests[i].<field>`` (nothing sent) for bad input.
        If Redis refuses an item (an idempotency key reused with other arguments) or answers it
        "not now" (StoreBusyError: it ran out of memory half-way, say), what the batch approved
        is released (queued for the background delivery if Redis cannot take the releases now)
        and that item's error is raised: the same batch can be sent again. StoreUnavailableError
        for the whole batch: the outage policy decides each item, as for ``preflight``.
        """
        return _core.drive(self._preflight_many(requests), self._answer)

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
        no round trip while the current slice (``slice_units``, sized to fit every rule, never
        less than the ask) has room, and approves whatever a plain preflight would;
        ``run.record(units)`` is local and closes the run once, like a Check's; slices are
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
        settlement = self._settle(plan)
        self._recorded(plan, settlement)
        return settlement

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
        plan = _core.plan_release(
            self._script_settings, reservation_id, idempotency_key, customer_id
        )
        settlement = self._settle(plan, release=True)
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
    ) -> Run:
        """A gated block: ``with client.run(...) as run: ...; run.record(units)``.

        Preflights on entry (typed RunBlockedError on refusal); releases if the block raises;
        a block left without a record releases, or charges the estimate if
        ``charge_estimate``. Bad arguments raise InvalidRequestError at once.
        """
        return self._block(
            Run,
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
        """A copy of ``llm_client`` (``OpenAI`` or ``Anthropic``; the async ones go to
        AsyncAgentBillClient) whose model calls are preflighted before the HTTP request and
        recorded from the response's usage after it; see ``agentbill.llm``. ``unit``: tokens,
        or micro-dollars priced by genai-prices (``prices`` adds or overrides a model's price).
        ``estimate``: ``"bound"`` (the most the call can cost), ``"learned"`` (the p95 of what
        this agent's recent calls to the model used, up to the bound), an int, or a callable
        of ``agentbill.llm.LLMRequest``. A refusal raises the typed RunBlockedError and sends
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
                self._script_settings, customer_id, limit, period, tz, agent_id, thresholds
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
                self._script_settings, customer_id, units, per_seconds, burst, agent_id
            )
        )

    def set_concurrency_limit(
        self, customer_id: str | None, max_in_flight: int | None, *, agent_id: str | None = None
    ) -> BudgetStatus:
        """At most ``max_in_flight`` open reservations (runs in flight) for the customer, or
        with ``agent_id`` for that agent; None removes the limit."""
        return self._run(
            _core.plan_set_concurrency_limit(
                self._script_settings, customer_id, max_in_flight, agent_id
            )
        )

    def get_budget(
        self, customer_id: str | None = None, *, agent_id: str | None = None
    ) -> BudgetStatus:
        """The budget of the customer (or of one agent) in its current period: limit, spent,
        reserved, remaining, open reservations, the period's bounds and the other limits."""
        return self._run(_core.plan_get_budget(self._script_settings, customer_id, agent_id))

    def get_usage(self, customer_id: str | None = None, *, limit: int = 100) -> Usage:
        """The customer's budget and its agents', in one round trip: at most ``limit`` agents,
        the most recently active first."""
        return self._run(_core.plan_get_usage(self._script_settings, customer_id, limit))

    def events(
        self, customer_id: str | None = None, *, since: str | None = None, limit: int | None = None
    ) -> list[Event]:
        """The customer's ledger, oldest first: after the event whose ``id`` is ``since``, at
        most ``limit`` of them (all by default), read in pages of 1,000 entries so that Redis
        is never held long. The ledger keeps the last ``ledger_max_len`` (about)."""
        return _core.drive(
            _core.plan_events(self._script_settings, customer_id, since, limit), self._run
        )

    def open_task(
        self, task_ref: str, ceiling: int | None, customer_id: str | None = None
    ) -> TaskStatus:
        """Open a task of the customer with a ceiling (``None``: no ceiling), or change it."""
        return self._run(
            _core.plan_open_task(self._script_settings, task_ref, ceiling, customer_id)
        )

    def get_task(self, task_ref: str, customer_id: str | None = None) -> TaskStatus:
        """The task's ceiling, used, reserved and remaining (``exists`` False if never seen)."""
        return self._run(_core.plan_get_task(self._script_settings, task_ref, customer_id))

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Deliver what is still queued (an outage's, the background's, a settlement Redis
        could not take), trying with a backoff for up to 5 s, then close the connections this
        client opened (not a ``redis=`` client you passed in). What is still queued then is
        logged; the exit delivery tries once more."""
        self._flusher.stop()
        if self._outage.has_queued:
            self._last_delivery(time.monotonic() + LAST_DELIVERY)
        if self._owns_redis:
            self._redis.close()

    def __enter__(self) -> AgentBillClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _connect(settings: ClientSettings) -> tuple[redis.Redis, Heal | None]:
    return from_url(redis.Redis, redis.BlockingConnectionPool, settings)
