"""The one retry policy, and the one place redis-py errors become agentbill errors.

A failed attempt is one of three kinds:

- **Redis unreachable or silent**: a refused or reset connection, a timeout. The call may have
  run before its reply was lost (it is *in doubt*). Retried; if Redis stays unreachable,
  StoreUnavailableError, and the client's outage policy decides what happens next.
- **Redis busy**: Redis answered that it cannot run the call now (:data:`BUSY_CODES`: a long
  script, maxmemory reached, loading its data, a replica or cluster not ready; or a cluster
  client's redirections ran out while a slot moved). Nothing was written. Retried; then
  StoreBusyError, which never triggers the outage policy.
- **Anything else Redis answers** (a bad request, a permission, a wrong key): never retried.

Retrying a write is safe because every write carries a request id (a client-made reservation
id, an idempotency key or an internal request id), so a call whose reply was lost lands once.
redis-py's own retries are switched off where the client builds its connection, so this is the
only layer. Refusals are answers, never retried.

The policy also keeps the client's own load apart from an outage. At most ``connections``
calls talk to Redis at once; the others wait for a free slot, and waiting is never a failure
(the timeouts start when a call gets its slot). A call whose attempts time out while Redis
answers the client's other calls is this process's load, not an outage: it keeps trying (same
request id) for up to :data:`LOAD_DEADLINE` seconds. Once a failure is seen while Redis has
answered nothing for a while (:class:`Health`), Redis is *down*: calls waiting for a slot fail
at once instead of queueing behind attempts that will time out too, until Redis answers again.
For an async client, a timeout that expired while the event loop itself was blocked (by its
own tasks, or by the OS) for half the attempt or more is load too (:class:`LoopWatch`).
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from typing import TypeVar

from redis import exceptions as rx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception,
    wait_exponential,
    wait_random,
)

from agentbill._contract import FILE as CONTRACT
from agentbill._exceptions import (
    AgentBillError,
    AuthenticationError,
    InvalidRequestError,
    StoreBusyError,
    StoreError,
    StoreUnavailableError,
)
from agentbill._fork import reset_at_fork
from agentbill._interrupts import interrupts_held
from agentbill._scripts import VERSION_FLOOR, no_functions

CLUSTER_HINT = (
    "reaches a node of a Redis Cluster (it answered MOVED): use "
    "redis+cluster://host:port[,host:port...] (or pass redis=RedisCluster(...)) so that every "
    "call goes to the node that owns its keys"
)
"""What a MOVED reply means for a plain connection (the shared vectors hold it too)."""

T = TypeVar("T")

Heal = Callable[[float], None]
"""Starts the embedded local server again if it died, within the given seconds (raising
StoreUnavailableError if it cannot): what a client on it calls when its connections are
refused."""

BUSY_CODES: tuple[str, ...] = tuple(CONTRACT["busy_codes"])
"""Error replies meaning "not now" (lua/contract.json ``busy_codes``): Redis refused the call
before it wrote anything (a script is refused at its first write), and the same call may
succeed later."""

# redis-py turns some codes into classes and drops the code from the message; by class name,
# so that a redis-py release without one of them still loads this module.
_BUSY_CLASSES = {
    "MasterDownError": "MASTERDOWN",  # before ClusterDownError, its base class
    "ClusterDownError": "CLUSTERDOWN",
    "OutOfMemoryError": "OOM",
    "BusyLoadingError": "LOADING",
    "ReadOnlyError": "READONLY",
    "TryAgainError": "TRYAGAIN",
}

# A pool of a redis= client that is full: this process's load, never Redis's failure.
_POOL_FULL = ("MaxConnectionsError",)
_POOL_FULL_TEXT = ("Too many connections", "No connection available")

LOAD_DEADLINE = 30.0
"""Seconds a call keeps retrying timeouts while Redis answers this client's other calls."""

FIRST_WAIT = 0.05
"""Seconds (plus up to as much again, at random) between the first attempt and the second."""


# redis-py's cluster clients follow MOVED, ASK and TRYAGAIN replies up to a TTL (16 hops),
# then raise this. Each hop was a redirection or a "try again", so the call ran nowhere: while
# a slot migrates (resharding), or while the nodes disagree about its owner, it is "not now".
_REDIRECTIONS_EXHAUSTED = "TTL exhausted"


