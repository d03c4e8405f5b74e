"""Many processes at once: each with its own client, for a fixed wall time, ops/s summed.

A pool of worker processes is started once (spawned, so each builds its own connections) and
reused for every configuration; a task names what to run (``KINDS``), against which server and
customers, and the wall-clock window (``time.monotonic`` is system-wide on Linux, so every
worker starts and stops together). Workers not needed by a configuration wait, idle.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import redis

from agentbill import AgentBillClient
from benchmarks._latency import AGENT, NAMESPACE

SETTLE = 0.3  # seconds between handing out tasks and the window's start (workers are ready)
WARM_OPS = 50


@dataclass(frozen=True)
class Task:
    kind: str
    url: str
    customers: tuple[str, ...]
    start: float
    end: float


@dataclass(frozen=True)
class Throughput:
    """One configuration's outcome: summed ops/s, WATCH retries per op, redis-server CPU."""

    kind: str
    """The workload: a KIND, or a name the caller gave it (``spread``)."""
    procs: int
    ops_per_s: float
    retries_per_op: float
    server_cores: float
    """redis-server CPU seconds per wall second in the window (1.0 = one core busy)."""
    client_cores: float
    """The worker processes' CPU, summed, per wall second."""
    other_cores: float
    """Everything else the machine ran at normal priority (other users' work), per wall
    second; the nice-19 spinners are not counted."""


def naive_key(customer: str) -> str:
    return f"naive:{{{customer}}}:budget"


def naive_pair(r: redis.Redis, key: str) -> int:
    """A naive optimistic-locking reserve+settle of a budget hash (limit, spent, reserved):
    WATCH, read, check, MULTI/EXEC the reservation (again on WatchError); then settle in a
    MULTI/EXEC (increments commute: no WATCH needed). Returns how many times it retried."""
    retries = 0
    with r.pipeline() as pipe:
        while True:
            try:
                pipe.watch(key)  # type: ignore[no-untyped-call]
                limit, spent, reserved = pipe.hmget(key, ["limit", "spent", "reserved"])
                if int(spent or 0) + int(reserved or 0) + 1 > int(limit or 0):
                    raise RuntimeError("naive budget exhausted: raise its limit")
                pipe.multi()
                pipe.hincrby(key, "reserved", 1)
                pipe.execute()
                break
            except redis.WatchError:
                retries += 1
        pipe.hincrby(key, "reserved", -1)
        pipe.hincrby(key, "spent", 1)
        pipe.execute()
    return retries


def _op(kind: str, url: str, customers: Sequence[str]) -> Callable[[], int]:
    cycle = itertools.cycle(customers)
    if kind == "pair":
        client = AgentBillClient(redis_url=url, namespace=NAMESPACE)

        def pair() -> int:
            client.preflight(AGENT, 1, next(cycle)).record(1)
            return 0

        return pair
    r = redis.Redis.from_url(url)
    if kind == "ping":

        def ping() -> int:
            r.ping()
            return 0

        return ping
    if kind == "naive":
        keys = itertools.cycle([naive_key(c) for c in customers])
        return lambda: naive_pair(r, next(keys))
    raise ValueError(f"unknown kind {kind!r}")


KINDS = ("ping", "pair", "naive")


def _serve(inbox: Connection) -> None:
    """A worker: run each task it is handed, reply (ops, retries, late start in seconds, CPU
    seconds in the window)."""
    ops_cache: dict[tuple[str, str, tuple[str, ...]], Callable[[], int]] = {}
    inbox.send("ready")
    while (task := inbox.recv()) is not None:
        key = (task.kind, task.url, task.customers)
        op = ops_cache.get(key) or ops_cache.setdefault(key, _op(*key))
        for _ in range(WARM_OPS):
            op()
        late = time.monotonic() - task.start
        if late < 0:
            time.sleep(-late)
        ops = retries = 0
        end = task.end
        cpu = time.process_time()
        while time.monotonic() < end:
            retries += op()
            ops += 1
        inbox.send((ops, retries, max(late, 0.0), time.process_time() - cpu))


class Pool:
    """``size`` spawned worker processes, each driven through its own pipe."""

    def __init__(self, size: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._pipes: list[Connection] = []
        self._procs: list[Any] = []
        for i in range(size):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(theirs,), name=f"bench-worker-{i}")
            proc.start()
            self._pipes.append(mine)
            self._procs.append(proc)
        for pipe in self._pipes:  # every worker has imported everything and is listening
            if pipe.recv() != "ready":
                raise RuntimeError("a benchmark worker did not start")

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for pipe in self._pipes:
            with contextlib.suppress(OSError):
                pipe.send(None)
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)

    def run(
        self,
        r: redis.Redis,
        kind: str,
        url: str,
        customers: Sequence[Sequence[str]],
        seconds: float,
        workload: str | None = None,
    ) -> Throughput:
        """``len(customers)`` workers run ``kind`` for ``seconds``, worker i cycling through
        ``customers[i]``; ``r`` (a client of the same server) reads its CPU use. The result
        is labelled ``workload`` (default: ``kind``)."""
        procs = len(customers)
        start = time.monotonic() + SETTLE + 0.05 * procs
        end = start + seconds
        for pipe, mine in zip(self._pipes, customers, strict=False):
            pipe.send(Task(kind, url, tuple(mine), start, end))
        time.sleep(max(0.0, start - time.monotonic()))
        server0, machine0 = _server_cpu(r), _machine_cpu()
        time.sleep(max(0.0, end - time.monotonic()))
        server1, machine1 = _server_cpu(r), _machine_cpu()
        replies = [pipe.recv() for pipe in self._pipes[:procs]]
        ops = sum(reply[0] for reply in replies)
        retries = sum(reply[1] for reply in replies)
        late = max(reply[2] for reply in replies)
        if late > 0.1 * seconds:
            print(f"  warning: a {kind} worker started {late:.2f}s late")
        server = (server1 - server0) / seconds
        clients = sum(reply[3] for reply in replies) / seconds
        return Throughput(
            kind=workload or kind,
            procs=procs,
            ops_per_s=ops / seconds,
            retries_per_op=retries / max(ops, 1),
            server_cores=server,
            client_cores=clients,
            other_cores=max(0.0, (machine1 - machine0) / seconds - server - clients),
        )


def combine(runs: Sequence[Throughput]) -> Throughput:
    """Windows of one workload (equal lengths) as one: the median of each figure."""

    def median(field: str) -> float:
        return statistics.median(float(getattr(t, field)) for t in runs)

    return Throughput(
        kind=runs[0].kind,
        procs=runs[0].procs,
        ops_per_s=median("ops_per_s"),
        retries_per_op=median("retries_per_op"),
        server_cores=median("server_cores"),
        client_cores=median("client_cores"),
        other_cores=median("other_cores"),
    )


def _server_cpu(r: redis.Redis) -> float:
    info: Any = r.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def _machine_cpu() -> float:
    """CPU seconds the whole machine spent busy at normal priority so far (/proc/stat: user,
    system, irq, softirq, steal; not nice, so not the spinners); 0.0 where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return 0.0
    user, _nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def hot(customer: str, procs: int) -> list[list[str]]:
    """Every process on the same customer."""
    return [[customer] for _ in range(procs)]


def spread(customers: Sequence[str], procs: int) -> list[list[str]]:
    """The customers dealt out to the processes: disjoint slices, together all of them."""
    return [list(customers[i::procs]) for i in range(procs)]
