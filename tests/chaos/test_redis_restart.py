"""Chaos scenario 3, Redis restart: redis-server SIGKILLed mid-load and restarted from its AOF.

With ``appendfsync always`` no acknowledged write may be lost. With ``everysec`` the documented
window is about a second of writes on a crash of the machine; a SIGKILL of the process is what
the suite can do, and it measures what that lost (and how much a machine crash at that moment
would have put at risk).

Calls that raise StoreUnavailableError while the server is down are in doubt; the workers send
them again as the same request (the same idempotency key or reservation id) until answered, as
a careful caller would, so the final counts must come out exact.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agentbill import AgentBillClient
from tests._servers import RedisServer
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
    warm_up,
)
from tests.chaos._report import Report
from tests.chaos._sizes import Sizes

CUSTOMERS = ("hot-1", "hot-2", "hot-3")
LIMIT = 60
TOPUP = TopUp(below=12, step=24)
TTL = 5
RETRY_FOR = 60.0
PROGRESS_TIMEOUT = 120.0
# Redis's own bound on the everysec window: a write it postpones for a slow fsync waits at most
# 2 s; with no postponement, what it acknowledged is already written when a kill arrives.
EVERYSEC_WINDOW = 2.0


def aof_delayed_fsync(server: RedisServer) -> int:
    with server.client(decode_responses=True) as raw:
        return int(raw.info("persistence")["aof_delayed_fsync"])


@pytest.mark.slow
@pytest.mark.parametrize("fsync", ["always", "everysec"])
def test_a_restart_mid_load_loses_no_acknowledged_record(
    chaos_report: Report, sizes: Sizes, namespace: str, workdir: Path, fsync: str
) -> None:
    started = time.monotonic()
    restarts = sizes.restarts if fsync == "always" else 1
    server = RedisServer(extra={"appendonly": "yes", "appendfsync": fsync}).start()
    try:
        with server.client(decode_responses=True) as raw:
            config = raw.config_get("append*")
        assert (config["appendonly"], config["appendfsync"]) == ("yes", fsync)
        with AgentBillClient(redis_url=server.url, namespace=namespace) as client:
            for customer in CUSTOMERS:
                client.set_budget(customer, LIMIT)
            warm_up(client)
            base = base_spec(server.url, namespace, sizes)
            kills: list[float] = []
            downtime = 0.0
            delayed = 0
            with Fleet(workdir, sizes.workers) as fleet:
                for i in range(sizes.workers):
                    fleet.start(spec(fleet, i, base))
                fleet.wait_ready()
                with Monitor(
                    server.url,
                    namespace,
                    CUSTOMERS,
                    strict=CUSTOMERS,
                    topup=TOPUP,
                    topped=CUSTOMERS,
                ) as monitor:
                    fleet.go()
                    for _ in range(restarts + 1):
                        mark = fleet.finished_runs() + sizes.restart_ops
                        wait_until(
                            lambda: fleet.finished_runs() >= mark,  # noqa: B023
                            f"{sizes.restart_ops} more runs",
                            PROGRESS_TIMEOUT,
                        )
                        if len(kills) == restarts:
                            break
                        delayed += aof_delayed_fsync(server)
                        kills.append(time.monotonic())
                        server.kill()  # SIGKILL: no shutdown, no last write
                        # Down long enough that calls outlast the client's own retries.
                        time.sleep(sizes.down_ms / 1000)
                        server.start()  # the same port and data directory
                        downtime = max(downtime, time.monotonic() - kills[-1])
                    fleet.stop()
                    fleet.finish()
            logs = fleet.logs()

            def settled_down() -> bool:
                return all(
                    (b.reserved, b.open_reservations) == (0, 0)
                    for b in map(client.get_budget, CUSTOMERS)
                )

            # Immediate unless a lost record reopened a reservation: then its TTL closes it.
            wait_until(settled_down, "every reservation to close", TTL + 30)
            spent = {c: client.get_budget(c).spent for c in CUSTOMERS}
            settled = settlements(logs)
            outcomes = probe_outcomes(client, {s.closed for s in settled if s.closed})
            with server.client() as raw:
                made = {c: reservations_made(raw, namespace, c) for c in CUSTOMERS}
    finally:
        server.stop()

    assert all(log.ended for log in logs)
    assert monitor.violations == []
    assert overspent_approvals(logs) == []
    assert overspent_settlements(logs, CUSTOMERS) == []
    approved = approvals(logs)
    # Keys are unique per run: a replayed approval is the answer to an in-doubt first attempt.
    assert [a for a in approved if a.replayed and not a.in_doubt] == []
    assert [s for s in settled if s.replayed and not s.in_doubt] == []
    # Every approval settled, and closed by the call meant to close it (or, if its reservation
    # was lost, charged directly).
    assert sorted(s.rid for s in settled) == sorted(a.rid for a in approved)
    assert [s for s in settled if s.closed not in (s.rid, None)] == []
    direct = [s for s in settled if s.closed is None]

    lost = [s for s in settled if s.closed and outcomes[s.closed] != (s.status, s.charged)]
    by_rid = {a.rid: a.customer for a in approved}
    charged = charged_by_customer(logs)
    for customer in CUSTOMERS:
        lost_units = sum(s.charged for s in lost if by_rid[s.rid] == customer)
        assert spent[customer] == charged.get(customer, 0) - lost_units, customer
    if fsync == "always":
        assert (lost, direct) == ([], [])
        # One reservation per approval: an in-doubt preflight sent again reserved once.
        for customer in CUSTOMERS:
            assert made[customer] == sum(1 for a in approved if a.customer == customer)
    else:
        # Lost (if anything) only within the window before a kill.
        assert [s for s in lost if not any(0 <= k - s.at <= EVERYSEC_WINDOW for k in kills)] == []

    in_doubt_pf = [a for a in approved if a.in_doubt]
    in_doubt_st = [s for s in settled if s.in_doubt]
    chaos_report.record(
        f"restart-{fsync}",
        time.monotonic() - started,
        {
            "processes": len(logs),
            "operations": sum(log.preflights for log in logs) + len(settled),
            "kills": len(kills),
            "restarts": len(kills),
            "overspend": max(0, *monitor.max_over.values()),
            "lost": len(lost),
            "approvals": len(approved),
            "records": len(settled),
            "acked_before_kills": sum(1 for s in settled if s.at < kills[-1]),
            "downtime": downtime,
            "in_doubt_preflights": sum(log.doubted["preflight"] for log in logs),
            "in_doubt_preflights_landed": sum(1 for a in in_doubt_pf if a.replayed),
            "in_doubt_settles": sum(log.doubted["settle"] for log in logs),
            "in_doubt_settles_landed": sum(1 for s in in_doubt_st if s.replayed),
            "down_max": max((t for log in logs for _, t in log.downs), default=0.0),
            "lost_units": sum(s.charged for s in lost),
            "at_risk": sum(1 for s in settled if any(0 <= k - s.at <= 1.0 for k in kills)),
            "delayed_fsync": delayed,
            "spent": sum(spent.values()),
            "samples": monitor.samples,
        },
    )


def base_spec(
    url: str, namespace: str, sizes: Sizes, durability: str = "primary", api_key: str | None = None
) -> w.Spec:
    """The workers' spec these scenarios share; ``index`` and ``journal`` are set per worker."""
    return w.Spec(
        index=0,
        url=url,
        namespace=namespace,
        journal="",
        seed=sizes.seed,
        customers=CUSTOMERS,
        ttl=TTL,
        keys=True,
        retry_for=RETRY_FOR,
        durability=durability,
        api_key=api_key,
    )
