"""Worker metrics (prometheus-client) and traces (OpenTelemetry) for both clients.

A client gets its telemetry from :func:`instrument`, the last line of its constructor:

- **Off** (the default: ``metrics=False`` and OpenTelemetry not configured): :data:`OFF`, whose
  hooks do nothing. Neither prometheus_client nor opentelemetry is imported.
- **Metrics** (``metrics=True`` for prometheus-client's default registry, or a
  ``CollectorRegistry``): counters shared by every client of that registry (see ``_Metrics``).
- **Traces**: when the application has imported ``opentelemetry.trace`` and set a tracer
  provider before creating the client (agentbill never configures OpenTelemetry itself), every
  public operation is a span ``agentbill.<operation>``, with each Redis round trip a child span
  ``agentbill.redis``; so are the preflights and settlements of gates, run blocks, job runs and
  lease slices (see :data:`INTERNAL`).

Both need only what the clients already have: the public operations, the internal ones of
:data:`INTERNAL` and the round trip (``_send``, ``_send_batch``) are wrapped on the instance,
so a client without telemetry runs exactly its own code; and the client tells
:meth:`Telemetry.observe` every result Redis decided (its ``_notify``, which also sees
settlements delivered from a queue) and every decision its outage policy made alone
(``_offline_check``). Customer ids appear in metric labels only with
``metrics_customers=True`` (cardinality), and in spans only with ``trace_customers=True``.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from agentbill._check import BaseCheck
from agentbill._exceptions import (
    AgentBillError,
    AuthenticationError,
    InvalidRequestError,
    StoreError,
    StoreUnavailableError,
)
from agentbill._install import pip_install
from agentbill._results import Settlement
from agentbill._version import __version__

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer
    from prometheus_client import CollectorRegistry

OPERATIONS = (
    "preflight",
    "preflight_many",
    "record",
    "release",
    "flush",
    "set_budget",
    "set_rate_limit",
    "set_concurrency_limit",
    "get_budget",
    "get_usage",
    "events",
    "open_task",
    "get_task",
)
"""The public operations that are spans ``agentbill.<name>``."""

INTERNAL = ("_preflight", "_settle_surely")
"""The client methods through which a gate, a run block, a job run and a lease's slice make
their preflight and their record or release (never the public ones): spans
``agentbill.preflight``, ``agentbill.record`` or ``agentbill.release`` too, unless a public
operation's span is already open (``preflight`` calls ``_preflight``)."""

ROUND_TRIPS = ("_send", "_send_batch")
"""The client methods that make one Redis round trip (with its retries)."""

DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
"""Seconds: a preflight takes well under a millisecond on a LAN, about a second at most when
Redis is down (the client's bound)."""

METRICS_EXTRA = pip_install("metrics")

logger = logging.getLogger("agentbill")


class Telemetry:
    """A client's telemetry. This base does nothing: it is what a client without metrics or
    traces has (:data:`OFF`)."""

    def observe(self, result: object) -> None:
        """A result Redis decided (or the outage policy, offline): counted in the metrics."""


OFF = Telemetry()


def store_error_kind(exc: BaseException) -> str | None:
    """The ``kind`` label of a failure talking to Redis; None for anything else (a bad request
    is not a store error)."""
    if isinstance(exc, StoreUnavailableError):
        return "unavailable"
    if isinstance(exc, AuthenticationError):
        return "auth"
    if isinstance(exc, StoreError):
        return "error"
    return None


# -- metrics -------------------------------------------------------------------------------------