def busy_code(exc: BaseException) -> str | None:
    """The code of a "not now" error reply (:data:`BUSY_CODES`), else None."""
    for cls in type(exc).__mro__:
        if cls.__name__ in _BUSY_CLASSES:
            return _BUSY_CLASSES[cls.__name__]
    if isinstance(exc, rx.ClusterError) and str(exc).startswith(_REDIRECTIONS_EXHAUSTED):
        return "TRYAGAIN"
    if isinstance(exc, rx.ResponseError):
        first = str(exc).split(" ", 1)[0]
        if first in BUSY_CODES:
            return first
    return None


def pool_full(exc: BaseException) -> bool:
    """A redis= client's own connection pool had no connection to give."""
    return isinstance(exc, rx.ConnectionError) and (
        type(exc).__name__ in _POOL_FULL or str(exc).startswith(_POOL_FULL_TEXT)
    )


def unreachable(exc: BaseException) -> bool:
    """Redis could not be reached or did not answer in time: the call is in doubt."""
    if isinstance(exc, rx.AuthenticationError | rx.AuthorizationError):
        return False
    if busy_code(exc) is not None or pool_full(exc):
        return False
    return isinstance(exc, rx.ConnectionError | rx.TimeoutError | TimeoutError)


def is_transient(exc: BaseException) -> bool:
    """A failure where the same request, sent again, may succeed."""
    return unreachable(exc) or busy_code(exc) is not None or pool_full(exc)


def _refused(exc: BaseException) -> bool:
    """The connection was refused or lost, not timed out: a server that died, not one that is
    slow (a slow one must never be replaced)."""
    return unreachable(exc) and not isinstance(exc, rx.TimeoutError | TimeoutError)


def _answered(exc: BaseException) -> bool:
    """Redis itself answered (an error reply is an answer: Redis is there)."""
    return isinstance(exc, rx.ResponseError) or busy_code(exc) is not None


def translate(exc: Exception) -> AgentBillError:
    """The agentbill error for a redis-py (or socket) error. Callers ``raise ... from exc``."""
    if isinstance(exc, rx.ResponseError):
        message = str(exc)
        for code, spec in CONTRACT["errors"].items():
            mark = f"AGENTBILL {code}"
            if mark in message:
                # An error without a field of its own names it after the code.
                field = spec["field"] or message.split(mark, 1)[1].split()[0]
                return InvalidRequestError(field, spec["message"])
    if isinstance(exc, rx.MovedError):
        # Only a plain connection sees MOVED: a cluster client follows it. Nothing ran.
        return InvalidRequestError("redis_url", CLUSTER_HINT)
    code = busy_code(exc)
    if code is not None:
        return StoreBusyError(f"Redis cannot run the call now ({code}): {exc}", code)
    if no_functions(exc):
        return StoreError(
            f"agentbill needs {VERSION_FLOOR}: this server has no Functions (FCALL,"
            f" FUNCTION LOAD); it answered: {exc}"
        )
    if isinstance(exc, rx.ResponseError):
        return StoreError(f"Redis refused the command: {exc}")
    if isinstance(exc, rx.AuthenticationError | rx.AuthorizationError):
        # redis-py's message is the server's ("invalid username-password pair or user is
        # disabled"): it never holds the password.
        return AuthenticationError(f"Redis refused the credentials: {exc}")
    if is_transient(exc):
        return StoreUnavailableError(f"Redis is unavailable: {type(exc).__name__}: {exc}")
    return StoreError(f"Redis error: {type(exc).__name__}: {exc}")


# -- what the client knows of Redis --------------------------------------------------------------


