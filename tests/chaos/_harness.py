"""The test's side of a chaos scenario: a fleet of worker processes, a budget monitor, and
reading back what every worker journaled.

Nothing here sleeps in the hope that something happened: every wait polls a condition with a
deadline and fails the test, naming what it waited for, when the deadline passes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
import redis

from agentbill import AgentBillClient, BudgetStatus, StoreUnavailableError
from agentbill._keys import KeySpace
from tests._processes import CTX
from tests.chaos import _workers as w

# Generous: the first worker of a session starts the fork server (tests/_processes.py), an
# interpreter that imports agentbill, which on a loaded 2-core machine can take seconds.
READY_TIMEOUT = 120.0
FINISH_TIMEOUT = 240.0


def wait_until(
    predicate: Callable[[], bool], what: str, timeout: float, pause: float = 0.02
) -> None:
    """Poll ``predicate`` until it holds; fail the test naming ``what`` if it never does."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(pause)


# -- reading journals ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Approval:
    rid: str
    customer: str
    estimate: int
    committed: int
    """spent + reserved right after this approval, from the script's own reply."""
    limit: int | None
    remaining: int | None
    """As the Check reported it."""
    replayed: bool
    key: str | None
    in_doubt: bool
    """An earlier attempt of this preflight raised StoreUnavailableError."""


@dataclass(frozen=True, slots=True)
class Settling:
    rid: str
    how: str
    units: int


@dataclass(frozen=True, slots=True)
class Settled:
    rid: str
    closed: str | None
    """The reservation the settlement reports closing (None: none, e.g. a direct charge)."""
    how: str
    units: int
    status: str
    charged: int
    released: int
    replayed: bool
    committed: int | None
    limit: int | None
    at: float
    """time.monotonic() when the settlement returned."""
    in_doubt: bool


@dataclass(slots=True)
class WorkerLog:
    """Everything one worker journaled, in order, and where it stopped."""

    index: int
    ready: bool = False
    ended: bool = False
    error: str | None = None
    last: str | None = None
    """The kind of the last complete line: where a killed worker was."""
    preflights: int = 0
    approvals: list[Approval] = field(default_factory=list)
    refusals: list[tuple[str, int, str]] = field(default_factory=list)
    settling: dict[str, Settling] = field(default_factory=dict)
    settled: dict[str, Settled] = field(default_factory=dict)
    downs: list[tuple[str, float]] = field(default_factory=list)
    """Every StoreUnavailableError: (operation, seconds the failed call took)."""
    doubted: dict[str, int] = field(default_factory=lambda: {"preflight": 0, "settle": 0})
    """Calls (each sent again until answered) that raised StoreUnavailableError at least once."""

    @property
    def in_flight(self) -> list[Settling]:
        """Settlements sent but never acknowledged (the worker died waiting)."""
        return [s for rid, s in self.settling.items() if rid not in self.settled]

    @property
    def held(self) -> list[Approval]:
        """Approvals the worker never began to settle."""
        return [a for a in self.approvals if a.rid not in self.settling]


def read_journal(index: int, path: Path) -> WorkerLog:
    log = WorkerLog(index)
    if not path.exists():
        return log
    lines = path.read_text(encoding="utf-8").split("\n")
    key: str | None = None
    doubt = {"preflight": False, "settle": False}
    for number, line in enumerate(lines):
        if not line:
            continue
        try:
            event: list[Any] = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) - 1:
                break  # killed in the middle of a line: the call after it never started
            raise
        kind = event[0]
        log.last = kind
        if kind == w.READY:
            log.ready = True
        elif kind == w.PREFLIGHT:
            log.preflights += 1
            key = event[3]
            doubt["preflight"] = False
        elif kind == w.DOWN:
            log.doubted[event[1]] += not doubt[event[1]]
            doubt[event[1]] = True
            log.downs.append((event[1], float(event[2])))
        elif kind == w.APPROVED:
            rid, customer, estimate, committed, limit, remaining, replayed = event[1:]
            log.approvals.append(
                Approval(
                    rid,
                    customer,
                    estimate,
                    committed,
                    limit,
                    remaining,
                    replayed,
                    key,
                    doubt["preflight"],
                )
            )
        elif kind == w.REFUSED:
            log.refusals.append((event[1], event[2], event[3]))
        elif kind == w.SETTLING:
            log.settling[event[1]] = Settling(event[1], event[2], event[3])
            doubt["settle"] = False
        elif kind == w.SETTLED:
            rid, closed, how, units, status, charged, released, replayed = event[1:9]
            committed, limit, at = event[9:]
            log.settled[rid] = Settled(
                rid,
                closed,
                how,
                units,
                status,
                charged,
                released,
                replayed,
                committed,
                limit,
                at,
                doubt["settle"],
            )
        elif kind == w.END:
            log.ended = True
        elif kind == w.ERROR:
            log.error = event[1]
    return log


