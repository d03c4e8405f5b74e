"""Where redis-server's time goes in agentbill's scripts: instructions and µs per call.

Two meters with one interface (``Meter.per_call``: the server's cost of one call):

- :class:`Instructions`: redis-server runs under valgrind's callgrind, which counts the
  instructions executed inside ``processInputBuffer`` (parsing a command and running it,
  a script and every command it issues included), zeroed before a block of calls and dumped
  after it. The count is the same on a quiet machine and a loaded one, to a fraction of a
  percent: the figure to judge a change by on a shared machine.
- :class:`Micros`: the server's own clock, INFO commandstats reset before a block of calls;
  the median over blocks of µs per call. It moves with the machine's load.

:func:`preflight_cuts` and :func:`settle_cuts` are the Functions library with an early
``return`` put at successive points of one operation, run with the KEYS/ARGV of real calls
(FCALL, as the client sends them): the step between two cuts is what the code between them
costs. :func:`replayed_commands` is a function issuing the commands an approved preflight
issues (read with MONITOR), replayed with the same arguments and no logic: the floor of the
commands themselves.

``python -m benchmarks.profile_preflight --server`` prints all of it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shlex
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import redis

from agentbill import AgentBillClient, _core, _scripts
from agentbill._check import BaseCheck
from tests._servers import RedisServer

NAMESPACE = "cost"
AGENT = "agent"
CUSTOMER = "hot"
BIG_LIMIT = 10**15
SCRIPT_COMMANDS = ("evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "fcall_ro")


class Meter(Protocol):
    """The server's cost of one call of an operation, in the meter's unit."""

    unit: str

    def per_call(self, case: Case, n: int) -> float: ...


@dataclass
class Case:
    """One measured operation: ``prepare()`` makes one call's input, untimed; ``call(input)`` is
    measured; ``after(inputs)`` cleans up a block, untimed (releases its reservations, say)."""

    name: str
    call: Callable[[Any], object]
    prepare: Callable[[], Any] = lambda: None
    after: Callable[[list[Any]], object] | None = None
    note: str = ""


class Micros:
    """µs per call by the server's clock (INFO commandstats), the median over blocks."""

    unit = "µs"

    def __init__(self, r: redis.Redis, block: int = 100) -> None:
        self.r, self.block = r, block

    def per_call(self, case: Case, n: int) -> float:
        out = []
        for _ in range(max(1, n // self.block)):
            inputs = [case.prepare() for _ in range(self.block)]
            self.r.config_resetstat()
            for x in inputs:
                case.call(x)
            stats: Any = self.r.info("commandstats")
            out.append(_usec(stats) / self.block)
            if case.after is not None:
                case.after(inputs)
        return statistics.median(out)


def _usec(stats: dict[str, Any]) -> float:
    """µs spent on script commands since the reset (their time includes what they ran), else
    on every command but the meter's own CONFIG and INFO."""
    usec = {
        k.removeprefix("cmdstat_"): float(v["usec"])
        for k, v in stats.items()
        if not k.removeprefix("cmdstat_").startswith(("config", "info"))
    }
    scripts = [v for k, v in usec.items() if k in SCRIPT_COMMANDS]
    return sum(scripts) if scripts else sum(usec.values())


def callgrind_available() -> bool:
    return shutil.which("valgrind") is not None and shutil.which("callgrind_control") is not None


class CallgrindServer(RedisServer):
    """A redis-server under valgrind's callgrind, counting only inside processInputBuffer.
    Slow (about 50x): for instruction counts, never for timing."""

    def start(self, timeout: float = 60.0) -> RedisServer:
        self.out = self.dir / "callgrind.out"
        real = self.binary
        wrapper = self.dir / "redis-under-callgrind"
        wrapper.write_text(
            "#!/bin/sh\nexec valgrind --tool=callgrind --collect-atstart=no "
            "--toggle-collect=processInputBuffer "
            f"--callgrind-out-file={shlex.quote(str(self.out))}.%p {shlex.quote(str(real))} "
            '"$@"\n'
        )
        wrapper.chmod(0o755)
        self.binary = wrapper
        try:
            return super().start(timeout)
        finally:
            self.binary = real


class Instructions:
    """Instructions per call inside redis-server's processInputBuffer (callgrind)."""

    unit = "instructions"

    def __init__(self, server: CallgrindServer) -> None:
        self.server = server
        self.last_dump: Path | None = None

    def _control(self, flag: str) -> None:
        assert self.server.proc is not None
        subprocess.run(
            ["callgrind_control", flag, str(self.server.proc.pid)],
            capture_output=True,
            check=True,
            timeout=60,
        )

    def per_call(self, case: Case, n: int) -> float:
        inputs = [case.prepare() for _ in range(n)]
        for old in glob.glob(f"{self.server.out}.*"):
            os.remove(old)
        self._control("-z")
        for x in inputs:
            case.call(x)
        self._control("-d")
        dumps = sorted(glob.glob(f"{self.server.out}.*"), key=os.path.getmtime)
        text = Path(dumps[-1]).read_text()
        found = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
        if found is None:
            raise RuntimeError(f"no totals in {dumps[-1]}")
        self.last_dump = Path(dumps[-1])
        if case.after is not None:
            case.after(inputs)
        return int(found.group(1)) / n


# -- the scripts, cut --------------------------------------------------------------------------

RETURN = "do return '' end\n"


@dataclass(frozen=True)
class Cut:
    """Return right before the first line that starts with ``before``, indentation aside
    (after ``after``, if given: the first such line after the first line starting with
    ``after``)."""

    name: str
    before: str
    after: str = ""


def cut(source: str, at: Cut) -> str:
    """``source`` with an early return inserted at ``at``; a ValueError if the anchor is gone
    (the script changed: update the cut)."""
    lines = source.splitlines(keepends=True)
    start = 0
    if at.after:
        start = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith(at.after)), -1) + 1
        if start == 0:
            raise ValueError(f"cut {at.name!r}: no line starts with {at.after!r}")
    for i in range(start, len(lines)):
        if lines[i].lstrip().startswith(at.before):
            indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
            return "".join([*lines[:i], indent + RETURN, *lines[i:]])
    raise ValueError(f"cut {at.name!r}: no line starts with {at.before!r}")


