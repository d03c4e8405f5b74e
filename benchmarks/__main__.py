"""agentbill's benchmarks, as ratios to a redis-py PING measured in the same run.

``python -m benchmarks`` (``make bench``) starts its own redis-server processes on free ports,
keeps every vCPU awake with nice-19 busy loops, and measures: preflight and the
preflight+record pair against PING and against the peer libraries (limits, throttled-py); the
TypeScript client's preflight against an ioredis PING (``_typescript.py``);
1/2/4/8 processes on one hot customer and on 1000; a naive WATCH/MULTI reserve+settle under
contention; and the cost of a preflight with 1,000,000 customers and with 100,000 open
reservations. It writes ``benchmarks/RESULTS.md`` and ``benchmarks/results.png``.

``--quick`` runs in under a minute with smaller counts and writes nothing unless ``--out`` is
given. ``python -m benchmarks.profile_preflight`` profiles a preflight's client-side Python.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import redis

from agentbill import AgentBillClient
from benchmarks import _latency as L
from benchmarks import _report as R
from benchmarks._durability import durability_section, measure_durability
from benchmarks._hiredis import measure_hiredis
from benchmarks._memory import footprints
from benchmarks._scale import add_customers, add_open_reservations, memory
from benchmarks._server_cost import instructions as server_instructions
from benchmarks._throughput import Pool, Throughput, combine, hot, naive_key, spread
from benchmarks._timing import Op, interleave, spinners
from benchmarks._typescript import measure_typescript
from benchmarks.profile_preflight import by_area, profile_preflight
from tests._servers import RedisServer, running

HERE = Path(__file__).resolve().parent
SPREAD = 1000  # customers of the "spread" workload
NAIVE_PROCS = (1, 4)  # process counts of the WATCH/MULTI baseline
SERVER_SAMPLES = 1000  # calls per op in the server-time pass


@dataclass(frozen=True)
class Options:
    n: int
    seconds: float
    rounds: int
    procs: tuple[int, ...]
    customers: int
    open_reservations: int
    spin: bool
    out: Path | None
    memory_customers: int

    def describe(self) -> str:
        return (
            f"{self.n:,} timed calls per latency row, {self.seconds:g} s per throughput "
            f"workload (in {self.rounds} windows), {self.customers:,} customers, "
            f"{self.open_reservations:,} open reservations"
        )


def parse_options(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="small counts, < 1 minute")
    parser.add_argument("--n", type=int, help="timed calls per latency row (10000)")
    parser.add_argument("--seconds", type=float, help="wall time per throughput workload (6)")
    parser.add_argument("--procs", default="1,2,4,8", help="process counts (1,2,4,8)")
    parser.add_argument("--customers", type=int, help="customers of the big case (1000000)")
    parser.add_argument("--open", type=int, help="open reservations of the big case (100000)")
    parser.add_argument("--no-spinners", action="store_true", help="no nice-19 busy loops")
    parser.add_argument(
        "--out",
        type=Path,
        help="folder for RESULTS.md and results.png (default: benchmarks/, none with --quick)",
    )
    a = parser.parse_args(argv)
    quick = a.quick
    return Options(
        n=a.n or (1000 if quick else 10_000),
        seconds=a.seconds or (0.6 if quick else 6.0),
        rounds=2 if quick else 4,
        procs=tuple(int(p) for p in a.procs.split(",")),
        customers=a.customers if a.customers is not None else (100_000 if quick else 1_000_000),
        open_reservations=a.open if a.open is not None else (10_000 if quick else 100_000),
        spin=not a.no_spinners,
        out=a.out if a.out is not None else (None if quick else HERE),
        memory_customers=200 if quick else 1000,
    )


def git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=HERE, capture_output=True, text=True, check=False
        ).stdout.strip()

    sha = git("rev-parse", "--short", "HEAD") or "unknown"
    return f"{sha} + uncommitted changes" if git("status", "--porcelain") else sha


def machine(r: redis.Redis, spin: bool) -> list[str]:
    cores = os.cpu_count() or 1
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: Any = r.info("server")

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    hiredis = version("hiredis")
    return [
        f"machine: {cores} vCPUs ({model or platform.machine()}), {platform.system()} "
        f"{platform.release()}, load average {os.getloadavg()[0]:.2f} at the start",
        (
            f"spinners **on**: {cores} busy-loop processes at nice 19 (one per vCPU) for the "
            "whole run, so a round trip does not pay for waking an idle vCPU"
            if spin
            else "spinners **off** (`--no-spinners`): round trips pay to wake an idle vCPU"
        ),
        f"Python {platform.python_version()}, redis-py {version('redis')} "
        f"({'hiredis ' + hiredis if hiredis != 'not installed' else 'no hiredis'}), "
        f"redis-server {info['redis_version']}, limits {version('limits')}, "
        f"throttled-py {version('throttled-py')}",
    ]


class Phases:
    """Wall time per phase, printed as it goes."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        print(f"{name} ...", flush=True)
        t0 = time.perf_counter()
        yield
        self.times[name] = time.perf_counter() - t0
        print(f"{name}: {self.times[name]:.1f} s", flush=True)


