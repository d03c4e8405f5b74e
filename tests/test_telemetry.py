"""Worker metrics (prometheus-client) and traces (OpenTelemetry SDK, in-memory exporter), on both
clients, after known sequences of calls against the suite's server."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once
from prometheus_client import CollectorRegistry

from agentbill import (
    AgentBillClient,
    AsyncAgentBillClient,
    InvalidRequestError,
    Preflight,
    StoreUnavailableError,
)
from agentbill._telemetry import OFF
from tests._async_facade import blocking_client
from tests._servers import RedisServer, free_port

Make = Callable[..., AgentBillClient]


@pytest.fixture(params=["sync", "async"])
def make(request: pytest.FixtureRequest, namespace: str) -> Iterator[Make]:
    """Build clients of one kind (AgentBillClient, or AsyncAgentBillClient behind the blocking
    facade) with the given settings; all are closed at the end."""
    made: list[Any] = []
    runner = asyncio.Runner() if request.param == "async" else None

    def build(**settings: Any) -> AgentBillClient:
        settings.setdefault("namespace", namespace)
        if runner is None:
            made.append(AgentBillClient(**settings))
            return cast(AgentBillClient, made[-1])
        aclient = AsyncAgentBillClient(**settings)
        made.append(aclient)
        return cast(AgentBillClient, blocking_client(aclient, runner))

    yield build
    for c in made:
        if runner is None:
            c.close()
        else:
            runner.run(c.close())
    if runner is not None:
        runner.close()


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


# -- metrics -------------------------------------------------------------------------------------


def test_metrics_after_a_known_sequence(make: Make, redis_server: RedisServer) -> None:
    registry = CollectorRegistry()
    client = make(redis_url=redis_server.url, metrics=registry)
    client.set_budget("u", 20)
    client.preflight("a", 10, "u").record(7)  # approved; recorded, 7 charged
    assert not client.preflight("a", 30, "u").approved  # budget_exhausted, customer
    first = client.preflight("a", 3, "u", idempotency_key="k")  # approved
    again = client.preflight("a", 3, "u", idempotency_key="k")  # replayed: reserves nothing
    assert again.replayed
    first.release()  # released
    client.preflight_many([Preflight("a", 1, "u"), Preflight("a", 100, "u")])  # 1 ok, 1 refused

    assert sample(registry, "agentbill_preflights_total", outcome="approved", scope="") == 4
    assert (
        sample(registry, "agentbill_preflights_total", outcome="budget_exhausted", scope="customer")
        == 2
    )
    assert sample(registry, "agentbill_units_reserved_total") == 10 + 3 + 1
    assert sample(registry, "agentbill_units_charged_total") == 7
    assert sample(registry, "agentbill_settlements_total", status="recorded") == 1
    assert sample(registry, "agentbill_settlements_total", status="released") == 1
    # Every preflight() call is timed (preflight_many is a batch, not a preflight call).
    assert sample(registry, "agentbill_preflight_duration_seconds_count") == 4
    assert sample(registry, "agentbill_offline_approvals_total") == 0
    assert sample(registry, "agentbill_queued_settlements") == 0
    assert not [
        s for m in registry.collect() if m.name == "agentbill_store_errors" for s in m.samples
    ]
    # No customer id anywhere by default.
    labels = {k for m in registry.collect() for s in m.samples for k in s.labels}
    assert "customer" not in labels


def test_customer_labels_only_when_asked(make: Make, redis_server: RedisServer) -> None:
    registry = CollectorRegistry()
    client = make(redis_url=redis_server.url, metrics=registry, metrics_customers=True)
    client.preflight("a", 4, "cust")
    assert (
        sample(
            registry, "agentbill_preflights_total", outcome="approved", scope="", customer="cust"
        )
        == 1
    )
    assert sample(registry, "agentbill_units_reserved_total", customer="cust") == 4
    with pytest.raises(InvalidRequestError) as refused:
        make(redis_url=redis_server.url, metrics=registry)  # same registry, other labels
    assert refused.value.field == "metrics_customers"


def test_clients_of_one_registry_share_its_metrics(make: Make, redis_server: RedisServer) -> None:
    registry = CollectorRegistry()
    one = make(redis_url=redis_server.url, metrics=registry)
    two = make(redis_url=redis_server.url, metrics=registry)
    one.preflight("a", 1, "x")
    two.preflight("a", 2, "x")
    assert sample(registry, "agentbill_units_reserved_total") == 3


def test_an_outage_counts_errors_offline_approvals_and_the_queue(make: Make) -> None:
    registry = CollectorRegistry()
    client = make(
        redis_url=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens: Redis is down
        metrics=registry,
        on_outage="allowance",
        outage_allowance=20,
        retry_attempts=1,
    )
    check = client.preflight("a", 15, "u")
    assert check.offline
    assert check.record(12).status == "queued"
    with pytest.raises(StoreUnavailableError):
        client.preflight("a", 10, "u")  # beyond the allowance

    assert sample(registry, "agentbill_offline_approvals_total") == 1
    assert sample(registry, "agentbill_preflights_total", outcome="approved", scope="") == 1
    assert sample(registry, "agentbill_units_reserved_total") == 15
    assert sample(registry, "agentbill_store_errors_total", kind="unavailable") == 3
    assert sample(registry, "agentbill_queued_settlements") == 1
    assert sample(registry, "agentbill_settlements_total", status="queued") == 0
    assert sample(registry, "agentbill_preflight_duration_seconds_count") == 2


def test_a_queued_settlement_is_counted_when_delivered(make: Make) -> None:
    server = RedisServer().start()
    try:
        registry = CollectorRegistry()
        client = make(redis_url=server.url, metrics=registry, background_settle=True)
        client.set_budget("u", 100)
        client.preflight("a", 10, "u").record(6)  # queued, then delivered in the background
        assert client.flush() == 0
        assert sample(registry, "agentbill_settlements_total", status="recorded") == 1
        assert sample(registry, "agentbill_units_charged_total") == 6
        assert sample(registry, "agentbill_queued_settlements") == 0
    finally:
        server.stop()


def test_the_queue_gauge_is_true_in_prometheus_multiprocess_mode(tmp_path: Any) -> None:
    """With PROMETHEUS_MULTIPROC_DIR (gunicorn and other pre-fork servers), a gauge's value is
    what each process last wrote to its file: the queue gauge is written whenever the queue
    changes, and adds up over the live processes."""
    probe = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(
            """
            from prometheus_client import CollectorRegistry, multiprocess

            from agentbill import AgentBillClient
            from tests._servers import RedisServer

            def queued():
                registry = CollectorRegistry()
                multiprocess.MultiProcessCollector(registry)
                return registry.get_sample_value("agentbill_queued_settlements")

            server = RedisServer().start()
            client = AgentBillClient(
                redis_url=server.url, metrics=True, on_outage="fail_open", retry_attempts=1
            )
            check = client.preflight("a", 5, "u")
            server.kill()
            assert check.record(3).status == "queued"
            during = queued()
            server.start()
            assert client.flush() == 0
            print(during, queued())
            client.close()
            server.stop()
            """
        )],
        capture_output=True, text=True, timeout=60, check=False,
        env=os.environ | {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)},
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["1.0", "0.0"]


def test_bad_metrics_settings_are_refused(redis_server: RedisServer) -> None:
    for settings, field in (
        ({"metrics": "yes"}, "metrics"),
        ({"metrics": True, "metrics_customers": 1}, "metrics_customers"),
        ({"trace_customers": "no"}, "trace_customers"),
    ):
        with pytest.raises(InvalidRequestError) as refused:
            AgentBillClient(redis_url=redis_server.url, **settings)
        assert refused.value.field == field


# -- traces --------------------------------------------------------------------------------------


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """An SDK tracer provider set globally, as an application configures OpenTelemetry; unset
    afterwards so other tests run without it."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace.set_tracer_provider(provider)
    yield exporter
    provider.shutdown()
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None


