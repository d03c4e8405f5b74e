"""background_settle: record() and release() cost the caller no round trip; a background thread
(a task, for the async client) delivers them in pipelined batches, each exactly once."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from agentbill import AgentBillClient
from tests._faults import Connect, connect, wait_until
from tests._servers import RedisServer, running

__all__ = ["connect"]  # the sync/async client fixture, defined in tests/_faults.py


@pytest.fixture
def durable() -> Iterator[RedisServer]:
    with running(extra={"appendonly": "yes", "appendfsync": "always"}) as server:
        yield server


def test_records_return_at_once_and_land_once(
    connect: Connect, redis_server: RedisServer, namespace: str
) -> None:
    with (
        AgentBillClient(redis_url=redis_server.url, namespace=namespace) as looker,
        connect(redis_url=redis_server.url, namespace=namespace, background_settle=True) as c,
    ):
        checks = [c.preflight("agent", 5, "c1") for _ in range(40)]
        settled = [check.record(3) for check in checks[:30]]
        settled += [check.release() for check in checks[30:]]
        assert {s.status for s in settled} == {"queued"}
        assert all(s.spent is None for s in settled)
        assert c.flush() == 0  # what the background has not sent yet, sent now
        budget = looker.get_budget("c1")
        assert (budget.spent, budget.reserved, budget.open_reservations) == (90, 0, 0)
        assert c.outage_stats.delivered == 40
        assert checks[0].record(3).status == "queued"  # a repeat is queued, and lands as a replay
        c.flush()
        assert looker.get_budget("c1").spent == 90


def test_the_background_thread_delivers_without_being_asked(
    redis_server: RedisServer, namespace: str
) -> None:
    with (
        AgentBillClient(redis_url=redis_server.url, namespace=namespace) as looker,
        AgentBillClient(
            redis_url=redis_server.url, namespace=namespace, background_settle=True
        ) as client,
    ):
        for _ in range(25):
            client.preflight("agent", 2, "c1").record(1)
        wait_until(lambda: looker.get_budget("c1").spent == 25, "the thread to deliver")
        assert looker.get_budget("c1").reserved == 0


def test_close_delivers_what_is_left(
    connect: Connect, redis_server: RedisServer, namespace: str
) -> None:
    with connect(redis_url=redis_server.url, namespace=namespace, background_settle=True) as c:
        for _ in range(200):
            c.record("agent", 1, "c1")
    with AgentBillClient(redis_url=redis_server.url, namespace=namespace) as looker:
        assert looker.get_budget("c1").spent == 200


def test_settlements_wait_out_an_outage_and_land_once(durable: RedisServer, namespace: str) -> None:
    with AgentBillClient(
        redis_url=durable.url, namespace=namespace, background_settle=True
    ) as client:
        checks = [client.preflight("agent", 4, "c1") for _ in range(10)]
        durable.kill()
        for check in checks:
            assert check.record(2).status == "queued"
        time.sleep(0.3)  # the thread tries, fails, backs off: nothing is dropped
        assert client.outage_stats.queued == 10
        durable.restart()
        wait_until(lambda: client.outage_stats.queued == 0, "the queue to drain")
        budget = client.get_budget("c1")
        assert (budget.spent, budget.reserved) == (20, 0)
        assert client.outage_stats.dropped == 0