class Health:
    """Whether Redis is answering this client, as its calls see it (one per client, process).

    Every reply (an error reply too) marks Redis as answering. A transport failure while Redis
    has answered none of this client's calls for ``quiet`` seconds marks it *down*: the
    failure is kept in :attr:`down` and every waiter for a slot is told at once. The next reply
    clears it. With ``enabled`` False (Redis Cluster, where one node can be down while the
    others answer) nothing is ever marked down and timeouts are never taken for load.
    """

    def __init__(self, quiet: float, enabled: bool = True) -> None:
        self.quiet = quiet if enabled else 0.0
        self.enabled = enabled
        self.last_answer = -math.inf
        self.down: BaseException | None = None
        self._on_down: list[Callable[[], None]] = []

    def on_down(self, callback: Callable[[], None]) -> None:
        self._on_down.append(callback)

    def answered(self) -> None:
        self.last_answer = time.monotonic()
        self.down = None

    def answering(self) -> bool:
        """Whether Redis answered one of this client's calls within the last ``quiet`` s."""
        return time.monotonic() - self.last_answer < self.quiet

    def failed(self, exc: BaseException) -> None:
        if self.enabled and not self.answering():
            self.down = exc
            for callback in self._on_down:
                callback()


def _down_now(down: BaseException) -> Exception:
    """What a call waiting for a slot raises while Redis is down (translated like any redis-py
    error: StoreUnavailableError, from this)."""
    text = f"Redis did not answer this client's last call ({down}); not waiting for it"
    error: Exception = (
        rx.TimeoutError(text) if isinstance(down, rx.TimeoutError | TimeoutError) else
        rx.ConnectionError(text)
    )  # fmt: skip
    error.__cause__ = down
    return error


class Slots:
    """At most ``size`` of a sync client's calls talk to Redis at once; the others wait for a
    slot (their own load, never a failure), or fail at once while Redis is down."""

    def __init__(self, size: int, health: Health) -> None:
        self.size = size
        self._health = health
        self._free = size
        self._cond = threading.Condition()
        health.on_down(self._wake_all)
        reset_at_fork(self)

    def _after_fork(self) -> None:
        self._free = self.size  # the child has none of its parent's calls in flight
        self._cond = threading.Condition()

    def acquire(self) -> None:
        with self._cond:
            waited = False
            while True:
                down = self._health.down
                if down is not None and (waited or self._free == 0):
                    # A call that finds a slot free still tries (Redis may be back); one
                    # that had to wait would only queue behind attempts that time out.
                    raise _down_now(down)
                if self._free > 0:
                    break
                waited = True
                self._cond.wait()
            self._free -= 1

    def release(self) -> None:
        with self._cond:
            self._free += 1
            self._cond.notify()

    def _wake_all(self) -> None:
        with self._cond:
            self._cond.notify_all()


class AsyncSlots:
    """:class:`Slots` for an async client's tasks, first come first served. A task cancelled
    while waiting leaves the line; one cancelled just as it was handed a slot passes it on."""

    def __init__(self, size: int, health: Health) -> None:
        self.size = size
        self._health = health
        self._free = size
        self._waiters: deque[asyncio.Future[None]] = deque()
        health.on_down(self._fail_waiters)
        reset_at_fork(self)

    def _after_fork(self) -> None:
        self._free = self.size
        self._waiters = deque()

    async def acquire(self) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        down = self._health.down
        if down is not None:
            raise _down_now(down)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release()  # handed a slot as it was cancelled
            else:
                with suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        if self._health.down is not None:
            self._fail_waiters()  # they had to wait: see Slots.acquire
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes straight to it
                return
        self._free += 1

    def _fail_waiters(self) -> None:
        down = self._health.down
        if down is None:
            return
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(_down_now(down))