PREFLIGHT_CUTS = (
    Cut("begin(KEYS, ARGV), nothing else", "local A = split(ARGV[6]"),
    Cut("+ argument parsing, now_ms()", "local cs, as"),
    Cut("+ idempotency check, read_state()", "local function fits"),
    Cut("+ overflow check, reap(now)", "-- A repeat of an approved request"),
    Cut("+ replay checks (two HEXISTS)", "if tf ~= '' and not task.exists"),
    Cut("+ the rules", "-- Every rule passed"),
    Cut("+ counters (scope_roll, HINCRBYs, names, agent_seen)", "if tf ~= '' then", "local seq"),
    Cut("+ reservation record, indexes", "ledger('approved'"),
    Cut("+ ledger entry, thresholds", "touch(", "ledger('approved'"),
    Cut("+ touch() (PEXPIREs)", "return reply(", "ledger('approved'"),
)

SETTLE_CUTS = (
    Cut("begin(KEYS, ARGV), nothing else", "local A = split(ARGV[6]"),
    Cut("+ argument parsing, now_ms()", "local crossed = {}"),
    Cut("+ idempotency checks, find the reservation", "-- A record after a release"),
    Cut("+ overflow check (charge_fits)", "-- -- from here on, nothing fails"),
    Cut("+ close_reservation()", "if rollback then", "if action == 'close' then"),
    Cut(
        "+ after_charge() (scope_read, thresholds)",
        "return remember(status, rid, charged",
        "if action == 'close' then",
    ),
    Cut("+ finish: reap(now)", "local cs = charged_cs", "local function finish"),
    Cut("+ finish: the customer if not read, touch()", "return reply(cs", "local function finish"),
)


def preflight_cuts() -> list[tuple[str, _scripts.Library]]:
    """(name, the library with preflight.lua cut) at each of PREFLIGHT_CUTS, then whole."""
    return _cuts("preflight", PREFLIGHT_CUTS)


def settle_cuts() -> list[tuple[str, _scripts.Library]]:
    return _cuts("settle", SETTLE_CUTS)


