"""What a client does when Redis cannot answer: its outage policy, and the local ledger behind it.

``fail_closed`` (the default) raises StoreUnavailableError and approves nothing. ``fail_open``
approves every run Redis cannot decide, and ``allowance`` approves them while this process's
offline runs stay within ``outage_allowance`` units. Either way the run is approved *offline*:
its reservation id is a normal one that Redis has never seen, its settlement is queued if
Redis is still unreachable, and every queued settlement is delivered, in order and exactly
once (each keeps its request id), on the client's next successful round trip. A record of an
offline run charges the real budgets then, flagged ``late``, so nothing is lost; the overshoot
is what was approved offline.

The ledger is per process: a client inherited across ``fork()`` starts a fresh one in the
child, so a queued settlement is never delivered by two processes. It lives in memory: a
process that dies with settlements queued loses them (``close()`` tries a last delivery and
logs what it could not send).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

logger = logging.getLogger("agentbill")

OutageMode = Literal["fail_closed", "fail_open", "allowance"]

BATCH = 100
"""Queued settlements sent per pipelined round trip."""


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
    """Settlements waiting for Redis (or being sent to it right now)."""
    delivered: int
    """Queued settlements delivered to Redis since the client was made."""
    dropped: int
    """Queued settlements Redis refused (an error no retry can fix); each was logged."""


@dataclass(slots=True)
class Queued:
    """One settlement waiting for Redis: the exact call (same request id), and for an offline
    run its reservation id, whose allowance is freed once the call lands."""

    plan: Any
    offline_rid: str | None


class _State:
    __slots__ = (
        "delivered",
        "dropped",
        "held",
        "in_flight",
        "offline_runs",
        "offline_units",
        "queue",
    )

    def __init__(self) -> None:
        self.held: dict[str, int] = {}
        self.queue: deque[Queued] = deque()
        self.in_flight = 0  # taken from the queue, being sent
        self.offline_runs = 0
        self.offline_units = 0
        self.delivered = 0
        self.dropped = 0


class OutageLedger:
    """The outage policy of one client, and what it approved and queued in this process."""

    def __init__(self, mode: OutageMode, allowance: int | None) -> None:
        self.mode = mode
        self.allowance = allowance
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._s = _State()

    def _state(self) -> _State:
        """This process's state: a forked child starts empty (its parent keeps the queue)."""
        if self._pid != os.getpid():
            self._lock = threading.Lock()
            self._pid = os.getpid()
            self._s = _State()
        return self._s

    @property
    def fails_closed(self) -> bool:
        return self.mode == "fail_closed"

    def approve(self, rid: str, units: int) -> bool:
        """Whether a run of ``units`` may be approved offline; if so, hold it as ``rid``."""
        if self.fails_closed:
            return False
        with self._lock:
            s = self._state()
            if self.allowance is not None and sum(s.held.values()) + units > self.allowance:
                return False
            s.held[rid] = units
            s.offline_runs += 1
            s.offline_units += units
        return True

    def is_offline(self, rid: str | None) -> bool:
        with self._lock:
            return rid is not None and rid in self._state().held

    def settled(self, rid: str | None) -> None:
        """``rid``'s settlement reached Redis (or it was released): free its allowance."""
        if rid is None:
            return
        with self._lock:
            self._state().held.pop(rid, None)

    def enqueue(self, plan: Any, rid: str | None) -> None:
        with self._lock:
            s = self._state()
            s.queue.append(Queued(plan, rid if rid in s.held else None))

    @property
    def in_flight(self) -> int:
        return self._state().in_flight

    @property
    def has_queued(self) -> bool:
        s = self._state()
        return bool(s.queue) or s.in_flight > 0

    def take(self, n: int = BATCH) -> list[Queued]:
        """The oldest ``n`` queued settlements, removed; :meth:`put_back` them if delivery
        failed."""
        with self._lock:
            s = self._state()
            items = [s.queue.popleft() for _ in range(min(n, len(s.queue)))]
            s.in_flight += len(items)
            return items

    def put_back(self, items: list[Queued]) -> None:
        with self._lock:
            s = self._state()
            s.queue.extendleft(reversed(items))
            s.in_flight -= len(items)

    def delivered(self, item: Queued) -> None:
        with self._lock:
            s = self._state()
            s.delivered += 1
            s.in_flight -= 1
            if item.offline_rid is not None:
                s.held.pop(item.offline_rid, None)

    def dropped(self, item: Queued, exc: Exception) -> None:
        logger.error("agentbill: Redis refused a queued settlement, dropping it: %s", exc)
        with self._lock:
            s = self._state()
            s.dropped += 1
            s.in_flight -= 1
            if item.offline_rid is not None:
                s.held.pop(item.offline_rid, None)

    def stats(self) -> OutageStats:
        with self._lock:
            s = self._state()
            return OutageStats(
                mode=self.mode,
                allowance=self.allowance,
                offline_runs=s.offline_runs,
                offline_units=s.offline_units,
                held_units=sum(s.held.values()),
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
        "agentbill: closing with %s settlements still queued (Redis unreachable): they are "
        "lost with this process",
        stats.queued,
    )


BACKOFF_START, BACKOFF_MAX = 0.05, 2.0


class Flusher:
    """``background_settle``: a daemon thread that delivers the queue (``flush``) whenever it
    is woken, and while Redis is unreachable tries again with a backoff (0.05 s to 2 s). It is
    started on first use, and again in a forked child."""

    def __init__(self, flush: Callable[[], int]) -> None:
        self._flush = flush
        self._event = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._stopped = False

    def wake(self) -> None:
        if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
            self._pid = os.getpid()
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
        if self._thread is not None and self._pid == os.getpid():
            self._thread.join(timeout=5)


class AsyncFlusher:
    """:class:`Flusher` for the async client: a task on the running event loop."""

    def __init__(self, flush: Callable[[], Awaitable[int]]) -> None:
        self._flush = flush
        self._event: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    def wake(self) -> None:
        if self._task is None or self._task.done():
            self._event = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop())
        assert self._event is not None
        self._event.set()

    async def _loop(self) -> None:
        assert self._event is not None
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
