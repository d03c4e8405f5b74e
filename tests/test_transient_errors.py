"""Transient server errors are transient: Redis answering BUSY (another client's long script) or
OOM (maxmemory reached) loses nothing.

- A queued settlement (``background_settle``, or an outage policy's queue) that meets one stays
  queued and is delivered, exactly once, when Redis can take it.
- A plain ``record()``/``release()``/``preflight()`` that meets one raises StoreBusyError
  (nothing was written, so calling again is safe) and never approves a run offline.
- A queued settlement Redis refuses for good (an idempotency conflict) is dropped loudly
  (ERROR log, ``OutageStats.dropped``) and its reservation is released, so its units come back.

Each test body runs on the sync and the async client against real redis-server processes.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
from collections.abc import Callable, Iterator

import pytest
import redis

from agentbill import (
    AgentBillClient,
    InvalidRequestError,
    StoreBusyError,
    StoreError,
    StoreUnavailableError,
)
from agentbill._retry import RetryPolicy, translate
from tests._faults import AGENT, CUSTOMER, Connect, busy, connect, wait_until
from tests._servers import RedisServer, running

__all__ = ["connect"]  # the sync/async client fixture, defined in tests/_faults.py

Condition = Callable[[RedisServer], contextlib.AbstractContextManager[None]]


@contextlib.contextmanager
def out_of_memory(server: RedisServer) -> Iterator[None]:
    """Redis over its maxmemory with ``noeviction``: every write is refused with OOM (reads
    still work). Filled with keys outside any test namespace, then maxmemory set below what
    is used; restored on exit."""
    with server.client() as r:
        r.config_set("maxmemory-policy", "noeviction")
        pipe = r.pipeline(transaction=False)
        for i in range(3000):
            pipe.set(f"filler:{i}", b"x" * 1000)
        pipe.execute()
        used = int(r.info("memory")["used_memory"])
        r.config_set("maxmemory", used // 2)
        try:
            yield
        finally:
            r.config_set("maxmemory", 0)
            r.delete(*[f"filler:{i}" for i in range(3000)])


CONDITIONS: dict[str, Condition] = {"oom": out_of_memory, "busy": busy}


@pytest.fixture(params=list(CONDITIONS))
def condition(request: pytest.FixtureRequest) -> tuple[str, Condition]:
    return request.param, CONDITIONS[request.param]


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A server of its own: these tests make it refuse writes or block it."""
    with running(extra={"lua-time-limit": "20", "appendonly": "yes", "appendfsync": "always"}) as s:
        yield s


def test_background_settles_wait_out_a_busy_or_full_redis_and_land_once(
    connect: Connect, server: RedisServer, namespace: str, condition: tuple[str, Condition]
) -> None:
    _, refusing = condition
    with (
        AgentBillClient(redis_url=server.url, namespace=namespace) as looker,
        connect(redis_url=server.url, namespace=namespace, background_settle=True) as client,
    ):
        checks = [client.preflight(AGENT, 4, CUSTOMER) for _ in range(10)]
        with refusing(server):
            for check in checks[:7]:
                assert check.record(3).status == "queued"
            for check in checks[7:]:
                assert check.release().status == "queued"
            # The background tries, Redis refuses each item, nothing is dropped.
            wait_until(lambda: client.flush() == 10, "a delivery attempt to be refused")
            assert client.outage_stats.dropped == 0
        assert client.flush() == 0
        budget = looker.get_budget(CUSTOMER)
        assert (budget.spent, budget.reserved, budget.open_reservations) == (21, 0, 0)
        stats = client.outage_stats
        assert (stats.delivered, stats.dropped, stats.queued) == (10, 0, 0)
        # Exactly once: the same records again charge nothing more.
        for check in checks[:7]:
            check.record(3)
        assert client.flush() == 0
        assert looker.get_budget(CUSTOMER).spent == 21


