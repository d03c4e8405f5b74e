"""Fail closed: when Redis cannot answer, every operation raises StoreUnavailableError, in time.

The bounds below are the product's contract with the default client settings (a 1 s connect
timeout, a 1 s socket timeout, at most 3 attempts within a 1 s retry deadline), not
performance claims: a refused connection fails within 2 s, and so does a server that accepts
but never answers. A reply lost on the way back is retried with the same request id, so the
write it carried lands once. Each test body runs on the sync and the async client.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from agentbill import AgentBillClient, StoreUnavailableError
from agentbill._keys import customer_tag, reservation_id
from tests._faults import (
    AGENT,
    CUSTOMER,
    UNREACHABLE_BOUND,
    Connect,
    ReplyLosingProxy,
    connect,
    other_clients,
    proxy,
    silent_listener,
    wait_until,
)
from tests._servers import RedisServer, free_port, running

__all__ = ["connect", "proxy", "silent_listener"]  # fixtures used here, defined in tests/_faults.py

SILENT_BOUND = 2.0

Operation = Callable[[AgentBillClient], object]

OPERATIONS: dict[str, Operation] = {
    "preflight": lambda c: c.preflight(AGENT, 1, CUSTOMER),
    "record": lambda c: c.record(AGENT, 1, CUSTOMER),
    "release": lambda c: c.release(reservation_id(customer_tag(CUSTOMER), "0" * 24)),
    "get_budget": lambda c: c.get_budget(CUSTOMER),
    "set_budget": lambda c: c.set_budget(CUSTOMER, 10),
    "open_task": lambda c: c.open_task("task", 10, CUSTOMER),
    "get_task": lambda c: c.get_task("task", CUSTOMER),
}


# -- Redis unreachable -------------------------------------------------------------------------


@pytest.mark.parametrize("operation", OPERATIONS.values(), ids=OPERATIONS.keys())
def test_unreachable_redis_fails_closed_within_2s(connect: Connect, operation: Operation) -> None:
    with connect(redis_url=f"redis://127.0.0.1:{free_port()}/0") as client:
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError) as caught:
            operation(client)
        elapsed = time.monotonic() - started
    assert elapsed < UNREACHABLE_BOUND
    assert isinstance(caught.value.__cause__, redis.ConnectionError)


# -- Redis accepts connections but never answers -----------------------------------------------


def test_paused_server_fails_closed_within_2s_and_holds_at_most_one_reservation(
    connect: Connect,
) -> None:
    """A SIGSTOPped server: the kernel still accepts connections and buffers requests.

    What is guaranteed is not "nothing was reserved": the request that timed out sits in the
    server's socket buffer and runs when the server resumes, after the client has already
    reported the failure. What is guaranteed: the client reported failure (so no run started),
    every attempt of that one call carried the same reservation id (so at most one reservation
    can come of it), and that reservation gives its units back when its TTL runs out.
    """
    estimate, ttl = 3, 1
    with (
        running() as server,
        server.client(decode_responses=True) as raw,
        connect(redis_url=server.url) as client,
    ):
        client.preflight(AGENT, estimate, CUSTOMER).release()
        before = client.get_budget(CUSTOMER)
        raw.ping()  # connected before the pause, so it can look after the resume
        server.pause()
        try:
            started = time.monotonic()
            with pytest.raises(StoreUnavailableError) as caught:
                client.preflight(AGENT, estimate, CUSTOMER, ttl=ttl)
            elapsed = time.monotonic() - started
        finally:
            server.resume()
        assert elapsed < SILENT_BOUND
        assert isinstance(caught.value.__cause__, redis.TimeoutError)

        # Let the server run whatever the failed call left in its socket buffers.
        wait_until(lambda: not other_clients(raw), "the failed call's connections to drain")
        after = client.get_budget(CUSTOMER)
        new_reservations = after.open_reservations - before.open_reservations
        assert new_reservations in (0, 1)
        assert after.reserved - before.reserved == estimate * new_reservations
        assert after.spent == before.spent

        def back_to_before() -> bool:
            now = client.get_budget(CUSTOMER)
            return (now.reserved, now.open_reservations) == (
                before.reserved,
                before.open_reservations,
            )

        wait_until(back_to_before, "the stray reservation to expire")


def test_every_attempt_of_one_call_queued_on_a_paused_server_lands_as_one_reservation() -> None:
    """Three attempts of one preflight all reach a paused server and all run after it resumes.

    A redis-py client with no handshake (RESP2, no CLIENT SETINFO) and a short timeout sends the
    script itself on every attempt, so the server ends up with three copies of the same call.
    They carry one reservation id: the first creates the reservation, the others find it.
    """
    estimate, attempts = 4, 3
    with running() as server, server.client(decode_responses=True) as raw:
        user_redis = redis.Redis(
            host="127.0.0.1",
            port=server.port,
            socket_timeout=0.3,
            socket_connect_timeout=1.0,
            retry=Retry(NoBackoff(), 0),
            protocol=2,
            driver_info=None,
        )
        with (
            user_redis,
            AgentBillClient(
                redis=user_redis, retry_attempts=attempts, retry_deadline=30.0
            ) as client,
        ):
            client.preflight(AGENT, estimate, CUSTOMER).release()
            before = client.get_budget(CUSTOMER)
            raw.ping()
            runs_before = fcall_calls(raw)
            server.pause()
            try:
                with pytest.raises(StoreUnavailableError):
                    client.preflight(AGENT, estimate, CUSTOMER)
            finally:
                server.resume()

            wait_until(
                lambda: fcall_calls(raw) - runs_before == attempts and not other_clients(raw),
                "every queued attempt to run",
            )
            after = client.get_budget(CUSTOMER)
    assert after.open_reservations - before.open_reservations == 1
    assert after.reserved - before.reserved == estimate
    assert after.spent == before.spent


def fcall_calls(raw: redis.Redis) -> int:
    stats = raw.info("commandstats").get("cmdstat_fcall", {"calls": 0})
    return int(stats["calls"])


def test_a_listener_that_never_answers_fails_closed_within_2s(
    connect: Connect, silent_listener: int
) -> None:
    with connect(redis_url=f"redis://127.0.0.1:{silent_listener}/0") as client:
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError) as caught:
            client.preflight(AGENT, 1, CUSTOMER)
        elapsed = time.monotonic() - started
    assert elapsed < SILENT_BOUND
    assert isinstance(caught.value.__cause__, redis.TimeoutError)


# -- a reply lost on the way back ----------------------------------------------------------------


@pytest.fixture
def lossy(
    connect: Connect, proxy: ReplyLosingProxy, client: AgentBillClient, namespace: str
) -> Iterator[AgentBillClient]:
    """A client talking through the proxy; ``client`` (direct, sync) sees the same namespace."""
    # Load the library first, so a call is never answered "Function not found" while measured.
    client.preflight(AGENT, 0, "warm-up").release()
    with connect(redis_url=proxy.url, namespace=namespace) as c:
        yield c


def test_preflight_whose_reply_was_lost_reserves_once(
    lossy: AgentBillClient, client: AgentBillClient, proxy: ReplyLosingProxy
) -> None:
    estimate = 5
    proxy.lose_next_replies(1)
    check = lossy.preflight(AGENT, estimate, CUSTOMER)
    assert (proxy.lost, proxy.script_calls) == (1, 2)  # ran, reply lost, sent again
    assert check.approved
    budget = client.get_budget(CUSTOMER)
    assert (budget.open_reservations, budget.reserved) == (1, estimate)
    # The id the retry returned is the reservation the first attempt made.
    settled = client.record(AGENT, estimate, CUSTOMER, reservation_id=check.reservation_id)
    assert (settled.status, settled.replayed) == ("recorded", False)


@pytest.mark.parametrize("idempotency_key", [None, "record-1"])
@pytest.mark.parametrize("estimates", [(), (5, 4)], ids=["nothing-open", "two-open"])
def test_record_without_reservation_id_whose_reply_was_lost_charges_once(
    lossy: AgentBillClient,
    client: AgentBillClient,
    proxy: ReplyLosingProxy,
    estimates: tuple[int, ...],
    idempotency_key: str | None,
) -> None:
    """With reservations open it closes the oldest one only; with none it charges directly."""
    for estimate in estimates:
        assert client.preflight(AGENT, estimate, CUSTOMER).approved
    units = 3
    proxy.lose_next_replies(1)
    settled = lossy.record(AGENT, units, CUSTOMER, idempotency_key=idempotency_key)
    assert (proxy.lost, proxy.script_calls) == (1, 2)
    assert settled.charged == units
    budget = client.get_budget(CUSTOMER)
    assert budget.spent == units
    still_open = estimates[1:]
    assert (budget.open_reservations, budget.reserved) == (len(still_open), sum(still_open))


@pytest.mark.parametrize("units", [3, 0], ids=["record", "release"])
def test_settling_a_reservation_whose_reply_was_lost_charges_once(
    lossy: AgentBillClient, client: AgentBillClient, proxy: ReplyLosingProxy, units: int
) -> None:
    check = client.preflight(AGENT, 5, CUSTOMER)
    rid = check.reservation_id
    assert rid is not None
    proxy.lose_next_replies(1)
    if units:
        settled = lossy.record(AGENT, units, CUSTOMER, reservation_id=rid)
    else:
        settled = lossy.release(rid)
    assert (proxy.lost, proxy.script_calls) == (1, 2)
    assert settled.charged == units
    budget = client.get_budget(CUSTOMER)
    assert (budget.spent, budget.reserved, budget.open_reservations) == (units, 0, 0)


@pytest.mark.parametrize("operation", ["preflight", "record", "record-by-id", "release"])
def test_a_call_whose_own_reply_was_lost_is_not_reported_as_a_replay(
    lossy: AgentBillClient, client: AgentBillClient, proxy: ReplyLosingProxy, operation: str
) -> None:
    """The caller made one call, and that call did the write; only its reply was lost.

    No idempotency key was given and the ids are the call's own, so the one earlier request
    the scripts find is this call's own first attempt. ``Settlement.replayed`` promises
    "already closed: nothing changed", and ``released`` counts what "this call" gave back;
    a caller that trusts them (summing the charges of its non-replayed records, say) loses
    the units this call charged.
    """
    estimate, units = 5, 3
    rid = client.preflight(AGENT, estimate, CUSTOMER).reservation_id
    assert rid is not None
    proxy.lose_next_replies(1)
    if operation == "preflight":
        check = lossy.preflight(AGENT, estimate, CUSTOMER)
        assert proxy.lost == 1
        assert (check.approved, check.replayed) == (True, False)
        return
    if operation == "record":
        settled = lossy.record(AGENT, units, CUSTOMER)
    elif operation == "record-by-id":
        settled = lossy.record(AGENT, units, CUSTOMER, reservation_id=rid)
    else:
        settled, units = lossy.release(rid), 0
    assert proxy.lost == 1
    assert (settled.replayed, settled.released, settled.charged) == (False, estimate, units)


# -- one retry layer -----------------------------------------------------------------------------


def test_the_connection_agentbill_builds_has_redis_py_retries_off(
    connect: Connect, redis_server: RedisServer
) -> None:
    with connect(redis_url=redis_server.url) as client:
        pool_kwargs = client._redis.connection_pool.connection_kwargs
    assert pool_kwargs["retry"].get_retries() == 0
    assert pool_kwargs["retry_on_timeout"] is False


def test_each_attempt_sends_the_script_once(
    connect: Connect, proxy: ReplyLosingProxy, namespace: str
) -> None:
    """If redis-py retried inside each of agentbill's attempts, the proxy would count more.
    (A long deadline, so that every attempt is made however slow this machine is.)"""
    attempts = inspect.signature(AgentBillClient).parameters["retry_attempts"].default
    proxy.refuse_scripts = True
    with (
        connect(redis_url=proxy.url, namespace=namespace, retry_deadline=30.0) as client,
        pytest.raises(StoreUnavailableError) as caught,
    ):
        client.preflight(AGENT, 1, CUSTOMER)
    assert isinstance(caught.value.__cause__, redis.ConnectionError)
    assert proxy.script_calls == attempts
