"""What a client does when Redis cannot answer: its outage policy, and the local ledger behind it.

``fail_closed`` (the default) raises StoreUnavailableError and approves nothing. ``fail_open``
approves every run Redis cannot decide, and ``allowance`` approves them while this process's
offline runs stay within ``outage_allowance`` units. Either way the run is approved *offline*:
its reservation id is a normal one that Redis has never seen, its settlement is queued if
Redis is still unreachable, and every queued settlement is delivered, in order and exactly
once (each keeps its request id), on the client's next successful round trip. A record of an
offline run charges the real budgets then, flagged ``late``, so nothing is lost; the overshoot
is what was approved offline. An offline run's release is queued like a record (its
preflight may have reached Redis after all, if Redis was silent rather than down).

The same queue carries every settlement of a ``background_settle`` client. A queued settlement
that Redis answers "not now" (BUSY, OOM, ...) stays queued and is tried again with a backoff;
one that Redis refuses for good (a bad request, such as an idempotency conflict) is dropped,
logged as an error and counted, and a dropped record's reservation is released, so that it is
never left holding its units until its TTL.

The same queue also takes the settlements that no caller could make again: the records and
releases of a gate, a run block, a Celery task, an RQ job or a lease slice (the client's
``_settle_surely``). Whatever the outage policy, one that Redis cannot take now (busy,
unreachable or silent) is queued rather than raised, with its request id, and delivered by the
background flusher with a backoff.

The ledger is per process: a client inherited across ``fork()`` starts a fresh one in the
child (with new locks), so a queued settlement is never delivered by two processes. It lives
in memory, so before a process ends, what is queued gets a last delivery, tried with a backoff
for up to :data:`LAST_DELIVERY` seconds (what is still queued then is logged, and lost): by
``close()``, at interpreter exit (every client of the process, held weakly:
:func:`deliver_queued`), and by the Celery and RQ integrations before a pool child or a work
horse ends (they leave with ``os._exit``, which runs no exit hook).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from agentbill._exceptions import InvalidRequestError
from agentbill._fork import reset_at_fork

logger = logging.getLogger("agentbill")

OutageMode = Literal["fail_closed", "fail_open", "allowance"]

KEYED = 10_000
"""Approvals under an idempotency key remembered per client for offline repeats."""

BATCH = 100
"""Queued settlements sent per pipelined round trip."""

BACKOFF_START, BACKOFF_MAX = 0.05, 2.0
"""Seconds between delivery attempts while Redis cannot take the queue: doubling, capped."""

LAST_DELIVERY = 5.0
"""Seconds a last delivery (``close()``, interpreter exit, a worker process ending) keeps trying
to hand the queue to Redis, with the backoff above."""


@dataclass(frozen=True, slots=True, kw_only=True)
class OutageStats:
    """What this process approved and queued while Redis was unreachable."""

    mode: OutageMode
    allowance: int | None
    """Units this process may hold in offline runs (``allowance`` mode), else None."""
    offline_runs: int
    """Runs approved offline since the client was made (in this process)."""
    offline_units: int
    """Their estimates, summed."""
    held_units: int
    """Estimates of offline runs not yet settled in Redis: the allowance in use."""
    queued: int
    """Settlements waiting for Redis (unreachable, silent or busy), or being sent right now."""
    delivered: int
    """Queued settlements delivered to Redis since the client was made."""
    dropped: int
    """Queued settlements Redis refused for good (a bad request, which no retry can fix); each
    was logged as an error, and a dropped record's reservation released."""


@dataclass(slots=True)
class Queued:
    """One settlement waiting for Redis: the exact call (same request id), whether it is a
    release, and the offline runs whose allowance it frees once it lands."""

    plan: Any
    release: bool
    offline: tuple[str, ...]


def idempotency_record(plan: Any) -> str:
    """The Redis key of the preflight idempotency record that a preflight plan, or a release
    by idempotency key, names (``Plan.idempotency``)."""
    key: str = plan.idempotency[0]
    return key


class _State:
    __slots__ = (
        "backoff",
        "by_key",
        "delivered",
        "dropped",
        "held",
        "in_flight",
        "key_of",
        "keyed",
        "offline_runs",
        "offline_units",
        "queue",
        "retry_at",
    )

    def __init__(self) -> None:
        self.held: dict[str, tuple[int, str]] = {}  # offline run -> (units, idempotency record)
        self.by_key: dict[str, set[str]] = {}  # idempotency record -> its offline runs
        self.queue: deque[Queued] = deque()
        self.in_flight = 0  # taken from the queue, being sent
        self.offline_runs = 0
        self.offline_units = 0
        self.delivered = 0
        self.dropped = 0
        self.retry_at = 0.0  # Redis said "not now": no opportunistic delivery before this
        self.backoff = BACKOFF_START
        # Approvals this process holds under an idempotency key: record key -> (fingerprint,
        # check); and each one's record key by reservation id.
        self.keyed: OrderedDict[str, tuple[str, Any]] = OrderedDict()
        self.key_of: dict[str, str] = {}

    def free(self, runs: tuple[str, ...]) -> None:
        for rid in runs:
            held = self.held.pop(rid, None)
            if held is not None:
                rids = self.by_key.get(held[1], set())
                rids.discard(rid)
                if not rids:
                    self.by_key.pop(held[1], None)