# -- the fleet -----------------------------------------------------------------------------------


class Fleet:
    """The worker processes of one scenario; worker i journals to ``workdir/worker-i.jsonl``.

    ``slots`` bounds how many workers it may ever start (replacements included). Leaving the
    ``with`` block kills every worker still running.
    """

    def __init__(self, workdir: Path, slots: int) -> None:
        self.workdir = workdir
        self.shared = CTX.Array("q", [w.WAIT] + [-1] * slots, lock=False)
        self.procs: dict[int, BaseProcess] = {}
        self.killed: list[int] = []

    def __enter__(self) -> Fleet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for proc in self.procs.values():
            if proc.is_alive():
                proc.kill()
        for proc in self.procs.values():
            proc.join(timeout=30)

    def journal(self, index: int) -> Path:
        return self.workdir / f"worker-{index}.jsonl"

    def start(self, spec: w.Spec) -> None:
        assert spec.index not in self.procs
        assert spec.journal == str(self.journal(spec.index))
        proc = CTX.Process(target=w.main, args=(spec, self.shared), daemon=True)
        proc.start()
        self.procs[spec.index] = proc

    def progress(self, index: int) -> int:
        """-1 until worker ``index`` is ready, then the runs it finished."""
        return int(self.shared[1 + index])

    def finished_runs(self) -> int:
        return sum(max(0, self.progress(i)) for i in self.procs)

    def alive(self) -> list[int]:
        return [i for i, proc in self.procs.items() if proc.is_alive()]

    def wait_ready(self, indexes: Iterable[int] | None = None) -> None:
        todo = list(self.procs if indexes is None else indexes)

        def ready() -> bool:
            for i in todo:
                if self.progress(i) < 0 and not self.procs[i].is_alive():
                    pytest.fail(f"worker {i} died before it was ready:\n{self.error(i)}")
            return all(self.progress(i) >= 0 for i in todo)

        wait_until(ready, "every worker to connect", READY_TIMEOUT, pause=0.01)

    def go(self) -> None:
        self.shared[w.CONTROL] = w.GO

    def stop(self) -> None:
        self.shared[w.CONTROL] = w.STOP

    def kill(self, *indexes: int) -> None:
        """SIGKILL: no cleanup, no goodbye, whatever the worker was doing."""
        for i in indexes:
            self.procs[i].kill()
        for i in indexes:
            self.procs[i].join(timeout=30)
            self.killed.append(i)

    def finish(self, timeout: float = FINISH_TIMEOUT) -> None:
        """Wait for every worker not killed to exit; fail with its traceback if one failed."""
        deadline = time.monotonic() + timeout
        for i, proc in self.procs.items():
            if i in self.killed:
                continue
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.exitcode is None:
                pytest.fail(f"worker {i} still running after {timeout:.0f} s")
            if proc.exitcode != 0:
                pytest.fail(f"worker {i} exited with {proc.exitcode}:\n{self.error(i)}")

    def error(self, index: int) -> str:
        return read_journal(index, self.journal(index)).error or "(no traceback journaled)"

    def logs(self) -> list[WorkerLog]:
        return [read_journal(i, self.journal(i)) for i in sorted(self.procs)]


def spec(fleet: Fleet, index: int, base: w.Spec) -> w.Spec:
    """``base`` made worker ``index``'s: its own journal and its own random seed."""
    return dataclasses.replace(
        base, index=index, journal=str(fleet.journal(index)), seed=base.seed * 1000 + index
    )


# -- the monitor ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TopUp:
    """Raise a customer's limit by ``step`` whenever fewer than ``below`` units remain, so the
    workers race at the edge of the budget for the whole run, not only until it runs out."""

    below: int
    step: int


