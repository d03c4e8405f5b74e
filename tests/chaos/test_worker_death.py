"""Chaos scenario 2, worker death: workers SIGKILLed at random points between preflight and record.

A dead worker's reservation is never recorded or released by anyone: only its TTL gives the
units back, through the lazy reaper that runs at the start of every script call of that
customer. Its journal says where it died: holding an approved reservation, in the middle of a
record or release (in doubt: it may or may not have landed), or in the middle of a preflight.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import pytest

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
    probe_outcomes,
    reservations_made,
    settlements,
    spec,
    wait_until,
)
from tests.chaos._report import Report
from tests.chaos._sizes import Sizes

CUSTOMERS = ("hot-1", "hot-2")
LIMIT = 80
TOPUP = TopUp(below=16, step=32)
WORK_MS = 20.0
# Margin on Redis's clock for a preflight a worker sent just before it was killed.
MARGIN_MS = 250
REAP_LIMIT = 100  # the client default


def redis_ms(server: RedisServer) -> int:
    with server.client() as raw:
        seconds, micros = raw.time()
    return int(seconds) * 1000 + int(micros) // 1000


def running_workers(fleet: Fleet) -> list[int]:
    return [i for i in fleet.alive() if fleet.progress(i) >= 1]


def reap_calls(client: AgentBillClient, customer: str, allowed: int) -> int:
    """How many get_budget calls it takes to see every unit back (failing past ``allowed``)."""
    for calls in range(1, allowed + 1):
        budget = client.get_budget(customer)
        if (budget.reserved, budget.open_reservations) == (0, 0):
            return calls
    pytest.fail(f"{customer}: units still held after {allowed} calls past the TTL: {budget}")


@pytest.mark.slow
def test_killed_workers_units_come_back_after_the_ttl_and_nothing_is_charged_twice(
    chaos_report: Report, sizes: Sizes, namespace: str, workdir: Path
) -> None:
    started = time.monotonic()
    rng = random.Random(f"death-{sizes.seed}")
    ttl = sizes.death_ttl
    with running() as server, AgentBillClient(redis_url=server.url, namespace=namespace) as client:
        for customer in CUSTOMERS:
            client.set_budget(customer, LIMIT)
        client.preflight("warm-up", 0, "warm-up").release()
        base = w.Spec(
            index=0,
            url=server.url,
            namespace=namespace,
            journal="",
            seed=sizes.seed,
            customers=CUSTOMERS,
            ttl=ttl,
            work_ms=WORK_MS,
            how=(w.BY_ID, w.RELEASE),
        )
        with Fleet(workdir, sizes.workers + sizes.kills) as fleet:
            for i in range(sizes.workers):
                fleet.start(spec(fleet, i, base))
            fleet.wait_ready()
            with Monitor(
                server.url, namespace, CUSTOMERS, strict=CUSTOMERS, topup=TOPUP, topped=CUSTOMERS
            ) as monitor:
                fleet.go()
                following = sizes.workers
                for _ in range(sizes.kills):
                    time.sleep(rng.uniform(0.05, 0.25))  # when: chosen at random, on purpose
                    # Whom: any worker already running (replacements take a while to start).
                    wait_until(lambda: bool(running_workers(fleet)), "a running worker", 60)
                    fleet.kill(rng.choice(running_workers(fleet)))
                    fleet.start(spec(fleet, following, base))
                    following += 1
                # Every worker left, mid-run, at once: a crashed deployment.
                survivors = fleet.alive()
                fleet.wait_ready(survivors)
                wait_until(
                    lambda: all(fleet.progress(i) >= 1 for i in survivors),
                    "every surviving worker to finish a run",
                    timeout=60,
                )
                fleet.kill(*survivors)
            killed_at = redis_ms(server)
            # Redis's clock, as the reservations' expiry is: no guess about the workers' clocks.
            wait_until(
                lambda: redis_ms(server) >= killed_at + ttl * 1000 + MARGIN_MS,
                "the TTL to pass on Redis's clock",
                timeout=ttl + 30,
            )
            logs = fleet.logs()
            kills = len(fleet.killed)
            # Each dead worker held at most one reservation (approved, or its preflight in
            # flight), and every call returns up to reap_limit expired ones.
            allowed = max(1, math.ceil(kills / REAP_LIMIT))
            calls = [reap_calls(client, customer, allowed) for customer in CUSTOMERS]
            back = (redis_ms(server) - killed_at) / 1000
            spent = {c: client.get_budget(c).spent for c in CUSTOMERS}
            outcomes = probe_outcomes(client, (a.rid for a in approvals(logs)))
            with server.client() as raw:
                made = {c: reservations_made(raw, namespace, c) for c in CUSTOMERS}

    assert monitor.violations == []
    assert overspent_approvals(logs) == []
    assert overspent_settlements(logs, CUSTOMERS) == []
    approved, settled = approvals(logs), settlements(logs)
    # Acknowledged settlements: remembered as their worker was told; none a replay.
    assert [s for s in settled if s.replayed or s.closed != s.rid] == []
    mismatched = [(s, outcomes[s.rid]) for s in settled if outcomes[s.rid] != (s.status, s.charged)]
    assert mismatched == []
    # Held and never settled: expired, charged nothing.
    held = [a for log in logs for a in log.held]
    assert {outcomes[a.rid] for a in held} <= {("expired", 0)}
    # In flight at the kill: landed once, or not at all.
    in_flight = [s for log in logs for s in log.in_flight]
    for s in in_flight:
        assert outcomes[s.rid] in {
            ("recorded", s.units) if s.how == w.BY_ID else ("released", 0),
            ("expired", 0),
        }, s
    landed = [s for s in in_flight if outcomes[s.rid][0] != "expired"]
    # Reservations made: one per approval, plus at most one per preflight cut short by a kill.
    died = [log.last for log in logs if log.index in fleet.killed]
    assert len(approved) <= sum(made.values()) <= len(approved) + died.count(w.PREFLIGHT)
    # Nothing charged twice, nothing charged for an unrecorded run.
    by_rid = {a.rid: a.customer for a in approved}
    charged = charged_by_customer(logs)
    for customer in CUSTOMERS:
        assert spent[customer] == sum(
            charge for rid, (_, charge) in outcomes.items() if by_rid[rid] == customer
        )
        assert spent[customer] == charged.get(customer, 0) + sum(
            s.units for s in landed if s.how == w.BY_ID and by_rid[s.rid] == customer
        )

    chaos_report.record(
        "death",
        time.monotonic() - started,
        {
            "processes": len(logs),
            "operations": sum(log.preflights for log in logs) + len(settled),
            "kills": kills,
            "restarts": 0,
            "overspend": max(0, *monitor.max_over.values()),
            "lost": len(mismatched),
            "ttl": ttl,
            "kills_random": sizes.kills,
            "kills_final": kills - sizes.kills,
            "died_holding": sum(1 for log in logs if log.index in fleet.killed and log.held),
            "died_settling": len(in_flight),
            "in_doubt_landed": len(landed),
            "died_preflight": died.count(w.PREFLIGHT),
            "orphaned_units": sum(a.estimate for a in held),
            "approvals": len(approved),
            "settlements": len(settled),
            "units_back": back,
            "reap_calls": max(calls),
            "spent": sum(spent.values()),
            "samples": monitor.samples,
        },
    )