class LoopWatch:
    """How long an event loop was blocked lately: by its own tasks' work between two of its
    iterations, or by the OS not running the process. A timeout that expired while the loop
    could not read the reply is no sign of a silent Redis. While calls are in flight, a
    callback every :attr:`TICK` seconds notes how late it ran."""

    TICK = 0.05
    KEEP = 120.0  # seconds of stalls remembered: longer than any attempt

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.users = 0
        self._ticking = False
        self._due = math.inf  # when the pending tick should run
        self._stalls: deque[tuple[float, float]] = deque()  # (when it ended, how long)

    def enter(self) -> None:
        self.users += 1
        if not self._ticking:
            self._ticking = True
            self._schedule()

    def leave(self) -> None:
        self.users -= 1

    def _schedule(self) -> None:
        self._due = time.monotonic() + self.TICK
        self.loop.call_later(self.TICK, self._tick, self._due)

    def _tick(self, due: float) -> None:
        now = time.monotonic()
        self._due = math.inf
        if now - due > self.TICK / 2:
            self._stalls.append((now, now - due))
        while self._stalls and self._stalls[0][0] < now - self.KEEP:
            self._stalls.popleft()
        if self.users > 0:
            self._schedule()
        else:
            self._ticking = False

    def stalled(self, start: float, end: float) -> float:
        """Seconds of [start, end] the loop was blocked, as far as its ticks saw; the tick
        still waiting to run (an iteration runs its callbacks before its due timers) counts
        as blocked since it was due."""
        stalls = list(self._stalls)
        now = time.monotonic()
        if now - self._due > self.TICK / 2:
            stalls.append((now, now - self._due))
        return sum(max(0.0, min(end, ended) - max(start, ended - n)) for ended, n in stalls)


# -- the policy ----------------------------------------------------------------------------------


class _Attempts:
    """One call's attempts: what they saw, and what tenacity needs for the ones after the
    first."""

    def __init__(self, policy: RetryPolicy, watch: LoopWatch | None = None) -> None:
        self.policy = policy
        self.watch = watch
        self.started = self.attempt_started = time.monotonic()
        self.doubt: Exception | None = None
        """The last failure after which the call may have run."""
        self.heal = False
        """The last attempt's connection was refused: try to revive the local server first."""
        self.stalled = False
        """The last attempt timed out while this process's event loop was blocked."""

    def begin(self) -> None:
        self.attempt_started = time.monotonic()

    def saw(self, exc: Exception | None) -> None:
        health = self.policy.health
        self.stalled = False
        if exc is None or _answered(exc):
            health.answered()
        elif unreachable(exc):
            self.doubt = exc
            self.heal = self.policy.heal is not None and _refused(exc)
            if not _refused(exc) and self._blocked_loop():
                self.stalled = True  # a timeout of our own making: not Redis's failure
            else:
                health.failed(exc)

    def _blocked_loop(self) -> bool:
        """The event loop was blocked for half of the attempt or more (async clients)."""
        if self.watch is None or not self.policy.health.enabled:
            return False
        start, end = self.attempt_started, time.monotonic()
        return self.watch.stalled(start, end) >= (end - start) / 2

    def left(self) -> float:
        return self.policy.deadline - (time.monotonic() - self.started)

    def _load(self, exc: BaseException | None) -> bool:
        """Redis answers this client's other calls, so this failure is the client's own load:
        retried beyond the usual attempts and deadline, up to LOAD_DEADLINE."""
        if exc is None or not (unreachable(exc) or pool_full(exc)):
            return False
        if time.monotonic() - self.started >= LOAD_DEADLINE:
            return False
        return pool_full(exc) or self.stalled or self.policy.health.answering()

    def give_up_at_once(self, exc: Exception) -> bool:
        if not is_transient(exc):
            return True
        if self._load(exc):
            return False
        return self.policy.attempts < 2 or self.left() <= 0

    def stop(self, state: RetryCallState) -> bool:
        """tenacity's stop: after the first attempt, ``attempts - 1`` more within what is
        left of the deadline, unless the failures are this client's own load."""
        exc = state.outcome.exception() if state.outcome is not None else None
        if self._load(exc):
            return False
        return state.attempt_number >= self.policy.attempts - 1 or self.left() <= 0

    def settings(self) -> dict[str, object]:
        return {
            "retry": retry_if_exception(is_transient),
            "stop": self.stop,
            "wait": wait_exponential(multiplier=0.05, max=0.5) + wait_random(0, 0.05),
            "reraise": True,
        }

    def outcome(self, exc: Exception) -> Exception:
        """The error the call ends with: a busy reply after an attempt in doubt is in doubt
        too (StoreBusyError promises that nothing was written)."""
        if busy_code(exc) is not None and self.doubt is not None:
            return self.doubt
        return exc


