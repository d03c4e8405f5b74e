"""The round trips of a metered call: preflight before it, record or release after it.

One :class:`Meter` per wrapped client (``SyncMeter`` / ``AsyncMeter``, twins). A call's
reservation is a ticket, settled exactly once:

- the SDK method raised (an API error, a timeout, cancellation): released;
- it returned a parsed response: recorded from its ``usage`` at once;
- it returned a stream (or a raw response not read yet): recorded when the HTTP response is
  closed, which the SDKs do when the stream ends, is closed, or its ``with`` block exits; the
  wrapper also closes it when a ``for`` loop over it is broken out of or cancelled. Usage is
  read from the bytes as they pass (see ``_usage``); a stream closed before its usage arrived
  is charged the reservation;
- a stream dropped without being closed (never read: an early return, an exception before
  the loop, a raw response never parsed): charged the reservation when its HTTP response is
  garbage-collected (see :class:`Dropped`): the request was sent.

The call owns its reservation as a gate does (``agentbill._gate``): it is unadoptable and not
in the client's book of its own reservations, so a record without an id, from this client or
any other, never closes it; and it is settled through the client's ``_settle_surely``, so a
record or release Redis cannot take now (busy, out of memory, unreachable or silent) is queued
and delivered once, in the background, whatever the outage policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sys
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from functools import cache
from types import ModuleType
from typing import Any, Protocol

from agentbill._core import Plan
from agentbill._fork import reset_at_fork
from agentbill._gate import (
    GateClient,
    SyncGateClient,
    _close,
    _close_async,
    _release_quietly,
    _release_quietly_async,
)
from agentbill._results import Settlement
from agentbill.llm._plan import CallPlan, Settings, charge
from agentbill.llm._usage import EventSplitter, Tally

logger = logging.getLogger("agentbill")


class Reader:
    """Watches a response body as it passes: SSE events, or a whole JSON body."""

    def __init__(self, tally: Tally, response: Any) -> None:
        self.tally = tally
        encoding = response.headers.get("content-encoding", "identity").lower()
        # A compressed body cannot be read as it passes: it goes through untouched and,
        # its usage unseen, the call is charged its reservation.
        self._readable = encoding in ("", "identity")
        kind = response.headers.get("content-type", "")
        self._events = EventSplitter(tally) if kind.startswith("text/event-stream") else None
        self._body: list[bytes] = []

    def feed(self, chunk: bytes) -> bytes:
        if not self._readable:
            return chunk
        if self._events is not None:
            return self._events.feed(chunk)
        self._body.append(chunk)
        return chunk

    def finish(self) -> bytes:
        if not self._readable:
            return b""
        if self._events is not None:
            return self._events.finish()
        self.tally.feed_json(b"".join(self._body))
        return b""


class MeteredStream:
    """A response body that reports to its ticket when it is closed (mixed into the HTTP
    library's SyncByteStream: httpx2 for current SDKs, httpx for older ones)."""

    def __init__(self, inner: Any, reader: Reader, on_close: Callable[[], None]) -> None:
        self._inner = inner
        self._reader = reader
        self._on_close = on_close

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            if out := self._reader.feed(chunk):
                yield out
        if tail := self._reader.finish():
            yield tail

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._on_close()


class AsyncMeteredStream:
    """The async twin of :class:`MeteredStream` (mixed into AsyncByteStream)."""

    def __init__(self, inner: Any, reader: Reader, on_close: Callable[[], Awaitable[None]]) -> None:
        self._inner = inner
        self._reader = reader
        self._on_close = on_close

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            if out := self._reader.feed(chunk):
                yield out
        if tail := self._reader.finish():
            yield tail

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            await self._on_close()


HTTP_LIBRARIES = ("httpx2", "httpx")


def _library(obj: object) -> ModuleType | None:
    """httpx2 or httpx, if ``obj`` is one of their responses."""
    root = type(obj).__module__.partition(".")[0]
    module = sys.modules.get(root) if root in HTTP_LIBRARIES else None
    return module if module is not None and isinstance(obj, module.Response) else None


@cache
def _stream_class(library: ModuleType, is_async: bool) -> type:
    if is_async:
        return type("AsyncMeteredStream", (AsyncMeteredStream, library.AsyncByteStream), {})
    return type("MeteredStream", (MeteredStream, library.SyncByteStream), {})


def http_response(result: object) -> Any:
    """The HTTP response behind what an SDK method returned: a stream's ``response``, a raw
    response's ``http_response``; None for a parsed model."""
    for name in ("http_response", "response"):
        candidate = getattr(result, name, None)
        if candidate is not None and _library(candidate) is not None:
            return candidate
    return None


def read_body(response: Any) -> bytes | None:
    """The body if it was already read (a raw response of a non-streaming call), else None."""
    library = _library(response)
    assert library is not None
    try:
        content: bytes = response.content
    except library.ResponseNotRead:
        return None
    return content


def hook(response: Any, reader: Reader, on_close: Callable[[], object], is_async: bool) -> None:
    """Read ``response``'s body through ``reader`` as it passes; ``on_close`` when closed."""
    library = _library(response)
    assert library is not None
    response.stream = _stream_class(library, is_async)(response.stream, reader, on_close)


def model_body(result: object) -> object:
    """A parsed response's ``model``, ``usage`` and ``service_tier`` as plain JSON."""
    dump = getattr(result, "model_dump", None)
    if not callable(dump):
        return None
    # warnings=False: the SDKs build responses without validating them, so a count a
    # provider wrote as a float or a string would make pydantic warn; read_usage reads it.
    return dump(mode="json", include={"model", "usage", "service_tier"}, warnings=False)


def _sync_iter_class(cls: type[Any]) -> type:
    def __iter__(self: Any) -> Iterator[object]:
        try:
            yield from cls.__iter__(self)
        finally:  # exhausted, broken out of, or abandoned: the response is done with
            self.close()

    return type(cls.__name__, (cls,), {"__iter__": __iter__, "__qualname__": cls.__qualname__})


def _async_iter_class(cls: type[Any]) -> type:
    async def __aiter__(self: Any) -> AsyncIterator[object]:
        try:
            async for item in cls.__aiter__(self):
                yield item
        finally:  # exhausted, broken out of, or cancelled
            await self.close()

    return type(cls.__name__, (cls,), {"__aiter__": __aiter__, "__qualname__": cls.__qualname__})


_CLOSING: dict[type, type] = {}


def close_when_left(stream: object) -> None:
    """Make a ``for`` / ``async for`` loop over an SDK stream close it when the loop ends in
    any way, so a loop that breaks out settles the call at once (a stream is then done: the
    SDKs give no way to resume one after its connection is closed)."""
    cls = type(stream)
    if cls in _CLOSING.values():
        return
    if cls not in _CLOSING:
        if hasattr(cls, "__aiter__"):
            _CLOSING[cls] = _async_iter_class(cls)
        elif hasattr(cls, "__iter__"):
            _CLOSING[cls] = _sync_iter_class(cls)
        else:
            return
    stream.__class__ = _CLOSING[cls]


class Dropped:
    """Tickets of streams whose HTTP response was garbage-collected unclosed: settled off the
    collector. A ``weakref.finalize`` on the response only puts the ticket on a
    ``queue.SimpleQueue`` (safe to call from a finalizer, which may run inside any code, locks
    held, on an event loop); a daemon thread takes it and queues its record of the reservation
    through the client's background delivery (``_settle_later``: delivered once, keeping its
    request id), never a round trip of its own. A response still referenced when the process
    exits is not covered (its reservation expires at its TTL)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        reset_at_fork(self)

    def _after_fork(self) -> None:
        self._queue = queue.SimpleQueue()
        self._thread = None
        self._lock = threading.Lock()

    def watch(self, response: Any, ticket: Any) -> None:
        """Settle ``ticket`` if ``response`` is collected before the ticket is settled."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="agentbill-dropped", daemon=True
                )
                self._thread.start()
        finalizer = weakref.finalize(response, self._queue.put, ticket)
        finalizer.atexit = False

    def _loop(self) -> None:
        q = self._queue
        while True:
            ticket = q.get()
            try:
                ticket.settle_dropped()
            except Exception:  # never let the thread die: later drops would go unsettled
                logger.exception("agentbill: could not queue a dropped stream's record")


