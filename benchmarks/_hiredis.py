"""The same calls with and without hiredis, each in a child process against the same server.

redis-py packs commands and parses replies with hiredis (C) when it is installed, else in
Python. A child started with ``--no-hiredis`` hides the installed hiredis from redis-py (a
``None`` in ``sys.modules`` makes ``import hiredis`` fail), so both rows run the very same
code on the same server; the children alternate, twice each, and each row is the median.
``pip install agentbill-redis[fast]`` installs hiredis.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass

ROUNDS = 2  # children per mode, alternating


@dataclass(frozen=True)
class Row:
    """One mode's figures: p50s and client CPU per call, in seconds."""

    hiredis: bool
    ping_p50: float
    preflight_p50: float
    pair_p50: float
    ping_cpu: float
    preflight_cpu: float
    pair_cpu: float


def _child(url: str, n: int, hiredis: bool) -> dict[str, float]:
    args = [sys.executable, "-m", "benchmarks._hiredis", "--url", url, "--n", str(n)]
    if not hiredis:
        args.append("--no-hiredis")
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=600)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def available() -> bool:
    try:
        import hiredis  # noqa: F401
    except ImportError:
        return False
    return True


def measure_hiredis(url: str, n: int) -> list[Row]:
    """Both modes' rows (with hiredis first); empty when hiredis is not installed."""
    if not available():
        return []
    runs: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    for i in range(ROUNDS):
        for mode in (True, False) if i % 2 == 0 else (False, True):
            runs[mode].append(_child(url, n, mode))

    def row(mode: bool) -> Row:
        def med(key: str) -> float:
            return statistics.median(r[key] for r in runs[mode])

        return Row(
            mode,
            med("ping_p50"),
            med("preflight_p50"),
            med("pair_p50"),
            med("ping_cpu"),
            med("preflight_cpu"),
            med("pair_cpu"),
        )

    return [row(True), row(False)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--no-hiredis", action="store_true")
    a = parser.parse_args()
    if a.no_hiredis:
        sys.modules["hiredis"] = None  # type: ignore[assignment]  # import hiredis now fails
    import redis.utils

    from agentbill import AgentBillClient
    from benchmarks import _latency as L
    from benchmarks._timing import Op, interleave

    assert redis.utils.HIREDIS_AVAILABLE is not a.no_hiredis
    client = AgentBillClient(redis_url=a.url, namespace="hiredis")
    client.set_budget(L.HOT, L.BIG_LIMIT)
    r = redis.Redis.from_url(a.url)
    ops = [L.ping_op(r), *L.agentbill_ops(client)[:2]]
    ping, preflight, pair = ops
    ops = [Op("ping", ping.call), Op("preflight", preflight.call, preflight.after)]
    ops.append(Op("pair", pair.call))
    got = interleave(ops, a.n)
    print(
        json.dumps(
            {
                **{f"{k}_p50": s.p50 for k, s in got.items()},
                **{f"{k}_cpu": s.cpu_per_call for k, s in got.items()},
            }
        )
    )
    client.close()


if __name__ == "__main__":
    main()