class Monitor:
    """Samples every budget from a thread of the test process until stopped.

    ``strict`` customers must show spent + reserved <= limit at every sample; the others are
    only measured (``max_over``). Calls that raise StoreUnavailableError are counted, not
    fatal: some scenarios take Redis away on purpose.
    """

    def __init__(
        self,
        url: str,
        namespace: str,
        customers: Sequence[str],
        *,
        strict: Collection[str],
        topup: TopUp | None = None,
        topped: Collection[str] = (),
    ) -> None:
        self.url = url
        self.namespace = namespace
        self.customers = list(customers)
        self.strict = set(strict)
        self.topup = topup
        self.topped = set(topped)
        self.samples = 0
        self.unavailable = 0
        self.topups = 0
        self.calls = 0
        """Script calls that returned (samples and top-ups)."""
        self.violations: list[BudgetStatus] = []
        self.max_over: dict[str, int] = dict.fromkeys(customers, 0)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _run(self) -> None:
        try:
            with AgentBillClient(redis_url=self.url, namespace=self.namespace) as client:
                while not self._stop.wait(0.002):
                    for customer in self.customers:
                        self._sample(client, customer)
        except BaseException as exc:
            self._error = exc

    def _sample(self, client: AgentBillClient, customer: str) -> None:
        try:
            budget = client.get_budget(customer)
        except StoreUnavailableError:
            self.unavailable += 1
            return
        self.samples += 1
        self.calls += 1
        if budget.limit is None:
            return
        over = budget.spent + budget.reserved - budget.limit
        self.max_over[customer] = max(self.max_over[customer], over)
        if over > 0 and customer in self.strict:
            self.violations.append(budget)
        if (
            self.topup is not None
            and customer in self.topped
            and budget.limit - budget.spent - budget.reserved < self.topup.below
        ):
            with contextlib.suppress(StoreUnavailableError):
                client.set_budget(customer, budget.limit + self.topup.step)
                self.topups += 1
                self.calls += 1


# -- checking what the workers saw ----------------------------------------------------------------


def approvals(logs: Iterable[WorkerLog]) -> list[Approval]:
    return [a for log in logs for a in log.approvals]


def settlements(logs: Iterable[WorkerLog]) -> list[Settled]:
    return [s for log in logs for s in log.settled.values()]


def overspent_approvals(logs: Iterable[WorkerLog]) -> list[Approval]:
    """Approvals after which spent + reserved stood above the limit: must be none, ever."""
    return [a for a in approvals(logs) if a.limit is not None and a.committed > a.limit]


def inconsistent_checks(logs: Iterable[WorkerLog]) -> list[Approval]:
    """Approvals whose Check.remaining disagrees with the counters the script replied."""
    return [
        a
        for a in approvals(logs)
        if a.limit is not None and a.remaining != max(0, a.limit - a.committed)
    ]


def overspent_settlements(logs: Iterable[WorkerLog], strict: Collection[str]) -> list[Settled]:
    """Settlements of strict customers that left spent + reserved above the limit."""
    by_rid = {a.rid: a.customer for a in approvals(logs)}
    return [
        s
        for s in settlements(logs)
        if by_rid[s.rid] in strict
        and s.limit is not None
        and s.committed is not None
        and s.committed > s.limit
    ]


def charged_by_customer(logs: Iterable[WorkerLog]) -> dict[str, int]:
    """What the workers were told they were charged, per customer."""
    logs = list(logs)
    by_rid = {a.rid: a.customer for a in approvals(logs)}
    out: dict[str, int] = {}
    for s in settlements(logs):
        out[by_rid[s.rid]] = out.get(by_rid[s.rid], 0) + s.charged
    return out


def probe_outcomes(client: AgentBillClient, rids: Iterable[str]) -> dict[str, tuple[str, int]]:
    """How each reservation closed: (status, charged).

    Asked with release(), which for a reservation already closed changes nothing and answers
    with the first close's status and charge, and for one Redis never heard of (or forgot)
    answers ``noop``. Ask only once nothing is open: release() would close an open one (and
    the assertion below fails on it).
    """
    out: dict[str, tuple[str, int]] = {}
    for rid in rids:
        settled = client.release(rid)
        assert settled.replayed or settled.status == "noop", (rid, settled)
        out[rid] = (settled.status, settled.charged)
    return out


def warm_up(client: AgentBillClient) -> None:
    """Load the library into the server, so no worker's first call pays for loading it."""
    client.preflight("warm-up", 0, "warm-up").release()
    client.record("warm-up", 0, "warm-up")


def reservations_made(raw: redis.Redis, namespace: str, customer: str) -> int:
    """How many reservations Redis ever created for ``customer``: the budget's sequence counter,
    read behind the client's back. A retry that reserved twice shows here even once closed."""
    key = KeySpace(namespace).customer(customer).budget
    return int(raw.hget(key, "seq") or 0)