def test_the_outage_queue_keeps_what_a_busy_or_full_redis_refuses(
    connect: Connect, server: RedisServer, namespace: str, condition: tuple[str, Condition]
) -> None:
    _, refusing = condition
    with connect(redis_url=server.url, namespace=namespace, on_outage="fail_open") as client:
        real = client.preflight(AGENT, 5, CUSTOMER)
        server.kill()
        offline = client.preflight(AGENT, 6, CUSTOMER)
        assert offline.offline
        assert real.record(4).status == "queued"
        assert offline.record(2).status == "queued"
        server.start()
        with refusing(server):
            assert client.flush() == 2  # refused, kept
            assert client.outage_stats.dropped == 0
        assert client.flush() == 0
        budget = client.get_budget(CUSTOMER)
        assert (budget.spent, budget.reserved, budget.open_reservations) == (6, 0, 0)
        stats = client.outage_stats
        assert (stats.delivered, stats.dropped, stats.held_units) == (2, 0, 0)


@pytest.mark.parametrize("on_outage", ["fail_closed", "fail_open"])
def test_a_plain_settle_or_preflight_raises_a_typed_retryable_error(
    connect: Connect,
    server: RedisServer,
    namespace: str,
    condition: tuple[str, Condition],
    on_outage: str,
) -> None:
    """Busy is not an outage: no offline approval, nothing queued; the caller gets
    StoreBusyError (a StoreUnavailableError: nothing approved) and may simply call again."""
    name, refusing = condition
    with connect(redis_url=server.url, namespace=namespace, on_outage=on_outage) as client:
        client.set_budget(CUSTOMER, 100)
        check = client.preflight(AGENT, 5, CUSTOMER)
        other = client.preflight(AGENT, 5, CUSTOMER)
        with refusing(server):
            with pytest.raises(StoreBusyError) as caught:
                check.record(3)
            assert caught.value.code == name.upper()
            assert isinstance(caught.value, StoreUnavailableError)
            with pytest.raises(StoreBusyError):
                other.release()
            with pytest.raises(StoreBusyError):
                client.record(AGENT, 2, CUSTOMER)  # no reservation id: still safe to repeat
            if name == "busy":  # a preflight's writes are refused under OOM only if it reserves
                with pytest.raises(StoreBusyError):
                    client.preflight(AGENT, 1, CUSTOMER)
            stats = client.outage_stats
            assert (stats.offline_runs, stats.queued) == (0, 0)
        assert check.record(3).status == "recorded"
        assert other.release().status == "released"
        assert client.record(AGENT, 2, CUSTOMER).status == "direct"
        budget = client.get_budget(CUSTOMER)
        assert (budget.spent, budget.reserved, budget.open_reservations) == (5, 0, 0)