def by_name(finished: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in finished if s.name == name]


def test_every_operation_is_a_span_with_its_round_trip(
    make: Make, redis_server: RedisServer, spans: InMemorySpanExporter
) -> None:
    client = make(redis_url=redis_server.url)
    client.set_budget("u", 20)
    client.preflight("agent-1", 10, "u").record(7)
    client.preflight("agent-1", 30, "u")
    client.release(client.preflight("agent-2", 3, "u").reservation_id)

    finished = spans.get_finished_spans()
    approved, refused, released = by_name(finished, "agentbill.preflight")
    assert dict(approved.attributes or {}) | {"agentbill.reservation_id": "-"} == {
        "agentbill.namespace": client.namespace,
        "agentbill.agent_id": "agent-1",
        "agentbill.units": 10,
        "agentbill.approved": True,
        "agentbill.offline": False,
        "agentbill.replayed": False,
        "agentbill.reservation_id": "-",
    }
    assert refused.attributes is not None
    assert refused.attributes["agentbill.approved"] is False
    assert refused.attributes["agentbill.reason"] == "budget_exhausted"
    assert refused.attributes["agentbill.scope"] == "customer"
    assert released.attributes is not None
    assert released.attributes["agentbill.agent_id"] == "agent-2"

    (record,) = by_name(finished, "agentbill.record")
    assert record.attributes is not None
    assert record.attributes["agentbill.status"] == "recorded"
    assert record.attributes["agentbill.charged"] == 7
    assert record.attributes["agentbill.units"] == 7
    (release,) = by_name(finished, "agentbill.release")
    assert release.attributes is not None
    assert release.attributes["agentbill.status"] == "released"
    assert by_name(finished, "agentbill.set_budget")

    # Each operation's Redis round trip is its child span.
    operations = [s for s in finished if s.name != "agentbill.redis"]
    trips = by_name(finished, "agentbill.redis")
    assert len(trips) == len(operations) == 6
    parents = {s.context.span_id: s for s in operations if s.context is not None}
    for trip in trips:
        assert trip.parent is not None
        parent = parents[trip.parent.span_id]
        assert trip.attributes is not None
        script = trip.attributes["agentbill.script"]
        assert script == {"agentbill.record": "settle", "agentbill.release": "settle"}.get(
            parent.name, parent.name.removeprefix("agentbill.")
        )
    # No customer id in any span by default.
    assert not [s for s in finished if "agentbill.customer_id" in (s.attributes or {})]