class OutageLedger:
    """The outage policy of one client, and what it approved and queued in this process.

    It is per process: in a forked child it starts empty (the parent keeps the queue), with a
    lock of its own (see ``_fork``).
    """

    def __init__(self, mode: OutageMode, allowance: int | None) -> None:
        self.mode = mode
        self.allowance = allowance
        self._lock = threading.Lock()
        self._s = _State()
        reset_at_fork(self)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._s = _State()

    @property
    def fails_closed(self) -> bool:
        return self.mode == "fail_closed"

    def approve(self, rid: str, units: int, key: str) -> bool:
        """Whether a run of ``units`` may be approved offline; if so, hold it as ``rid``
        (``key``: its preflight's idempotency record, by which it may be released too)."""
        if self.fails_closed:
            return False
        with self._lock:
            s = self._s
            if self.allowance is not None and self._held(s) + units > self.allowance:
                return False
            s.held[rid] = (units, key)
            s.by_key.setdefault(key, set()).add(rid)
            s.offline_runs += 1
            s.offline_units += units
        return True

    def keyed(self, idempotency: tuple[str, str] | None) -> Any | None:
        """The approval this process holds under the same preflight idempotency key, if any:
        an offline preflight with a key answers with it, as Redis would (one reservation per
        key). InvalidRequestError if the key was used with other arguments."""
        if idempotency is None or not idempotency[1]:
            return None
        with self._lock:
            held = self._s.keyed.get(idempotency[0])
        if held is None:
            return None
        if held[0] != idempotency[1]:
            raise InvalidRequestError(
                "idempotency_key",
                "was already used with different arguments; use a new key for a new request",
            )
        return held[1]

    def remember_keyed(self, idempotency: tuple[str, str] | None, check: Any) -> None:
        """Hold ``check`` (an approval) under its preflight's idempotency key, for offline
        repeats of it in this process; the oldest are forgotten beyond KEYED."""
        if idempotency is None or not idempotency[1] or check.reservation_id is None:
            return
        with self._lock:
            s = self._s
            s.keyed[idempotency[0]] = (idempotency[1], check)
            s.keyed.move_to_end(idempotency[0])
            s.key_of[check.reservation_id] = idempotency[0]
            while len(s.keyed) > KEYED:
                _, (_, old) = s.keyed.popitem(last=False)
                s.key_of.pop(old.reservation_id, None)

    def offline_key(self, rid: str) -> tuple[str, str] | None:
        """The idempotency (record key, fingerprint) of the preflight that approved ``rid``
        offline under an idempotency key, if this process holds it: its record writes that key
        naming the run, as the preflight would have, so that the key replays the recorded run
        (a job run again is charged once)."""
        if not self._s.key_of:  # nothing keyed approved offline: no lock on every record
            return None
        with self._lock:
            s = self._s
            key = s.key_of.get(rid)
            held = s.keyed.get(key) if key is not None else None
        if key is None or held is None or not held[1].offline or held[1].reservation_id != rid:
            return None
        return key, held[0]

    def forget_keyed(self, rid: str | None, record_key: str | None = None) -> None:
        """A released run: its key reserves afresh (Redis's rule for a released key)."""
        with self._lock:
            s = self._s
            key = record_key if record_key is not None else s.key_of.pop(rid or "", None)
            if key is not None:
                held = s.keyed.pop(key, None)
                if held is not None:
                    s.key_of.pop(held[1].reservation_id, None)

    @staticmethod
    def _held(s: _State) -> int:
        return sum(units for units, _ in s.held.values())

    def _offline(self, s: _State, plan: Any, release: bool) -> tuple[str, ...]:
        """The offline runs a settle plan closes: the one it names (or, for a record without
        an id, the client's own it prefers to close), or for a release by idempotency key
        every offline run its preflight made."""
        rid = plan.reservation_id or plan.prefer
        if rid is not None:
            return (rid,) if rid in s.held else ()
        if release:
            return tuple(s.by_key.get(idempotency_record(plan), ()))
        return ()

    def landed(self, plan: Any, release: bool) -> None:
        """``plan``'s record or release reached Redis: free the allowance of the
        offline runs it closed."""
        with self._lock:
            s = self._s
            s.free(self._offline(s, plan, release))

    def enqueue(self, plan: Any, release: bool) -> None:
        """Queue a settlement for Redis. A release frees its offline runs' allowance at once (a
        released run charges nothing); a record frees it when it lands."""
        with self._lock:
            s = self._s
            runs = self._offline(s, plan, release)
            if release:
                s.free(runs)
                runs = ()
            s.queue.append(Queued(plan, release, runs))

    @property
    def in_flight(self) -> int:
        return self._s.in_flight

    @property
    def has_queued(self) -> bool:
        s = self._s
        return bool(s.queue) or s.in_flight > 0

    def due(self) -> bool:
        """Something is queued, and Redis did not just say "not now" to it."""
        s = self._s
        return bool(s.queue) and time.monotonic() >= s.retry_at

    def take(self, n: int = BATCH) -> list[Queued]:
        """The oldest ``n`` queued settlements, removed; :meth:`put_back` them or
        :meth:`finish` them."""
        with self._lock:
            s = self._s
            items = [s.queue.popleft() for _ in range(min(n, len(s.queue)))]
            s.in_flight += len(items)
            return items

    def put_back(self, items: list[Queued], busy: bool = False) -> None:
        """Queue ``items`` again, first and in order, for Redis could not take them;
        ``busy``: Redis answered "not now", so the next opportunistic delivery backs off."""
        with self._lock:
            s = self._s
            s.queue.extendleft(reversed(items))
            s.in_flight -= len(items)
            if busy:
                s.retry_at = time.monotonic() + s.backoff
                s.backoff = min(s.backoff * 2, BACKOFF_MAX)

    def finish(
        self,
        delivered: list[Queued],
        busy: list[Queued],
        dropped: list[tuple[Queued, Exception]],
        release: Callable[[str], Any],
    ) -> None:
        """Account for a batch Redis answered: ``delivered`` landed; ``busy`` were refused for
        now (queued again, first); ``dropped`` were refused for good: each is logged as an
        error and counted, and a dropped record's reservation is released (``release(rid)``
        makes that call, queued last) so that its units come back instead of staying held."""
        with self._lock:
            s = self._s
            s.in_flight -= len(delivered) + len(dropped)
            s.delivered += len(delivered)
            s.dropped += len(dropped)
            for item in delivered:
                s.free(item.offline)
            if not busy:
                s.backoff = BACKOFF_START
        for item, exc in dropped:
            self._drop(item, exc, release)
        if busy:
            self.put_back(busy, busy=True)

    def _drop(self, item: Queued, exc: Exception, release: Callable[[str], Any]) -> None:
        rid = item.plan.reservation_id
        if item.release or rid is None:
            what = "release" if item.release else "record without a reservation id"
            logger.error(
                "agentbill: Redis refused a queued %s for good, so it is dropped: %s", what, exc
            )
            with self._lock:
                self._s.free(item.offline)
            return
        logger.error(
            "agentbill: Redis refused the queued record of reservation %s for good (%s); the "
            "record is dropped and the reservation is released, so its units come back "
            "uncharged",
            rid,
            exc,
        )
        plan = release(rid)
        with self._lock:
            s = self._s
            s.free(item.offline)
            s.queue.append(Queued(plan, True, ()))

    def stats(self) -> OutageStats:
        with self._lock:
            s = self._s
            return OutageStats(
                mode=self.mode,
                allowance=self.allowance,
                offline_runs=s.offline_runs,
                offline_units=s.offline_units,
                held_units=self._held(s),
                queued=len(s.queue) + s.in_flight,
                delivered=s.delivered,
                dropped=s.dropped,
            )