class RetryPolicy:
    """At most ``attempts`` attempts within ``deadline`` seconds, for transient failures only;
    at most ``connections`` calls at once (see the module docstring).

    The first attempt is a plain call: the retry machinery (tenacity) is built only after a
    transient failure, with what is left of the attempts and of the deadline, so the common
    case pays nothing for it. The deadline is checked after each failed attempt, so with the
    default 1 s socket timeout and 1 s deadline a server that never answers costs one attempt
    (about 1 s in all), and a refused connection is tried three times within that second.
    ``heal`` (clients of the embedded server) runs before the attempt after a refused one.
    """

    def __init__(
        self,
        attempts: int,
        deadline: float,
        *,
        connections: int = 50,
        quiet: float = 0.5,
        watch_health: bool = True,
        heal: Heal | None = None,
    ) -> None:
        self.attempts = attempts
        self.deadline = deadline
        self.heal = heal
        self.health = Health(quiet, enabled=watch_health)
        self.slots = Slots(connections, self.health)
        self.async_slots = AsyncSlots(connections, self.health)
        self._watch: LoopWatch | None = None

    def call(self, fn: Callable[[], T]) -> T:
        """``fn`` under the retry policy, in a slot, with SIGINT held back until it is done
        (see ``agentbill._interrupts``)."""
        with interrupts_held():
            self.slots.acquire()
            try:
                return self._attempts(fn)
            finally:
                self.slots.release()

    def _attempts(self, fn: Callable[[], T]) -> T:
        run = _Attempts(self)

        def attempt() -> T:
            if run.heal and self.heal is not None:
                run.heal = False
                self.heal(max(run.left(), self.deadline / 2))
            run.begin()
            try:
                result = fn()
            except Exception as exc:
                run.saw(exc)
                raise
            run.saw(None)
            return result

        try:
            try:
                return attempt()
            except Exception as exc:
                if run.give_up_at_once(exc):
                    raise
            time.sleep(FIRST_WAIT + random.uniform(0, FIRST_WAIT))
            return Retrying(**run.settings())(attempt)  # type: ignore[arg-type]
        except Exception as exc:
            final = run.outcome(exc)
            if final is exc:
                raise
            raise final from exc

    async def acall(self, fn: Callable[[], Awaitable[T]]) -> T:
        await self.async_slots.acquire()
        try:
            # Let the tasks that are ready run first: when many calls start at once, their own
            # work (planning, queueing) would otherwise run inside this call's connect and
            # read timeouts, and a loop busy with its callers is not a silent Redis.
            await asyncio.sleep(0)
            watch = self._loop_watch()
            watch.enter()
            try:
                return await self._async_attempts(fn, watch)
            finally:
                watch.leave()
        finally:
            self.async_slots.release()

    async def _async_attempts(self, fn: Callable[[], Awaitable[T]], watch: LoopWatch) -> T:
        run = _Attempts(self, watch)

        async def attempt() -> T:  # a coroutine function, so tenacity awaits it
            if run.heal and self.heal is not None:
                run.heal = False
                await asyncio.to_thread(self.heal, max(run.left(), self.deadline / 2))
            run.begin()
            try:
                result = await fn()
            except Exception as exc:
                run.saw(exc)
                raise
            run.saw(None)
            return result

        try:
            try:
                return await attempt()
            except Exception as exc:
                if run.give_up_at_once(exc):
                    raise
            await asyncio.sleep(FIRST_WAIT + random.uniform(0, FIRST_WAIT))
            return await AsyncRetrying(**run.settings())(attempt)  # type: ignore[arg-type]
        except Exception as exc:
            final = run.outcome(exc)
            if final is exc:
                raise
            raise final from exc

    def _loop_watch(self) -> LoopWatch:
        loop = asyncio.get_running_loop()
        if self._watch is None or self._watch.loop is not loop:
            self._watch = LoopWatch(loop)
        return self._watch


# -- the error boundary --------------------------------------------------------------------------


@contextmanager
def translated() -> Iterator[None]:
    """The one boundary: a redis-py (or socket) error raised in the block leaves it as its
    agentbill error (:func:`translate`), ``from`` the original. A plain context manager, so it
    works around awaits too (``with translated(): await ...``)."""
    try:
        yield
    except (rx.RedisError, OSError) as exc:
        raise translate(exc) from exc
