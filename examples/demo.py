"""agentbill demo: worker processes share customer budgets on the embedded local server.

Four worker processes run agent jobs for three customers. Every job is preflighted against a
per-request ceiling and its customer's budget before it "runs"; some jobs fail and release
their reservation. The table at the end shows what was approved and refused, and that no
customer was charged past its limit.

Run with ``make demo``. Data lives in ./.agentbill-demo (AGENTBILL_HOME); the demo stops the
local server it started.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import random
import sys
import uuid
from collections import Counter
from pathlib import Path

from agentbill import AgentBillClient
from agentbill._local import local_status, stop_local_server

CEILING = 40
BUDGETS: dict[str, int | None] = {"acme": 600, "globex": 250, "initech": None}
WORKERS = 4
JOBS_PER_WORKER = 60


def worker(namespace: str, seed: int) -> tuple[Counter[str], Counter[str]]:
    """Run jobs; return (decisions by outcome, units charged by customer)."""
    rng = random.Random(seed)
    decisions: Counter[str] = Counter()
    charged: Counter[str] = Counter()
    with AgentBillClient(api_key="agb_demo", ceiling=CEILING, namespace=namespace) as client:
        for _ in range(JOBS_PER_WORKER):
            customer = rng.choice(list(BUDGETS))
            estimate = rng.randint(5, 50)
            check = client.preflight("researcher", estimate, customer)
            if not check.approved:
                decisions[f"refused: {check.reason}"] += 1
                continue
            decisions["approved"] += 1
            if rng.random() < 0.1:  # the agent crashed: nothing to charge
                check.release()
                decisions["released after failure"] += 1
                continue
            used = rng.randint(estimate // 2, estimate)  # runs often use less than estimated
            charged[customer] += check.record(used).charged
    return decisions, charged


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    home = Path(os.environ.setdefault("AGENTBILL_HOME", str(Path(".agentbill-demo").resolve())))
    os.environ.pop("AGENTBILL_REDIS_URL", None)  # the demo runs on the embedded default
    was_running = local_status().running
    try:
        # A namespace of its own per run, so every run starts from empty budgets.
        namespace = f"demo-{uuid.uuid4().hex[:8]}"
        with AgentBillClient(namespace=namespace) as admin:
            for customer, limit in BUDGETS.items():
                admin.set_budget(customer, limit)
            ctx = mp.get_context("spawn")
            with ctx.Pool(WORKERS) as pool:
                results = pool.starmap(worker, [(namespace, seed) for seed in range(WORKERS)])
            decisions: Counter[str] = Counter()
            charged: Counter[str] = Counter()
            for d, c in results:
                decisions.update(d)
                charged.update(c)
            report(admin, decisions, charged, home)
            overspent = [
                c for c, limit in BUDGETS.items()
                if limit is not None and admin.get_budget(c).spent > limit
            ]  # fmt: skip
    finally:
        if not was_running:
            stop_local_server()
    if overspent:
        print(f"OVERSPEND: {overspent}")
        return 1
    print("no overspend: every customer's spent <= its limit")
    return 0


def report(
    admin: AgentBillClient, decisions: Counter[str], charged: Counter[str], home: Path
) -> None:
    print(f"\n{WORKERS} workers x {JOBS_PER_WORKER} jobs, ceiling {CEILING} units per run")
    print(f"local server data: {home}\n")
    for outcome, count in sorted(decisions.items()):
        print(f"  {outcome:<32} {count:>4}")
    print(f"\n  {'customer':<10} {'limit':>9} {'spent':>7} {'reserved':>9} {'workers charged':>16}")
    for customer in BUDGETS:
        b = admin.get_budget(customer)
        limit = "unlimited" if b.limit is None else str(b.limit)
        row = f"  {customer:<10} {limit:>9} {b.spent:>7} {b.reserved:>9} {charged[customer]:>16}"
        print(row)
    print()


if __name__ == "__main__":
    sys.exit(main())
