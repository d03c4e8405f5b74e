"""Chaos scenario 4, dropped connections: CLIENT KILL while calls are in flight.

Redis runs a script whole, then queues its reply; a CLIENT KILL processed in between drops the
connection with the reply unsent. The client then sends the same call again, with the same
request id (a reservation id made by the client, an idempotency key, or an internal request
id), and the scripts recognise it. A call whose every attempt failed raises
StoreUnavailableError; the worker sends it again with the same key or reservation id.
Reservations keep the default one-hour TTL, so a reservation made twice would still be open
when the scenario ends.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
import redis

from agentbill import AgentBillClient
from tests._servers import RedisServer, running
from tests.chaos import _workers as w
from tests.chaos._harness import (
    Fleet,
    Monitor,
    TopUp,
    approvals,
    charged_by_customer,
    overspent_approvals,
    overspent_settlements,
    reservations_made,
    settlements,
    spec,
    warm_up,
)
from tests.chaos._report import Report
from tests.chaos._sizes import Sizes

CUSTOMERS = ("hot-1", "hot-2", "hot-3")
LIMIT = 60
TOPUP = TopUp(below=12, step=24)
RETRY_FOR = 60.0


class ConnectionKiller:
    """Drops every client connection but its own, every 10 to 40 ms, from a thread."""

    def __init__(self, server: RedisServer, seed: str) -> None:
        self.server = server
        self.rng = random.Random(seed)
        self.killed = 0
        self.rounds = 0
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ConnectionKiller:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            with self.server.client(socket_timeout=5) as raw:
                while not self._stop.wait(self.rng.uniform(0.01, 0.04)):
                    self.killed += int(
                        raw.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
                    )
                    self.rounds += 1
        except BaseException as exc:
            self._error = exc


def script_runs(raw: redis.Redis) -> int:
    stats = raw.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {"calls": 0})["calls"]) for c in ("fcall", "fcall_ro"))


@pytest.mark.slow
def test_retries_after_dropped_connections_never_reserve_or_charge_twice(
    chaos_report: Report, sizes: Sizes, namespace: str, workdir: Path
) -> None:
    started = time.monotonic()
    with (
        running() as server,
        server.client(decode_responses=True) as raw,
        AgentBillClient(redis_url=server.url, namespace=namespace) as client,
    ):
        for customer in CUSTOMERS:
            client.set_budget(customer, LIMIT)
        warm_up(client)
        base = w.Spec(
            index=0,
            url=server.url,
            namespace=namespace,
            journal="",
            seed=sizes.seed,
            customers=CUSTOMERS,
            ops=sizes.churn_ops,
            keys=True,
            retry_for=RETRY_FOR,
        )
        with Fleet(workdir, sizes.workers) as fleet:
            for i in range(sizes.workers):
                fleet.start(spec(fleet, i, base))
            fleet.wait_ready()
            runs_before = script_runs(raw)
            with (
                Monitor(
                    server.url,
                    namespace,
                    CUSTOMERS,
                    strict=CUSTOMERS,
                    topup=TOPUP,
                    topped=CUSTOMERS,
                ) as monitor,
                ConnectionKiller(server, f"dropped-{sizes.seed}") as killer,
            ):
                fleet.go()
                fleet.finish()
            runs = script_runs(raw) - runs_before
        # No TTL has passed (one hour): anything reserved twice would still be open.
        budgets = {c: client.get_budget(c) for c in CUSTOMERS}
        made = {c: reservations_made(raw, namespace, c) for c in CUSTOMERS}
    logs = fleet.logs()

    assert all(log.ended for log in logs)
    approved, settled = approvals(logs), settlements(logs)
    assert overspent_approvals(logs) == []
    assert overspent_settlements(logs, CUSTOMERS) == []
    assert monitor.violations == []
    # One key, one reservation; one reservation per approved run, each closed once.
    rids_by_key: dict[str | None, set[str]] = defaultdict(set)
    for a in approved:
        rids_by_key[a.key].add(a.rid)
    assert all(key is not None and len(rids) == 1 for key, rids in rids_by_key.items())
    assert len({a.rid for a in approved}) == len(approved)
    assert sorted(s.rid for s in settled) == sorted(a.rid for a in approved)
    assert [s for s in settled if s.closed != s.rid] == []
    # A replay only ever answers a call whose earlier attempt was in doubt.
    assert [a for a in approved if a.replayed and not a.in_doubt] == []
    assert [s for s in settled if s.replayed and not s.in_doubt] == []
    charged = charged_by_customer(logs)
    for customer in CUSTOMERS:
        budget = budgets[customer]
        assert (budget.reserved, budget.open_reservations) == (0, 0), customer
        assert made[customer] == sum(1 for a in approved if a.customer == customer), customer
        assert budget.spent == charged.get(customer, 0), customer

    answered = sum(log.preflights for log in logs) + len(settled)  # each answered once
    chaos_report.record(
        "dropped",
        time.monotonic() - started,
        {
            "processes": len(logs),
            "operations": answered,
            "kills": 0,
            "restarts": 0,
            "overspend": max(0, *monitor.max_over.values()),
            "lost": 0,
            "connections_killed": killer.killed,
            "kill_rounds": killer.rounds,
            "lost_replies": runs - answered - monitor.calls,
            "unavailable": sum(sum(log.doubted.values()) for log in logs),
            "unavailable_landed": sum(1 for a in approved if a.replayed)
            + sum(1 for s in settled if s.replayed),
            "approvals": len(approved),
            "spent": sum(b.spent for b in budgets.values()),
            "samples": monitor.samples,
        },
    )
