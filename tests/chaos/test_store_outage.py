"""Chaos scenario 5, Redis unreachable or silent: fail closed, in bounded time, many calls at once.

The bounds are the product's promise with the default client settings, as the README and
tests/test_fail_closed.py state them: nothing listening, StoreUnavailableError within 2 s; a server
that accepts connections but never answers (here SIGSTOPped: the kernel still accepts), within
2 s too (one 1 s attempt). The calls are timed against those bounds only; the figures measured
go to RELIABILITY.md.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass

import pytest
import redis

from agentbill import AgentBillClient, StoreUnavailableError
from tests._servers import free_port, running
from tests.chaos._harness import reservations_made, wait_until, warm_up
from tests.chaos._report import Report
from tests.chaos._sizes import Sizes

UNREACHABLE_BOUND = 2.0
SILENT_BOUND = 2.0
AGENT = "agent"
CUSTOMER = "acme"
ESTIMATE = 3
TTL = 1


@dataclass(frozen=True, slots=True)
class Outcome:
    seconds: float
    error: BaseException | None
    approved: bool


def preflight_all(clients: list[AgentBillClient], calls: int) -> list[Outcome]:
    """Every client makes ``calls`` preflights, one after another, all clients at once."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    start = threading.Barrier(len(clients))

    def run(client: AgentBillClient) -> None:
        start.wait(timeout=30)
        for _ in range(calls):
            began = time.monotonic()
            try:
                approved = client.preflight(AGENT, ESTIMATE, CUSTOMER, ttl=TTL).approved
                error: BaseException | None = None
            except Exception as exc:
                approved, error = False, exc
            with lock:
                outcomes.append(Outcome(time.monotonic() - began, error, approved))

    threads = [threading.Thread(target=run, args=(c,), daemon=True) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(outcomes) == len(clients) * calls, "a caller hung"
    return outcomes


def check_failed_closed(outcomes: list[Outcome], bound: float, cause: type[Exception]) -> None:
    assert [o for o in outcomes if o.approved] == []
    assert [o for o in outcomes if not isinstance(o.error, StoreUnavailableError)] == []
    causes = [o.error.__cause__ for o in outcomes if o.error is not None]
    assert [c for c in causes if not isinstance(c, cause)] == []
    assert max(o.seconds for o in outcomes) < bound


def other_clients(raw: redis.Redis) -> list[object]:
    me = raw.client_id()
    return [c for c in raw.client_list() if int(c["id"]) != me]


@pytest.mark.slow
def test_unreachable_or_silent_redis_fails_closed_in_bounded_time(
    chaos_report: Report, sizes: Sizes, namespace: str
) -> None:
    started = time.monotonic()
    threads = sizes.outage_threads

    # Nothing listens on the port.
    url = f"redis://127.0.0.1:{free_port()}/0"
    clients = [AgentBillClient(redis_url=url, namespace=namespace) for _ in range(threads)]
    try:
        unreachable = preflight_all(clients, sizes.outage_calls * 5)
    finally:
        for client in clients:
            client.close()
    check_failed_closed(unreachable, UNREACHABLE_BOUND, redis.ConnectionError)

    # A server that accepts connections and never answers; half the clients connected before.
    with running() as server, server.client(decode_responses=True) as raw:
        with AgentBillClient(redis_url=server.url, namespace=namespace) as admin:
            admin.set_budget(CUSTOMER, 1000)
            warm_up(admin)
            before = admin.get_budget(CUSTOMER)
        made_before = reservations_made(raw, namespace, CUSTOMER)
        clients = [
            AgentBillClient(redis_url=server.url, namespace=namespace) for _ in range(threads)
        ]
        try:
            for client in clients[: threads // 2]:
                client.get_budget(CUSTOMER)
            raw.ping()  # connected before the pause, so it can look after the resume
            server.pause()
            try:
                paused = preflight_all(clients, sizes.outage_calls)
            finally:
                server.resume()
        finally:
            for client in clients:
                client.close()
        check_failed_closed(paused, SILENT_BOUND, redis.TimeoutError)

        # The server now runs whatever the failed calls left in its sockets.
        wait_until(lambda: not other_clients(raw), "the failed calls' connections to drain", 30)
        resumed = time.monotonic()
        with AgentBillClient(redis_url=server.url, namespace=namespace) as admin:
            after = admin.get_budget(CUSTOMER)
            landed = after.open_reservations - before.open_reservations
            assert 0 <= landed <= len(paused)
            assert reservations_made(raw, namespace, CUSTOMER) - made_before == landed
            assert after.reserved - before.reserved == ESTIMATE * landed
            assert after.spent == before.spent

            def back() -> bool:
                now = admin.get_budget(CUSTOMER)
                return (now.reserved, now.open_reservations, now.spent) == (
                    before.reserved,
                    before.open_reservations,
                    before.spent,
                )

            wait_until(back, "the stray reservations to expire", TTL + 30)
            units_back = time.monotonic() - resumed

    chaos_report.record(
        "outage",
        time.monotonic() - started,
        {
            "processes": f"1 ({threads} client threads)",
            "operations": len(unreachable) + len(paused),
            "kills": 0,
            "restarts": 0,
            "overspend": 0,
            "lost": "n/a",
            "unreachable_calls": len(unreachable),
            "unreachable_max": max(o.seconds for o in unreachable),
            "unreachable_median": statistics.median(o.seconds for o in unreachable),
            "paused_calls": len(paused),
            "paused_max": max(o.seconds for o in paused),
            "paused_median": statistics.median(o.seconds for o in paused),
            "approvals": 0,
            "landed": landed,
            "units_back": units_back,
        },
    )