class _Metrics:
    """agentbill's metrics in one registry, shared by every client that uses that registry
    (prometheus-client refuses to register a name twice). ``customers``: whether the preflight
    counters carry a ``customer`` label; every client of the registry must agree."""

    def __init__(self, registry: CollectorRegistry, customers: bool) -> None:
        from prometheus_client import Counter, Gauge, Histogram, values

        self.customers = customers
        # prometheus-client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, for pre-fork
        # servers) reads each process's values from files: a gauge computed when scraped
        # would always read 0 there, so the queue gauge is written as the queue changes.
        self.multiprocess = values.ValueClass is not values.MutexValue
        who = ("customer",) if customers else ()
        self.preflights = Counter(
            "agentbill_preflights",
            "Preflight decisions, by outcome (approved, or the refusal's reason) and by the "
            "refusing scope.",
            ("outcome", "scope", *who),
            registry=registry,
        )
        self.duration = Histogram(
            "agentbill_preflight_duration_seconds",
            "Seconds a preflight took (a preflight() call, a gate's, a run block's, a lease "
            "slice's), retries and outage decision included.",
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.reserved = Counter(
            "agentbill_units_reserved",
            "Estimates of approved preflights (offline approvals included, replays not).",
            who,
            registry=registry,
        )
        self.charged = Counter(
            "agentbill_units_charged",
            "Units charged by settlements Redis applied (replays not counted again).",
            registry=registry,
        )
        self.settlements = Counter(
            "agentbill_settlements",
            "Records and releases Redis applied, by status (a queued one is counted when it "
            "is delivered).",
            ("status",),
            registry=registry,
        )
        self.store_errors = Counter(
            "agentbill_store_errors",
            "Round trips that failed after the client's retries, by kind (unavailable, auth, "
            "error).",
            ("kind",),
            registry=registry,
        )
        self.offline = Counter(
            "agentbill_offline_approvals",
            "Runs approved by the outage policy while Redis was unreachable.",
            registry=registry,
        )
        self.queued = Gauge(
            "agentbill_queued_settlements",
            "Records and releases waiting for Redis (an outage's, or background_settle's).",
            registry=registry,
            multiprocess_mode="livesum",  # the live processes' queues, added up
        )
        self._clients: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()
        if not self.multiprocess:
            self.queued.set_function(self._queued)

    def add(self, client: Any) -> None:
        with self._lock:
            self._clients.add(client)
        if self.multiprocess:
            # Wrapped on this client's ledger only: the queue changes there and nowhere else.
            ledger = client._outage
            for name in ("enqueue", "finish"):
                setattr(ledger, name, self._writing_queued(getattr(ledger, name)))

    def _writing_queued(self, method: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(method)
        def changed(*args: Any, **kwargs: Any) -> None:
            try:
                method(*args, **kwargs)
            finally:
                self.queued.set(self._queued())

        return changed

    def _queued(self) -> float:
        with self._lock:
            clients = list(self._clients)
        return float(sum(c.outage_stats.queued for c in clients))


_REGISTRIES: weakref.WeakKeyDictionary[Any, _Metrics] = weakref.WeakKeyDictionary()
_REGISTRIES_LOCK = threading.Lock()


def _metrics_for(metrics: object, customers: bool) -> _Metrics:
    """The metrics of the registry ``metrics`` names (True: prometheus-client's default)."""
    try:
        import prometheus_client
    except ImportError:
        raise InvalidRequestError("metrics", f"needs prometheus-client: {METRICS_EXTRA}") from None
    if metrics is True:
        registry = prometheus_client.REGISTRY
    elif isinstance(metrics, prometheus_client.CollectorRegistry):
        registry = metrics
    else:
        raise InvalidRequestError(
            "metrics", "must be a bool or a prometheus_client CollectorRegistry"
        )
    with _REGISTRIES_LOCK:
        found = _REGISTRIES.get(registry)
        if found is None:
            found = _REGISTRIES[registry] = _Metrics(registry, customers)
        elif found.customers != customers:
            raise InvalidRequestError(
                "metrics_customers",
                f"another client registered agentbill's metrics in this registry with "
                f"metrics_customers={found.customers}; give every client of a registry the same",
            )
    return found


# -- traces --------------------------------------------------------------------------------------


def configured_tracer() -> Tracer | None:
    """agentbill's tracer if the application set up OpenTelemetry, else None (and nothing is
    imported: an application that configured it has imported ``opentelemetry.trace``)."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    tracer: Tracer = provider.get_tracer("agentbill", __version__)
    return tracer


_IN_OPERATION: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "agentbill_in_operation", default=False
)
"""True inside an operation's span: the internal methods it calls make no span of their own."""

_ARGUMENTS = {
    # operation: its positional parameters, in order (keyword ones are read by name)
    "preflight": ("agent_id", "estimated_units", "customer_id"),
    "record": ("agent_id", "units", "customer_id"),
    "release": ("reservation_id",),
    "set_budget": ("customer_id", "limit"),
    "set_rate_limit": ("customer_id", "units", "per_seconds"),
    "set_concurrency_limit": ("customer_id", "max_in_flight"),
    "get_budget": ("customer_id",),
    "get_usage": ("customer_id",),
    "events": ("customer_id",),
    "open_task": ("task_ref", "ceiling", "customer_id"),
    "get_task": ("task_ref", "customer_id"),
    "_settle_surely": ("reservation_id", "units", "agent_id", "customer_id", "task_ref"),
}


def _call_attributes(
    name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any], customers: bool
) -> dict[str, Any]:
    """A span's attributes from the call's arguments (ids and units only, never metadata)."""
    given = dict(zip(_ARGUMENTS.get(name, ()), args, strict=False)) | dict(kwargs)
    attributes: dict[str, Any] = {}
    if isinstance(given.get("agent_id"), str):
        attributes["agentbill.agent_id"] = given["agent_id"]
    for key in ("estimated_units", "units"):
        if isinstance(given.get(key), int) and not isinstance(given[key], bool):
            attributes["agentbill.units"] = given[key]
    if isinstance(given.get("reservation_id"), str):
        attributes["agentbill.reservation_id"] = given["reservation_id"]
    if name == "preflight_many" and args:
        requests = args[0]
        if isinstance(requests, list | tuple):
            attributes["agentbill.batch_size"] = len(requests)
    if customers and isinstance(given.get("customer_id"), str):
        attributes["agentbill.customer_id"] = given["customer_id"]
    return attributes


def _result_attributes(result: object, customers: bool) -> dict[str, Any]:
    """A span's attributes from what the operation returned."""
    if isinstance(result, BaseCheck):
        attributes: dict[str, Any] = {
            "agentbill.agent_id": result.agent_id,
            "agentbill.units": result.estimated_units,
            "agentbill.approved": result.approved,
            "agentbill.offline": result.offline,
            "agentbill.replayed": result.replayed,
        }
        if result.reason is not None:
            attributes["agentbill.reason"] = result.reason
        if result.scope is not None:
            attributes["agentbill.scope"] = result.scope
        if result.reservation_id is not None:
            attributes["agentbill.reservation_id"] = result.reservation_id
        if customers:
            attributes["agentbill.customer_id"] = result.customer_id
        return attributes
    if isinstance(result, Settlement):
        return {
            "agentbill.status": result.status,
            "agentbill.charged": result.charged,
            "agentbill.released": result.released,
            "agentbill.replayed": result.replayed,
        }
    if isinstance(result, list) and result and all(isinstance(c, BaseCheck) for c in result):
        return {"agentbill.approved_count": sum(1 for c in result if c.approved)}
    return {}


# -- the active telemetry ------------------------------------------------------------------------


class _Active(Telemetry):
    """Metrics, traces, or both, for one client."""

    def __init__(
        self,
        namespace: str,
        metrics: _Metrics | None,
        tracer: Tracer | None,
        metrics_customers: bool,
        trace_customers: bool,
    ) -> None:
        self._namespace = namespace
        self._metrics = metrics
        self._tracer = tracer
        self._metrics_customers = metrics_customers
        self._trace_customers = trace_customers

    def observe(self, result: object) -> None:
        m = self._metrics
        if m is None:
            return
        try:
            self._count(m, result)
        except Exception:  # counting must never fail a run whose decision is made
            logger.exception("agentbill: could not count %r in the metrics", result)

    def _count(self, m: _Metrics, result: object) -> None:
        if isinstance(result, BaseCheck):
            who = (result.customer_id,) if self._metrics_customers else ()
            outcome = "approved" if result.approved else (result.reason or "refused")
            m.preflights.labels(outcome, result.scope or "", *who).inc()
            if result.approved and not result.replayed:
                (m.reserved.labels(*who) if who else m.reserved).inc(result.estimated_units)
                if result.offline:
                    m.offline.inc()
        elif isinstance(result, Settlement) and result.status != "queued":
            m.settlements.labels(result.status).inc()
            if result.charged and not result.replayed:
                m.charged.inc(result.charged)

    def failed(self, exc: BaseException) -> None:
        kind = store_error_kind(exc)
        if kind is not None and self._metrics is not None:
            self._metrics.store_errors.labels(kind).inc()

    @contextmanager
    def span(self, name: str, attributes: dict[str, Any]) -> Iterator[Span | None]:
        if self._tracer is None:
            yield None
            return
        attributes["agentbill.namespace"] = self._namespace
        with self._tracer.start_as_current_span(f"agentbill.{name}", attributes=attributes) as s:
            yield s

    @contextmanager
    def round_trip(self, what: str) -> Iterator[None]:
        """A Redis round trip: a child span of the operation's, and its failure counted."""
        try:
            if self._tracer is None or not _recording():
                yield
                return
            from opentelemetry.trace import SpanKind

            attributes = {
                "db.system": "redis",
                "db.operation.name": "FCALL",
                "agentbill.script": what,
            }
            with self._tracer.start_as_current_span(
                "agentbill.redis", kind=SpanKind.CLIENT, attributes=attributes
            ):
                yield
        except AgentBillError as exc:
            self.failed(exc)
            raise

    def operation(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        """``method`` (a bound public operation, or one of :data:`INTERNAL`) wrapped in its
        span, and a preflight timed. An internal method called inside an operation's span
        (``preflight`` calls ``_preflight``) runs as it is: one span, one timing."""
        internal = name in INTERNAL
        customers = self._trace_customers

        def span_name(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
            if name == "_settle_surely":  # units None: the reservation's release
                units = args[1] if len(args) > 1 else kwargs.get("units")
                return "release" if units is None else "record"
            return name.removeprefix("_")

        def begin(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
            if self._tracer is None or name == "_preflight":  # a Plan: read from its Check
                return {}
            return _call_attributes(name, args, kwargs, customers)

        def end(span: Span | None, result: object) -> None:
            if span is not None:
                span.set_attributes(_result_attributes(result, customers))

        @contextmanager
        def measured(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[Span | None]:
            what = span_name(args, kwargs)
            timed = self._metrics.duration if what == "preflight" and self._metrics else None
            started = time.perf_counter()
            entered = _IN_OPERATION.set(True)
            try:
                with self.span(what, begin(args, kwargs)) as span:
                    yield span
            finally:
                _IN_OPERATION.reset(entered)
                if timed is not None:
                    timed.observe(time.perf_counter() - started)

        if inspect.iscoroutinefunction(method):

            @functools.wraps(method)
            async def traced_async(*args: Any, **kwargs: Any) -> Any:
                if internal and _IN_OPERATION.get():
                    return await method(*args, **kwargs)
                with measured(args, kwargs) as span:
                    result = await method(*args, **kwargs)
                    end(span, result)
                    return result

            return traced_async

        @functools.wraps(method)
        def traced(*args: Any, **kwargs: Any) -> Any:
            if internal and _IN_OPERATION.get():
                return method(*args, **kwargs)
            with measured(args, kwargs) as span:
                result = method(*args, **kwargs)
                end(span, result)
                return result

        return traced

    def trip(self, method: Callable[..., Any]) -> Callable[..., Any]:
        """``method`` (``_send`` or ``_send_batch``) wrapped in :meth:`round_trip`."""

        def what(arg: Any) -> str:
            call = getattr(arg, "call", None)  # a Plan
            if call is not None:
                return str(call.script)
            return "batch"

        if inspect.iscoroutinefunction(method):

            @functools.wraps(method)
            async def trip_async(arg: Any) -> Any:
                with self.round_trip(what(arg)):
                    return await method(arg)

            return trip_async

        @functools.wraps(method)
        def trip(arg: Any) -> Any:
            with self.round_trip(what(arg)):
                return method(arg)

        return trip


def _recording() -> bool:
    from opentelemetry import trace

    return bool(trace.get_current_span().is_recording())


def instrument(
    client: Any,
    metrics: bool | CollectorRegistry = False,
    metrics_customers: bool = False,
    trace_customers: bool = False,
) -> Telemetry:
    """The telemetry of ``client`` (the last step of its constructor): :data:`OFF` when there
    are no metrics and OpenTelemetry is not configured; else its operations and round trips are
    wrapped, on this instance only.

    Raises InvalidRequestError naming ``metrics`` (not a bool or a registry; prometheus-client
    not installed) or ``metrics_customers``/``trace_customers`` (not a bool).
    """
    for field, value in (
        ("metrics_customers", metrics_customers),
        ("trace_customers", trace_customers),
    ):
        if not isinstance(value, bool):
            raise InvalidRequestError(field, "must be a bool")
    shared = _metrics_for(metrics, metrics_customers) if metrics is not False else None
    tracer = configured_tracer()
    if shared is None and tracer is None:
        return OFF
    active = _Active(client.namespace, shared, tracer, metrics_customers, trace_customers)
    if shared is not None:
        shared.add(client)
    for name in OPERATIONS + INTERNAL:
        setattr(client, name, active.operation(name, getattr(client, name)))
    for name in ROUND_TRIPS:
        setattr(client, name, active.trip(getattr(client, name)))
    return active