def measure_latency(res: R.Results, server: RedisServer, opts: Options, phase: Phases) -> None:
    with server.client() as r:
        client = AgentBillClient(redis_url=server.url, namespace=L.NAMESPACE)
        for customer in (L.HOT, L.BATCHED):
            client.set_budget(customer, L.BIG_LIMIT)
        ours = [L.ping_op(r), *L.agentbill_ops(client)]
        peers = L.peer_ops(server.url)
        with phase("latency, one process"):
            res.latency = interleave([*ours, *L.floor_ops(client, r, opts.n), *peers], opts.n)
        with phase("redis-server time per call"):
            res.server = L.server_time(r, [*ours, *peers], min(opts.n, SERVER_SAMPLES))
            res.server[L.RAW_PREFLIGHT] = res.server[L.PREFLIGHT]
            res.server[L.RAW_PAIR] = res.server[L.PAIR]
        with phase("redis-server instructions per call (callgrind)"):
            res.instructions = server_instructions()
        with phase("profile of preflight"):
            res.profile = by_area(profile_preflight(client, min(opts.n, 3000)))
        client.close()


def measure_throughput(res: R.Results, server: RedisServer, opts: Options, phase: Phases) -> None:
    spread_customers = [f"s{i}" for i in range(SPREAD)]
    with server.client() as r:
        client = AgentBillClient(redis_url=server.url, namespace=L.NAMESPACE)
        for customer in (L.HOT, *spread_customers):
            client.set_budget(customer, L.BIG_LIMIT)
        client.close()
        r.hset(naive_key(L.HOT), mapping={"limit": L.BIG_LIMIT, "spent": 0, "reserved": 0})
        with phase("throughput, 1..N processes"), Pool(max(opts.procs)) as pool:
            for p in opts.procs:
                # Each workload in `rounds` short windows, in the order A B C C B A A B C ..., so
                # a drift of the machine's other load hits them all alike; the median counts.
                workloads: list[tuple[str, list[list[str]], str]] = [
                    ("ping", hot(L.HOT, p), "ping"),
                    ("pair", hot(L.HOT, p), "pair"),
                    ("pair", spread(spread_customers, p), "spread"),
                ]
                if p in NAIVE_PROCS:
                    workloads.append(("naive", hot(L.HOT, p), "naive"))
                order = [
                    w for i in range(opts.rounds) for w in workloads[:: 1 if i % 2 == 0 else -1]
                ]
                runs: dict[str, list[Throughput]] = {}
                for kind, customers, name in order:
                    run = pool.run(r, kind, server.url, customers, opts.seconds / opts.rounds, name)
                    runs.setdefault(name, []).append(run)
                res.throughput += [combine(v) for v in runs.values()]