def _cuts(operation: str, cuts: Sequence[Cut]) -> list[tuple[str, _scripts.Library]]:
    body = _scripts.source(operation)

    def cut_at(at: Cut) -> _scripts.Library:
        return _scripts.build(
            lambda name: cut(body, at) if name == operation else _scripts.source(name)
        )

    return [(c.name, cut_at(c)) for c in cuts] + [("whole function", _scripts.installed())]


def load_function(r: redis.Redis, name: str, body: str) -> str:
    """A library of one function ``name`` running ``body`` (no prelude), loaded; its name."""
    r.function_load(
        f"#!lua name={name}\nredis.register_function('{name}', function(KEYS, ARGV)\n"
        f"{body}\nend)\n",
        replace=True,
    )
    return name


# -- the calls ---------------------------------------------------------------------------------


@dataclass
class Bench:
    """One server, an agentbill client on it, and the cases measured there."""

    server: RedisServer
    r: redis.Redis = field(init=False)
    client: AgentBillClient = field(init=False)
    library: _scripts.Library = field(init=False)

    def __post_init__(self) -> None:
        self.library = _scripts.installed()
        self.r = self.server.client()
        self.client = AgentBillClient(redis_url=self.server.url, namespace=NAMESPACE)
        self.client.set_budget(CUSTOMER, BIG_LIMIT)
        self.client.preflight(AGENT, 1, CUSTOMER).record(1)  # names, agent: a warm customer

    def close(self) -> None:
        self.client.close()
        self.r.close()

    def plan(self) -> _core.Call:
        return _core.plan_preflight(
            self.client._script_settings, AGENT, 1, CUSTOMER, None, None, None, None, BaseCheck
        ).call

    def fcall(self, function: str, call: _core.Call) -> Any:
        return self.r.fcall(function, len(call.keys), *call.keys, *call.args)

    def release(self, calls: list[_core.Call]) -> None:
        for c in calls:
            self.client.release(_rid(c))

    def record_call(self, pre: _core.Call) -> _core.Call:
        return _core.plan_record(
            self.client._script_settings, AGENT, 1, None, _rid(pre), None, True, None, None
        ).call

    def made(self) -> tuple[_core.Call, _core.Call]:
        """A reservation preflight.lua made (untimed): its call, and the record closing it."""
        pre = self.plan()
        self.fcall(self.library.function("preflight"), pre)
        return pre, self.record_call(pre)

    def preflight_case(self, name: str, function: str, note: str = "") -> Case:
        """Function ``function`` run with an approved preflight's KEYS/ARGV; released after."""

        def call(c: _core.Call) -> object:
            return self.fcall(function, c)

        return Case(name, call, self.plan, self.release, note)

    def settle_case(self, name: str, function: str) -> Case:
        """Function ``function`` run with the KEYS/ARGV of record(1) of an open reservation."""

        def call(pair: tuple[_core.Call, _core.Call]) -> object:
            return self.fcall(function, pair[1])

        def after(pairs: list[tuple[_core.Call, _core.Call]]) -> None:
            self.release([pre for pre, _ in pairs])  # those a cut script left open

        return Case(name, call, self.made, after)

    def cases(self) -> list[Case]:
        """PING, a no-op function, the peers, the commands of a preflight replayed, and
        preflight and settle as the client sends them (FCALL of the library)."""
        r = self.r
        script, count = replayed_commands(self)
        return [
            Case("PING", lambda _: r.ping()),
            self.preflight_case(
                "FCALL of `return 1`, preflight's KEYS/ARGV",
                load_function(r, "cost_noop", "return 1"),
            ),
            *peer_cases(self.server.url),
            self.preflight_case(
                "preflight's commands replayed, no logic",
                load_function(r, "cost_replayed", script),
                f"{count} commands",
            ),
            self.preflight_case(PREFLIGHT_CASE, self.library.function("preflight")),
            self.settle_case(SETTLE_CASE, self.library.function("settle")),
        ]

    def cut_cases(self, operation: str) -> list[Case]:
        """The operation cut at each point, run with a real call's KEYS/ARGV."""
        out = []
        for name, library in preflight_cuts() if operation == "preflight" else settle_cuts():
            self.r.function_load(library.text, replace=True)
            function = library.function(operation)
            if operation == "preflight":
                out.append(self.preflight_case(name, function))
            else:
                out.append(self.settle_case(name, function))
        return out


