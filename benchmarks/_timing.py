"""Timing primitives: samples and percentiles, PING-interleaved sampling, CPU spinners.

On this kind of machine a loopback round trip is dominated by waking an idle vCPU, and other
work shares the cores, so absolute times drift within one run. Two defences: every figure is a
ratio to a redis-py PING, and the operations compared are measured *interleaved*, in rotating
blocks, so a slow second hits them all alike.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

WARMUP = 200  # calls per operation before timing: connections, script cache, CPU frequency
BLOCK = 100  # calls per operation per turn of the rotation


@dataclass(frozen=True)
class Samples:
    """Wall-clock durations of one operation, in seconds, and the CPU time this process spent
    in those calls (user + system, so the kernel's share of loopback TCP is in it)."""

    times: tuple[float, ...]
    cpu: float = 0.0

    def pct(self, q: float) -> float:
        """The q-th percentile (nearest rank; q in 0..100)."""
        ordered = sorted(self.times)
        rank = round(q / 100 * (len(ordered) - 1))
        return ordered[min(max(rank, 0), len(ordered) - 1)]

    @property
    def p50(self) -> float:
        return self.pct(50)

    @property
    def p99(self) -> float:
        return self.pct(99)

    @property
    def mean(self) -> float:
        return sum(self.times) / len(self.times)

    @property
    def cpu_per_call(self) -> float:
        return self.cpu / len(self.times)


@dataclass(frozen=True)
class Op:
    """One timed operation. ``after`` runs untimed after each call, with its result (a
    preflight measured alone releases its reservation there, so nothing piles up). A call
    that does ``per_call`` operations at once (a batch) is reported per operation."""

    name: str
    call: Callable[[], Any]
    after: Callable[[Any], object] | None = None
    per_call: int = 1


def interleave(ops: Sequence[Op], n: int, block: int = BLOCK) -> dict[str, Samples]:
    """``n`` timed calls of every op, in blocks of ``block``, the order rotating each turn."""
    for op in ops:
        for _ in range(min(WARMUP, n)):
            result = op.call()
            if op.after is not None:
                op.after(result)
    times: dict[str, list[float]] = {op.name: [] for op in ops}
    cpu = dict.fromkeys(times, 0.0)
    clock, cpu_clock = time.perf_counter, time.process_time
    turns = -(-n // block)
    for turn in range(turns):
        k = turn % len(ops)
        for op in (*ops[k:], *ops[:k]):
            out = times[op.name]
            call, after = op.call, op.after
            spent = 0.0
            for _ in range(min(block, n - len(out))):
                c0 = cpu_clock()
                t0 = clock()
                result = call()
                t1 = clock()
                spent += cpu_clock() - c0
                out.append(t1 - t0)
                if after is not None:
                    after(result)
            cpu[op.name] += spent
    return {
        op.name: Samples(tuple(t / op.per_call for t in times[op.name]), cpu[op.name] / op.per_call)
        for op in ops
    }


def _spin() -> None:
    os.nice(19)
    while True:
        pass


@contextlib.contextmanager
def spinners(count: int) -> Iterator[int]:
    """``count`` busy-loop processes at nice 19 for the duration of the block.

    They keep every vCPU awake, so a round trip no longer pays for waking an idle one, and at
    the lowest priority they yield to any real work. Stopped (by their own ids) on exit.
    """
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_spin, name=f"bench-spinner-{i}", daemon=True) for i in range(count)
    ]
    for p in procs:
        p.start()
    try:
        yield count
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(timeout=5)