@pytest.mark.parametrize("queue", ["background", "outage"])
def test_a_queued_record_redis_refuses_for_good_is_dropped_loudly_and_released(
    connect: Connect,
    server: RedisServer,
    namespace: str,
    queue: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An idempotency key reused with other arguments can never succeed: the record is dropped
    (ERROR logged, counted) and its reservation released, in the ledger too, never left held
    until its TTL."""
    settings: dict[str, object] = (
        {"background_settle": True} if queue == "background" else {"on_outage": "fail_open"}
    )
    with (
        AgentBillClient(redis_url=server.url, namespace=namespace) as looker,
        connect(redis_url=server.url, namespace=namespace, **settings) as client,
    ):
        first = client.preflight(AGENT, 5, CUSTOMER)
        second = client.preflight(AGENT, 7, CUSTOMER)
        looker.record(AGENT, 5, CUSTOMER, reservation_id=first.reservation_id, idempotency_key="k")
        if queue == "outage":
            server.kill()
        with caplog.at_level(logging.ERROR, logger="agentbill"):
            assert second.record(7, idempotency_key="k").status == "queued"  # a conflict
            if queue == "outage":
                server.start()
            wait_until(lambda: client.flush() == 0, "the queue to be dealt with")
        assert client.outage_stats.dropped == 1
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1
        assert str(second.reservation_id) in errors[0]
        assert "released" in errors[0]
        budget = looker.get_budget(CUSTOMER)
        assert (budget.spent, budget.reserved, budget.open_reservations) == (5, 0, 0)
        released = [e for e in looker.events(CUSTOMER) if e.type == "released"]
        assert [e.reservation_id for e in released] == [second.reservation_id]


# -- which error is which (no server needed) -------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (redis.ResponseError("BUSY Redis is busy running a script."), "BUSY"),
        (redis.exceptions.OutOfMemoryError("command not allowed when used memory"), "OOM"),
        (redis.BusyLoadingError("Redis is loading the dataset in memory"), "LOADING"),
        (redis.ReadOnlyError("You can't write against a read only replica."), "READONLY"),
        (redis.exceptions.MasterDownError("Link with MASTER is down"), "MASTERDOWN"),
        (redis.exceptions.TryAgainError("Multiple keys request during rehashing"), "TRYAGAIN"),
        (redis.exceptions.ClusterDownError("The cluster is down"), "CLUSTERDOWN"),
        (redis.ResponseError("NOREPLICAS Not enough good replicas to write."), "NOREPLICAS"),
        (redis.ResponseError("MISCONF Redis is configured to save RDB snapshots"), "MISCONF"),
        # redis-py's cluster client followed MOVED/ASK/TRYAGAIN until its TTL ran out.
        (redis.exceptions.ClusterError("TTL exhausted."), "TRYAGAIN"),
    ],
)
def test_not_now_answers_are_busy_errors(error: Exception, code: str) -> None:
    busy = translate(error)
    assert isinstance(busy, StoreBusyError)
    assert busy.code == code
    again = pickle.loads(pickle.dumps(busy))
    assert (type(again), again.code, str(again)) == (StoreBusyError, code, str(busy))


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (redis.ConnectionError("Connection refused"), StoreUnavailableError),
        (redis.TimeoutError("Timeout reading from socket"), StoreUnavailableError),
        (redis.ResponseError("AGENTBILL idempotency_conflict"), InvalidRequestError),
        (redis.ResponseError("NOPERM this user has no permissions"), StoreError),
        (redis.ResponseError("ERR Error running script"), StoreError),
    ],
)
def test_other_errors_are_not_busy(error: Exception, kind: type[Exception]) -> None:
    translated = translate(error)
    assert type(translated) is kind


def _raising(*errors: Exception) -> Callable[[], object]:
    left = list(errors)

    def call() -> object:
        raise left.pop(0) if len(left) > 1 else left[0]

    return call


def test_busy_is_retried_and_ends_as_busy() -> None:
    busy = redis.ResponseError("BUSY Redis is busy running a script.")
    calls: list[int] = []

    def fn() -> object:
        calls.append(1)
        raise busy

    with pytest.raises(redis.ResponseError) as caught:
        RetryPolicy(attempts=3, deadline=10.0).call(fn)
    assert caught.value is busy
    assert len(calls) == 3


def test_redirections_exhausted_are_retried_and_end_as_busy() -> None:
    exhausted = redis.exceptions.ClusterError("TTL exhausted.")
    calls: list[int] = []

    def fn() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise exhausted
        return "landed"

    assert RetryPolicy(attempts=3, deadline=10.0).call(fn) == "landed"
    with pytest.raises(redis.exceptions.ClusterError) as caught:
        RetryPolicy(attempts=3, deadline=10.0).call(_raising(exhausted))
    assert caught.value is exhausted
    assert isinstance(translate(caught.value), StoreBusyError)


def test_a_busy_answer_after_an_attempt_in_doubt_is_in_doubt() -> None:
    """StoreBusyError promises that nothing was written; after a lost reply that is unknown,
    so the call ends as StoreUnavailableError (an outage policy queues it, same request id)."""
    reset = redis.ConnectionError("Connection reset by peer")
    busy = redis.ResponseError("BUSY Redis is busy running a script.")
    with pytest.raises(redis.ConnectionError) as caught:
        RetryPolicy(attempts=3, deadline=10.0).call(_raising(reset, busy))
    assert caught.value is reset
    assert type(translate(caught.value)) is StoreUnavailableError