def _rid(call: _core.Call) -> str:
    return str(call.args[-1]).split("\x1f")[0]  # the packed fields start with it


def peer_cases(url: str) -> list[Case]:
    """limits' moving window hit() (one EVALSHA of acquire_moving_window.lua), accepted."""
    from limits import parse
    from limits.storage import RedisStorage
    from limits.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter

    storage = RedisStorage(url)
    item = parse("1000000/hour")
    moving = MovingWindowRateLimiter(storage)
    fixed = FixedWindowRateLimiter(storage)
    moving.hit(item, "cost-moving")
    fixed.hit(item, "cost-fixed")
    return [
        Case(LIMITS_CASE, lambda _: moving.hit(item, "cost-moving")),
        Case("limits fixed-window hit()", lambda _: fixed.hit(item, "cost-fixed")),
    ]


# -- the commands of a preflight, replayed ----------------------------------------------------


def monitored(bench: Bench) -> list[list[str]]:
    """The commands one approved preflight issues from its script, as MONITOR shows them."""
    seen: list[list[str]] = []
    with bench.server.client(decode_responses=True) as m, m.monitor() as mon:
        stop = threading.Event()

        def read() -> None:
            while not stop.is_set():
                line = mon.next_command()
                if line.get("client_type") == "lua":
                    seen.append(shlex.split(line["command"]))
                elif line["command"].startswith("PING"):
                    stop.set()

        t = threading.Thread(target=read, daemon=True)
        t.start()
        time.sleep(0.1)
        call = bench.plan()
        bench.fcall(bench.library.function("preflight"), call)
        bench.r.ping()
        t.join(timeout=10)
        bench.release([call])
    return seen


def _lua_str(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\x1f", "\\031") + "'"


def replayed_commands(bench: Bench) -> tuple[str, int]:
    """A function body that issues the commands of one approved preflight, in order, with the
    same arguments (keys from KEYS, as any function must): the cost of the commands alone; and
    how many there are."""
    cmds = monitored(bench)
    slots = {k: f"KEYS[{i + 1}]" for i, k in enumerate(bench.plan().keys)}
    lines = []
    for name, *args in cmds:
        # The customer's keys are the same for every call; anything else is a constant.
        values = [slots.get(a) or _lua_str(a) for a in args]
        lines.append(f"redis.call({', '.join([_lua_str(name.upper()), *values])})")
    return "\n".join([*lines, "return 1"]), len(cmds)


def instructions(n: int = 200) -> dict[str, float]:
    """Instructions per call of a preflight, a record of it, a pair and limits' moving-window
    hit, on a redis-server under callgrind ({} when valgrind is missing)."""
    if not callgrind_available():
        return {}
    server = CallgrindServer()
    with bench_on(server) as b:
        meter = Instructions(server)
        cases = {c.name: c for c in b.cases()}
        out = {
            name: meter.per_call(cases[name], n)
            for name in (PREFLIGHT_CASE, SETTLE_CASE, LIMITS_CASE)
        }
    out[PAIR_CASE] = out[PREFLIGHT_CASE] + out[SETTLE_CASE]
    return out


PREFLIGHT_CASE = "preflight (approved)"
SETTLE_CASE = "settle: record(1) of an open reservation"
LIMITS_CASE = "limits moving-window hit()"
PAIR_CASE = "preflight + record (pair)"


# -- the report --------------------------------------------------------------------------------


@contextlib.contextmanager
def bench_on(server: RedisServer) -> Iterator[Bench]:
    server.start()
    try:
        b = Bench(server)
        try:
            yield b
        finally:
            b.close()
    finally:
        server.stop()


def table(meter: Meter, cases: Sequence[Case], n: int, steps: bool = False) -> list[str]:
    """Markdown rows: the cost per call of each case, and (``steps``) the step from the row
    before."""
    rows = []
    last = 0.0
    for case in cases:
        cost = meter.per_call(case, n)
        step = f" | {cost - last:+,.0f}" if steps else ""
        note = f" ({case.note})" if case.note else ""
        rows.append(f"| {case.name}{note} | {cost:,.0f}{step} |")
        last = cost
        print(rows[-1], flush=True)
    return rows