def test_customer_ids_in_spans_only_when_asked(
    make: Make, redis_server: RedisServer, spans: InMemorySpanExporter
) -> None:
    client = make(redis_url=redis_server.url, trace_customers=True)
    client.preflight("a", 1, "visible")
    (span,) = by_name(spans.get_finished_spans(), "agentbill.preflight")
    assert span.attributes is not None
    assert span.attributes["agentbill.customer_id"] == "visible"


def test_a_failed_round_trip_is_an_error_span(make: Make, spans: InMemorySpanExporter) -> None:
    client = make(redis_url=f"redis://127.0.0.1:{free_port()}/0", retry_attempts=1)
    with pytest.raises(StoreUnavailableError):
        client.get_budget("u")
    (span,) = by_name(spans.get_finished_spans(), "agentbill.get_budget")
    assert span.status.status_code is trace.StatusCode.ERROR
    assert span.events[0].name == "exception"


# -- off, and nothing imported -------------------------------------------------------------------


def test_without_metrics_or_a_configured_tracer_nothing_is_wrapped(
    redis_server: RedisServer,
) -> None:
    with AgentBillClient(redis_url=redis_server.url) as client:
        assert client._telemetry is OFF
        assert "preflight" not in vars(client)  # the class's own method, unwrapped
        assert "_send" not in vars(client)


def _probe(code: str, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), url],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_nothing_is_imported_when_the_extras_are_missing(redis_server: RedisServer) -> None:
    probe = _probe(
        """
        import sys
        for name in ("prometheus_client", "opentelemetry"):
            sys.modules[name] = None  # as if not installed: importing it fails
        from agentbill import AgentBillClient, InvalidRequestError
        with AgentBillClient(redis_url=sys.argv[1]) as client:
            assert client.preflight("a", 1, "u").approved
        try:
            AgentBillClient(redis_url=sys.argv[1], metrics=True)
        except InvalidRequestError as exc:
            print(exc)
        """,
        redis_server.url,
    )
    assert probe.returncode == 0, probe.stderr
    assert (
        probe.stdout == "metrics: needs prometheus-client: pip install 'agentbill-redis[metrics]'\n"
    )


def test_prometheus_client_is_imported_only_for_metrics(redis_server: RedisServer) -> None:
    probe = _probe(
        """
        import sys
        from agentbill import AgentBillClient
        with AgentBillClient(redis_url=sys.argv[1]) as client:
            client.preflight("a", 1, "u")
        print("prometheus_client" in sys.modules)
        """,
        redis_server.url,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout == "False\n"


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_gates_runs_and_lease_slices_are_spans_too(
    kind: str, redis_server: RedisServer, namespace: str, spans: InMemorySpanExporter
) -> None:
    """A gate, a run block and a lease's slice make their preflight and settlement through the
    client's internals, not its public methods: each is a span all the same, with its round
    trip as a child, and a settlement outside any operation is one span, not two."""
    registry = CollectorRegistry()
    settings: dict[str, Any] = {
        "redis_url": redis_server.url, "namespace": namespace, "metrics": registry,
    }  # fmt: skip
    if kind == "sync":
        with AgentBillClient(**settings) as client:
            client.set_budget("u", 100)

            @client.gate("gated", 5, "u", units=lambda result: result)
            def work() -> int:
                return 3

            work()
            with client.run("ran", 4, "u") as run:
                run.record(2)
            with client.lease("leased", "u", slice_units=10) as lease:
                lease.preflight(1).record(1)
    else:

        async def body() -> None:
            async with AsyncAgentBillClient(**settings) as client:
                await client.set_budget("u", 100)

                @client.gate("gated", 5, "u", units=lambda result: result)
                async def work() -> int:
                    return 3

                await work()
                async with client.run("ran", 4, "u") as run:
                    await run.record(2)
                async with client.lease("leased", "u", slice_units=10) as lease:
                    (await lease.preflight(1)).record(1)

        asyncio.run(body())

    finished = spans.get_finished_spans()
    preflights = by_name(finished, "agentbill.preflight")
    assert [(s.attributes or {}).get("agentbill.agent_id") for s in preflights] == [
        "gated", "ran", "leased",
    ]  # fmt: skip
    assert all((s.attributes or {}).get("agentbill.approved") is True for s in preflights)
    records = by_name(finished, "agentbill.record")
    assert [(s.attributes or {}).get("agentbill.charged") for s in records] == [3, 2, 1]
    assert all(s.parent is None for s in preflights + records)  # no span doubled
    operations = {s.context.span_id for s in preflights + records if s.context is not None}
    trips = by_name(finished, "agentbill.redis")
    assert len(trips) == len(operations) + 1  # and set_budget's
    assert sum(1 for t in trips if t.parent and t.parent.span_id in operations) == 6
    # Each of those preflights was timed, as a preflight() call is.
    assert sample(registry, "agentbill_preflight_duration_seconds_count") == 3
