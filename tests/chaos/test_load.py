"""Chaos scenario 1, load: worker processes racing thousands of calls on a few hot budgets.

The overspend claim is checked at every approval (the preflight script's own reply), at every
settlement, by a monitor sampling every budget throughout, and on the final counters. Workers
record at most their estimate on the hot customers: a record above its estimate is charged in
full by design, which is the one way spent can pass a limit; a fourth customer takes such
records, and the suite measures how far past its limit they take it.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agentbill import AgentBillClient
from tests._servers import running
from tests.chaos import _workers as w
from tests.chaos._harness import (
    Fleet,
    Monitor,
    TopUp,
    approvals,
    charged_by_customer,
    inconsistent_checks,
    overspent_approvals,
    overspent_settlements,
    reservations_made,
    settlements,
    spec,
    warm_up,
)
from tests.chaos._report import Report
from tests.chaos._sizes import Sizes

HOT = ("hot-1", "hot-2", "hot-3")
OVERSHOOT = "overshoot"
START_LIMIT = 60
OVERSHOOT_LIMIT = 150
# Topped up by a little whenever almost nothing is left: refusals and approvals all run long.
TOPUP = TopUp(below=12, step=24)


@pytest.mark.slow
def test_racing_processes_never_overspend_and_every_unit_is_counted(
    chaos_report: Report, sizes: Sizes, namespace: str, workdir: Path
) -> None:
    started = time.monotonic()
    customers = (*HOT, OVERSHOOT)
    with running() as server, AgentBillClient(redis_url=server.url, namespace=namespace) as client:
        for customer in HOT:
            client.set_budget(customer, START_LIMIT)
        client.set_budget(OVERSHOOT, OVERSHOOT_LIMIT)
        warm_up(client)
        base = w.Spec(
            index=0,
            url=server.url,
            namespace=namespace,
            journal="",
            seed=sizes.seed,
            customers=HOT,
            overshoot=(OVERSHOOT,),
            ops=sizes.load_ops,
        )
        with Fleet(workdir, sizes.workers) as fleet:
            for i in range(sizes.workers):
                fleet.start(spec(fleet, i, base))
            fleet.wait_ready()
            with Monitor(
                server.url, namespace, customers, strict=HOT, topup=TOPUP, topped=HOT
            ) as monitor:
                fleet.go()
                fleet.finish()
        budgets = {c: client.get_budget(c) for c in customers}
        with server.client() as raw:
            made = {c: reservations_made(raw, namespace, c) for c in customers}
    logs = fleet.logs()

    assert all(log.ended for log in logs)
    approved, settled = approvals(logs), settlements(logs)
    # At every approval, settlement and sample: spent + reserved <= limit.
    assert overspent_approvals(logs) == []
    assert inconsistent_checks(logs) == []
    assert overspent_settlements(logs, HOT) == []
    assert monitor.violations == []
    # Every approval closed once, by the call meant to close it.
    assert sorted(s.rid for s in settled) == sorted(a.rid for a in approved)
    assert [s for s in settled if s.replayed or s.closed != s.rid] == []
    charged = charged_by_customer(logs)
    for customer in customers:  # one reservation per approval, none more
        assert made[customer] == sum(1 for a in approved if a.customer == customer), customer
    for customer in HOT:
        budget = budgets[customer]
        assert budget.limit is not None
        assert (budget.reserved, budget.open_reservations) == (0, 0), customer
        assert budget.spent == charged.get(customer, 0), customer
        assert budget.spent <= budget.limit
        # Contended: both answers happened, throughout (the limit was topped up).
        assert any(a.customer == customer for a in approved), customer
        assert any(r[0] == customer for log in logs for r in log.refusals), customer

    by_rid = {a.rid: a for a in approved}
    overshoot = sum(
        max(0, s.charged - by_rid[s.rid].estimate)
        for s in settled
        if by_rid[s.rid].customer == OVERSHOOT
    )
    over = budgets[OVERSHOOT]
    assert (over.reserved, over.open_reservations) == (0, 0)
    assert over.spent == charged.get(OVERSHOOT, 0)
    assert over.spent <= OVERSHOOT_LIMIT + overshoot

    hot = [a for a in approved if a.customer in HOT]
    chaos_report.record(
        "load",
        time.monotonic() - started,
        {
            "processes": len(logs),
            "operations": sum(log.preflights for log in logs) + len(settled),
            "kills": 0,
            "restarts": 0,
            "overspend": max(
                0,
                *(a.committed - (a.limit or 0) for a in hot),
                *(monitor.max_over[c] for c in HOT),
            ),
            "lost": 0,
            "preflights": sum(log.preflights for log in logs),
            "approvals": len(approved),
            "refusals": sum(len(log.refusals) for log in logs),
            "settlements": len(settled),
            "edge": sum(1 for a in approved if a.committed == a.limit),
            "samples": monitor.samples,
            "topups": monitor.topups,
            "spent": sum(budgets[c].spent for c in HOT),
            "charged": sum(charged.get(c, 0) for c in HOT),
            "reserved": sum(b.reserved for b in budgets.values()),
            "overshoot_units": overshoot,
            "overshoot_over": max(0, over.spent - OVERSHOOT_LIMIT),
            "overshoot_limit": OVERSHOOT_LIMIT,
        },
    )
