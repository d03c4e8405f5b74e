"""A first benchmark: preflight and preflight+record cost, as ratios to a PING in the same run.

This machine is shared and noisy, so absolute times mean little: every figure is reported as a
ratio to redis-py's PING p50 measured against the same server in the same run. Starts its own
redis-server on a free port. Usage: ``python -m benchmarks [--n 3000]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from agentbill import AgentBillClient
from tests._servers import running


def sample(fn: Callable[[], object], n: int) -> list[float]:
    for _ in range(min(200, n)):  # warm up connections, script cache, CPU frequency
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def pct(times: list[float], q: float) -> float:
    return statistics.quantiles(times, n=100)[int(q) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=3000, help="samples per measurement")
    n = parser.parse_args().n
    with running() as server, server.client() as r:
        client = AgentBillClient(redis_url=server.url, namespace="bench")
        client.set_budget("hot", None)
        ping = sample(r.ping, n)

        def pair() -> None:
            client.preflight("agent", 1, "hot").record(1)

        rows = {
            "redis-py PING": ping,
            "preflight": sample(lambda: client.preflight("agent", 1, "hot").release(), n),
            "preflight+record pair": sample(pair, n),
            "get_budget": sample(lambda: client.get_budget("hot"), n),
        }
        base = pct(ping, 50)
        print(f"n={n} per row; ratios to PING p50 ({base * 1e6:.0f} us in this run)")
        print(f"{'operation':<24} {'p50 / PING':>11} {'p99 / PING':>11}")
        for name, times in rows.items():
            print(f"{name:<24} {pct(times, 50) / base:>11.2f} {pct(times, 99) / base:>11.2f}")
        print("note: 'preflight' includes its release (two round trips).")


if __name__ == "__main__":
    main()