DROPPED = Dropped()


def _queue_record(ticket: Any, loop: asyncio.AbstractEventLoop | None) -> None:
    """A dropped stream's record (what its tally holds: the reservation when its usage never
    arrived), queued for the client's background delivery; with an async client, its delivery
    task is woken on ``loop``."""
    if ticket._done:
        return
    ticket._done = True
    units, metadata = charge(ticket._settings, ticket._plan, ticket._tally)
    check = ticket._check
    client = ticket._client
    plan = client._plan_close(
        check.reservation_id,
        units,
        check.agent_id,
        check.customer_id,
        check.task_ref,
        metadata={**metadata, "dropped": True},
        model=ticket._plan.request.model,
    )
    client._settle_later(plan)
    if loop is not None and not loop.is_closed():
        with contextlib.suppress(RuntimeError):  # closed meanwhile: the exit delivery takes it
            loop.call_soon_threadsafe(client._flusher.wake)


class Wakes(Protocol):
    def wake(self) -> None: ...


class QueuesRecords(Protocol):
    """What a dropped stream's record needs of either client: queued for its background
    delivery, without I/O of its own (see :class:`Dropped`)."""

    @property
    def _flusher(self) -> Wakes: ...

    def _plan_close(
        self,
        reservation_id: str,
        units: int | None,
        agent_id: str,
        customer_id: str | None,
        task_ref: str | None,
        *,
        metadata: dict[str, Any] | None = None,
        model: str | None = None,
    ) -> Plan[Settlement]: ...

    def _settle_later(self, plan: Plan[Settlement]) -> Settlement: ...


