"""A client inherited across fork() works in the child, whatever the parent's threads were doing.

Every lock a client owns (the outage ledger's, the background flusher's, the connection slots')
is made anew in a forked child: a child forked while another thread of the parent held one
would otherwise wait for it forever. The child starts with an empty outage ledger (its parent
keeps the queue), so no settlement is delivered by two processes.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from agentbill import AgentBillClient
from tests._faults import AGENT, CUSTOMER
from tests._servers import RedisServer

CHILDREN = 50
CHILD_TIMEOUT = 30.0
"""Seconds the children get, all together, to settle and exit; a hung one never does."""


def _child(client: AgentBillClient, reservation_id: str) -> int:
    """In the forked child: settle one run and deliver it; the exit status says how it went."""
    try:
        settled = client.record(AGENT, 1, CUSTOMER, reservation_id=reservation_id)
        if settled.status == "queued" and client.flush() != 0:
            return 2
        return 0 if settled.status in ("recorded", "queued") else 3
    except BaseException:
        return 4


def _wait_all(pids: list[int]) -> tuple[list[int], int]:
    """Exit statuses of the children that finished, and how many hung (killed)."""
    statuses: dict[int, int] = {}
    deadline = time.monotonic() + CHILD_TIMEOUT
    while len(statuses) < len(pids) and time.monotonic() < deadline:
        for pid in pids:
            if pid not in statuses:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    statuses[pid] = os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    hung = [pid for pid in pids if pid not in statuses]
    for pid in hung:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return list(statuses.values()), len(hung)


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
@pytest.mark.parametrize("background_settle", [False, True], ids=["plain", "background"])
def test_children_forked_while_other_threads_use_the_client_never_hang(
    redis_server: RedisServer, namespace: str, background_settle: bool
) -> None:
    with AgentBillClient(
        redis_url=redis_server.url,
        namespace=namespace,
        on_outage="fail_open",
        background_settle=background_settle,
    ) as client:
        checks = [client.preflight(AGENT, 1, CUSTOMER) for _ in range(CHILDREN)]
        stop = threading.Event()

        def busy_with_the_ledger() -> None:
            while not stop.is_set():
                client.outage_stats  # noqa: B018 (takes the ledger's lock)
                client.flush()

        def busy_with_redis() -> None:
            while not stop.is_set():
                client.get_budget(CUSTOMER)

        threads = [threading.Thread(target=busy_with_the_ledger) for _ in range(3)]
        threads += [threading.Thread(target=busy_with_redis) for _ in range(2)]
        for t in threads:
            t.start()
        pids = []
        try:
            for check in checks:
                assert check.reservation_id is not None
                pid = os.fork()
                if pid == 0:  # the child
                    os._exit(_child(client, check.reservation_id))
                pids.append(pid)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
        statuses, hung = _wait_all(pids)
        assert hung == 0
        assert statuses == [0] * CHILDREN
        budget = client.get_budget(CUSTOMER)
        assert (budget.spent, budget.reserved, budget.open_reservations) == (CHILDREN, 0, 0)
        assert client.outage_stats.delivered == 0  # the children's queues were their own