def warn_offline(check: Any, mode: OutageMode, exc: Exception) -> None:
    logger.warning(
        "agentbill: Redis is unreachable (%s); %s approved %s units offline for customer %r "
        "agent %r as %s",
        exc,
        mode,
        check.estimated_units,
        check.customer_id,
        check.agent_id,
        check.reservation_id,
    )


def warn_undelivered(stats: OutageStats) -> None:
    logger.warning(
        "agentbill: closing with %s settlements still queued (Redis unreachable or busy): "
        "they are lost with this process",
        stats.queued,
    )


def warn_queued(plan: Any, release: bool, exc: Exception) -> None:
    """A settlement no caller can make again met a Redis that cannot take it now: queued."""
    logger.warning(
        "agentbill: Redis could not take the %s of reservation %s now (%s); it is queued and "
        "delivered, once, when Redis can take it",
        "release" if release else "record",
        plan.reservation_id,
        exc,
    )


def deliver_until(flush: Callable[[], int], deadline: float) -> int:
    """Call ``flush`` (a sync client's) until nothing is queued, backing off between tries,
    until ``deadline`` (monotonic); how many settlements are still queued."""
    backoff = BACKOFF_START
    while (left := flush()) and time.monotonic() + backoff < deadline:
        time.sleep(backoff)
        backoff = min(backoff * 2, BACKOFF_MAX)
    return left


