"""Where a preflight's client-side time goes: cProfile over many preflights, summed by area.

``python -m benchmarks.profile_preflight [--n 5000] [--top 25]`` starts its own redis-server,
profiles approved preflights (each released, untimed) and prints the share of profiled time per
area (agentbill, redis-py, tenacity, pydantic, the socket calls, which include waiting for
Redis) and the top functions by own time. ``make bench`` puts the area table in RESULTS.md.

cProfile charges a fixed cost to every Python function call, so many small calls look dearer
than they are; read the shares as a ranking, and the unprofiled CPU time per call (in
RESULTS.md) as the size of the whole.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
from collections import defaultdict
from typing import Any

from agentbill import AgentBillClient
from tests._servers import RedisServer

AREAS = (
    ("/agentbill/", "agentbill (validate, build the call, decode, Check)"),
    ("/redis/", "redis-py (pack the command, parse the reply, connection pool)"),
    ("/tenacity/", "tenacity (the retry wrapper around each call)"),
    ("/pydantic", "pydantic (validation)"),
)
SOCKET = "socket send/recv (includes waiting for Redis)"


def _area(func: tuple[str, int, str]) -> str:
    path, _, name = func
    if "recv" in name or "sendall" in name:
        return SOCKET
    for marker, label in AREAS:
        if marker in path:
            return label
    return "Python builtins and stdlib"


def profile_preflight(client: AgentBillClient, n: int) -> pstats.Stats:
    """Profile ``n`` approved preflights (each released outside the profile)."""
    for _ in range(200):
        client.preflight("agent", 1, "profiled").release()
    prof = cProfile.Profile()
    for _ in range(n):
        prof.enable()
        check = client.preflight("agent", 1, "profiled")
        prof.disable()
        check.release()
    return pstats.Stats(prof)


def by_area(stats: pstats.Stats) -> list[tuple[str, float]]:
    """(area, share of the profiled time), largest first."""
    raw: Any = stats.stats  # type: ignore[attr-defined]  # pstats' table, untyped in typeshed
    areas: dict[str, float] = defaultdict(float)
    for func, (_, _, tottime, _, _) in raw.items():
        areas[_area(func)] += tottime
    total = sum(areas.values()) or 1.0
    return sorted(((a, t / total) for a, t in areas.items()), key=lambda x: -x[1])


def top_functions(stats: pstats.Stats, top: int) -> str:
    out = io.StringIO()
    stats.stream = out  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main() -> None:
    from tests._servers import running

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="preflights to profile")
    parser.add_argument("--top", type=int, default=25, help="functions to list")
    parser.add_argument(
        "--server",
        action="store_true",
        help="profile redis-server instead: instructions (callgrind) and µs per call of the "
        "scripts, whole and cut at successive points",
    )
    args = parser.parse_args()
    if args.server:
        server_profile(args.n)
        return
    with running() as server:
        client = AgentBillClient(redis_url=server.url, namespace="profile")
        stats = profile_preflight(client, args.n)
        client.close()
    print(f"{args.n} preflights; share of profiled time by area:")
    for area, share in by_area(stats):
        print(f"  {share:6.1%}  {area}")
    print(top_functions(stats, args.top))


def server_profile(n: int) -> None:
    """Print the server-side tables of ``benchmarks._server_cost``."""
    from benchmarks import _server_cost as S

    meters: list[tuple[str, Any]] = []
    if S.callgrind_available():
        meters.append(("instructions", S.CallgrindServer()))
    else:
        print("valgrind not found: µs only (noisy on a loaded machine)")
    meters.append(("µs", RedisServer()))
    for unit, server in meters:
        with S.bench_on(server) as b:
            meter = S.Instructions(server) if unit == "instructions" else S.Micros(b.r)
            count = min(n, 200) if unit == "instructions" else n
            print(f"\n## redis-server {unit} per call ({count} calls)\n")
            print(f"| call | {unit} |\n| --- | ---: |")
            S.table(meter, b.cases(), count)
            for op in ("preflight", "settle"):
                print(f"\n### {op}.lua cut short: {unit} per call\n")
                print(f"| cut after | {unit} | step |\n| --- | ---: | ---: |")
                S.table(meter, b.cut_cases(op), count, steps=True)


if __name__ == "__main__":
    main()