class TicketClient(GateClient, QueuesRecords, Protocol):
    """What a ticket calls on either client (this package sits below both)."""


class SyncTicketClient(SyncGateClient, QueuesRecords, Protocol):
    """What a :class:`SyncTicket` calls on AgentBillClient."""


class SyncTicket:
    """One call's reservation, with AgentBillClient: settled exactly once, as a gate settles
    (see ``agentbill._gate``): surely, so that a record or release Redis cannot take now is
    queued and delivered later, never lost, and with SIGINT held until it is done."""

    def __init__(
        self, client: SyncTicketClient, settings: Settings, plan: CallPlan, check: Any
    ) -> None:
        self._client = client
        self._settings = settings
        self._plan = plan
        self._check = check
        self._done = False
        self._tally: Tally = plan.tally()

    def settle_dropped(self) -> None:
        """Its stream's response was collected unclosed (see :class:`Dropped`)."""
        _queue_record(self, None)

    def record(self, tally: Tally) -> None:
        if self._done:
            return
        self._done = True
        units, metadata = charge(self._settings, self._plan, tally)
        model = self._plan.request.model
        _close(self._client, self._check, units, metadata=metadata, model=model)

    def release(self) -> None:
        """After the call raised: never hides the call's own exception."""
        if self._done:
            return
        self._done = True
        _release_quietly(self._client, self._check)

    def attach(self, result: object) -> object:
        """Record now (a parsed response), or when the response closes (a stream), or when it
        is collected unclosed (a stream dropped)."""
        tally = self._tally
        response = http_response(result)
        if response is None:
            tally.feed_body(model_body(result))
            self.record(tally)
            return result
        body = read_body(response)
        if body is not None:
            _finish_read(tally, response, body)
            self.record(tally)
            return result
        hook(response, Reader(tally, response), lambda: self.record(tally), is_async=False)
        close_when_left(result)
        DROPPED.watch(response, self)
        return result


class AsyncTicket:
    """The async twin of :class:`SyncTicket`; its record or release runs to its end even when
    the task that awaits it is cancelled (the cancel is raised once it is done)."""

    def __init__(
        self, client: TicketClient, settings: Settings, plan: CallPlan, check: Any
    ) -> None:
        self._client = client
        self._settings = settings
        self._plan = plan
        self._check = check
        self._done = False
        self._tally: Tally = plan.tally()
        self._loop: asyncio.AbstractEventLoop | None = None

    def settle_dropped(self) -> None:
        """Its stream's response was collected unclosed (see :class:`Dropped`)."""
        _queue_record(self, self._loop)

    async def record(self, tally: Tally) -> None:
        if self._done:
            return
        self._done = True
        units, metadata = charge(self._settings, self._plan, tally)
        model = self._plan.request.model
        await _close_async(self._client, self._check, units, metadata=metadata, model=model)

    async def release(self) -> None:
        if self._done:
            return
        self._done = True
        await _release_quietly_async(self._client, self._check)

    async def attach(self, result: object) -> object:
        tally = self._tally
        response = http_response(result)
        if response is None:
            tally.feed_body(model_body(result))
            await self.record(tally)
            return result
        body = read_body(response)
        if body is not None:
            _finish_read(tally, response, body)
            await self.record(tally)
            return result

        async def on_close() -> None:
            await self.record(tally)

        hook(response, Reader(tally, response), on_close, is_async=True)
        close_when_left(result)
        self._loop = asyncio.get_running_loop()
        DROPPED.watch(response, self)
        return result


def _finish_read(tally: Tally, response: Any, body: bytes) -> None:
    """Feed a body httpx already read (and decoded) whole."""
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        splitter = EventSplitter(tally)
        splitter.feed(body)
        splitter.finish()
    else:
        tally.feed_json(body)