async def deliver_until_async(flush: Callable[[], Awaitable[int]], deadline: float) -> int:
    """:func:`deliver_until` for an async client's ``flush``."""
    backoff = BACKOFF_START
    while (left := await flush()) and time.monotonic() + backoff < deadline:
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, BACKOFF_MAX)
    return left


class Delivering(Protocol):
    """A client, as the exit delivery sees it."""

    _outage: OutageLedger

    def _last_delivery(self, deadline: float) -> int:
        """Deliver the queue, trying until ``deadline`` (monotonic); how many are left."""


_clients: weakref.WeakSet[Delivering] = weakref.WeakSet()


def deliver_at_exit(client: Delivering) -> None:
    """Have :func:`deliver_queued` try ``client``'s queue (while the client lives)."""
    _clients.add(client)


def deliver_queued(timeout: float = LAST_DELIVERY) -> int:
    """The last delivery of a process: every live client's queued settlements handed to Redis,
    tried with a backoff for up to ``timeout`` seconds in all. Runs at interpreter exit; the
    Celery and RQ integrations call it before a pool child or a work horse ends. Returns how
    many settlements are still queued (each client logs its own: they are lost with the
    process)."""
    deadline = time.monotonic() + timeout
    left = 0
    for client in list(_clients):
        if client._outage.has_queued:
            try:
                left += client._last_delivery(deadline)
            except Exception:  # one client's failure must not cost the others their delivery
                logger.exception("agentbill: the last delivery of queued settlements failed")
                left += client._outage.stats().queued
    return left


atexit.register(deliver_queued)


class Flusher:
    """``background_settle``: a daemon thread that delivers the queue (``flush``) whenever it
    is woken, and while Redis cannot take it (unreachable, silent or busy) tries again with a
    backoff (0.05 s to 2 s). It is started on first use, and again in a forked child."""

    def __init__(self, flush: Callable[[], int]) -> None:
        self._flush = flush
        self._event = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped = False
        reset_at_fork(self)

    def _after_fork(self) -> None:
        self._event = threading.Event()  # its lock may have been held by the parent's thread
        self._thread = None

    def wake(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._event = threading.Event()
            self._thread = threading.Thread(target=self._loop, name="agentbill-settle", daemon=True)
            self._thread.start()
        self._event.set()

    def _loop(self) -> None:
        backoff = BACKOFF_START
        while True:
            self._event.wait()
            self._event.clear()
            if self._stopped:
                return
            try:
                left = self._flush()
            except Exception:  # never let the thread die: the queue would stall
                logger.exception("agentbill: background settle failed; retrying")
                left = 1
            if left:
                self._event.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                self._event.set()
            else:
                backoff = BACKOFF_START

    def stop(self) -> None:
        self._stopped = True
        self._event.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class AsyncFlusher:
    """:class:`Flusher` for the async client: a task on the running event loop."""

    def __init__(self, flush: Callable[[], Awaitable[int]]) -> None:
        self._flush = flush
        self._event: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        reset_at_fork(self)

    def _after_fork(self) -> None:
        self._event = None
        self._task = None

    def wake(self) -> None:
        """Start (or wake) the task on the running loop; with none running (a sync caller), do
        nothing: the next call's delivery, ``close()`` or the exit delivery takes the queue."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._event = asyncio.Event()
            self._task = loop.create_task(self._loop())
        assert self._event is not None
        self._event.set()

    async def _loop(self) -> None:
        assert self._event is not None
        task = asyncio.current_task()
        backoff = BACKOFF_START
        while True:
            await self._event.wait()
            self._event.clear()
            if self._stopped:
                return
            try:
                left = await self._flush()
            except Exception:
                logger.exception("agentbill: background settle failed; retrying")
                left = 1
            if task is not None and task.cancelling():
                # A cancel swallowed on the way (redis-py sends through asyncio.wait_for, which
                # on 3.11 can drop one): honoured here, or the loop would outlive its loop's
                # shutdown, which waits for it.
                raise asyncio.CancelledError
            if left:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                self._event.set()
            else:
                backoff = BACKOFF_START

    async def stop(self) -> None:
        """Let the task finish the batch it is sending, then end it (cancelled after 5 s: a
        batch being sent then goes back to the queue)."""
        self._stopped = True
        if self._task is not None and not self._task.done():
            assert self._event is not None
            self._event.set()
            with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
                await asyncio.wait_for(self._task, timeout=5)