def measure_scale(res: R.Results, opts: Options, phase: Phases) -> None:
    probe, crowded = "probe", "crowded"
    res.scale_names = {
        R.ONE_CUSTOMER: "preflight, 1 customer",
        R.MANY_CUSTOMERS: f"preflight, {opts.customers:,} customers",
        R.MANY_OPEN: f"preflight, {opts.open_reservations:,} open reservations",
        R.PING_BIG: f"PING, {opts.customers:,}-customer server",
    }
    with running() as small, running() as big, small.client() as rs, big.client() as rb:
        c_small = AgentBillClient(redis_url=small.url, namespace=L.NAMESPACE)
        c_big = AgentBillClient(redis_url=big.url, namespace=L.NAMESPACE)
        with phase(f"populate {opts.customers:,} customers"):
            took = add_customers(rb, c_big, opts.customers, L.BIG_LIMIT)
        for c in (c_small, c_big):
            c.set_budget(probe, L.BIG_LIMIT)
        with phase(f"populate {opts.open_reservations:,} open reservations"):
            c_big.set_budget(crowded, L.BIG_LIMIT)
            took_open = add_open_reservations(c_big, crowded, L.AGENT, opts.open_reservations)
        res.setup.append(
            f"scale setup: {opts.customers:,} customers written in {took:.1f} s, "
            f"{opts.open_reservations:,} open reservations in {took_open:.1f} s; "
            f"server memory {memory(rs)} (1 customer) and {memory(rb)} (big)"
        )

        def preflight(client: AgentBillClient, customer: str, name: str) -> Op:
            return Op(name, lambda: client.preflight(L.AGENT, 1, customer), L.release_after)

        small_ops = [preflight(c_small, probe, R.ONE_CUSTOMER)]
        big_ops = [
            preflight(c_big, probe, R.MANY_CUSTOMERS),
            preflight(c_big, crowded, R.MANY_OPEN),
        ]
        with phase("scale, interleaved on two servers"):
            res.scale = interleave(
                [Op(R.PING_SMALL, rs.ping), Op(R.PING_BIG, rb.ping), *small_ops, *big_ops], opts.n
            )
            count = min(opts.n, SERVER_SAMPLES)
            res.scale_server = {
                **L.server_time(rs, small_ops, count),
                **L.server_time(rb, big_ops, count),
            }
        c_small.close()
        c_big.close()


def main(argv: list[str] | None = None) -> int:
    opts = parse_options(argv)
    t0 = time.perf_counter()
    phase = Phases()
    cores = os.cpu_count() or 1
    with spinners(cores) if opts.spin else nullcontext(0), running() as server:
        with server.client() as r:
            res = R.Results(
                started=datetime.now(UTC),
                params=opts.describe(),
                machine=machine(r, opts.spin),
                cores=cores,
            )
        measure_latency(res, server, opts, phase)
        with phase("TypeScript preflight against an ioredis PING"):
            res.typescript = measure_typescript(server.url, opts.n)
        with phase("with and without hiredis"):
            res.hiredis = measure_hiredis(server.url, min(opts.n, 2000))
        measure_throughput(res, server, opts, phase)
        measure_scale(res, opts, phase)
        with phase("memory per customer and per 10,000 runs"), running() as quiet:
            res.memory = footprints(quiet.url, opts.memory_customers)
        with phase("replicated durability against a primary and its replica"):
            durability = durability_section(measure_durability(opts.n))
    res.phases = phase.times
    res.wall = time.perf_counter() - t0
    chart_name = "results.png"
    if opts.out is not None:
        opts.out.mkdir(parents=True, exist_ok=True)
        R.chart(res, opts.out / chart_name)
    text = R.markdown(res, git_commit(), chart_name if opts.out is not None else None)
    text = text.rstrip("\n") + "\n" + "\n".join(durability)
    if opts.out is not None:
        (opts.out / "RESULTS.md").write_text(text, encoding="utf-8")
        print(f"wrote {opts.out / 'RESULTS.md'} and {opts.out / chart_name}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
