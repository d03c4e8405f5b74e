"""agentbill's scripts as one Redis Functions library (FUNCTION LOAD + FCALL), to measure
against EVALSHA of prelude + operation (issue 13, "Levers to measure, not assume").

Two ways to build the library from the same ``lua/*.lua`` files, neither edited:

- ``wrapped``: each operation registered as ``function(KEYS, ARGV) <prelude> <operation> end``:
  exactly today's script text, only called through FCALL. Every call still builds the
  prelude's closures and tables, as EVALSHA does.
- ``hoisted``: the prelude runs once, at FUNCTION LOAD, at the library's top level; its few
  top-level statements that read KEYS or ARGV (the key table, the settings) become assignments
  made by ``begin(KEYS, ARGV)`` at the start of every call. Each operation's function is its
  file's text after ``begin``. The prelude's functions are then built once, not per call.
  Correct only while the prelude keeps no other per-call state at its top level (its constant
  tables are only read): a top-level local that any script changes is per-call state too,
  made again by ``begin`` (lean's per-call memo ``known_periods``, say), and
  :func:`split_prelude` refuses a top level it cannot split. A write through an alias
  (``local t = SCOPE_FIELDS; t[1] = x``) is not seen: before this becomes the product, run the
  suite through FCALL
  (``pytest -p benchmarks._fcall_plugin``).

Operations that issue no write (``READ_ONLY``) are registered ``no-writes``: a function without
it is refused up front by a Redis over maxmemory, where EVAL runs until its first write.

The library's name and its functions' names carry a digest of the library text, so two
agentbill versions could share one Redis.

``python -m benchmarks._functions`` prints instructions per call (callgrind) and µs per call of
preflight and settle through EVALSHA and through FCALL of both libraries, on one server. Run
on redis-server 7.0.15, December 2026: hoisted saved 7.4% of a preflight's instructions and
6.1% of a settle's; wrapped saved nothing (within ±0.6%).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable

from agentbill import _core, _scripts
from benchmarks import _server_cost
from tests._servers import RedisServer

TOP_LOCAL = re.compile(r"^local\s+([A-Za-z_][\w, ]*?)\s*=\s*(.*)$", re.S)


def _read(name: str) -> str:
    return (_scripts.lua_dir() / f"{name}.lua").read_text(encoding="utf-8")


def _statements(prelude: str) -> list[str]:
    """The prelude cut into top-level pieces: a piece starts at a line in column 0 that is not
    a comment, ``end``, ``}`` or ``)`` and runs to the next such line."""
    pieces: list[str] = []
    for line in prelude.splitlines(keepends=True):
        starts = line[:1] not in ("", " ", "\t", "\n", "-", "}", ")") and not line.startswith("end")
        if starts or not pieces:
            pieces.append(line)
        else:
            pieces[-1] += line
    return pieces


def _code(text: str) -> str:
    return re.sub(r"--[^\n]*", "", text)


def changed(name: str, code: str) -> bool:
    """Whether ``code`` (comments removed) assigns ``name``, a field or index of it, or hands
    it to table.insert/remove/sort. A write through an alias (``local t = name; t[1] = x``)
    is not seen."""
    assigned = re.search(rf"(?<![\w.])(?<!local ){name}\s*(\[[^\]]*\]|\.\w+)?\s*=(?!=)", code)
    return bool(assigned or re.search(rf"table\.(insert|remove|sort)\(\s*{name}\b", code))


def split_prelude(prelude: str, bodies: list[str]) -> tuple[str, list[str]]:
    """(the prelude to run once at FUNCTION LOAD, the assignments ``begin`` makes at each call).

    A top-level ``local x = ...`` is per-call state when it reads KEYS or ARGV or when any
    script (the prelude's functions, an operation) changes ``x``: it becomes ``local x`` at
    load and ``x = ...`` in ``begin``. Every other top-level local (functions, constant tables)
    is made once. A ValueError for a top level this cannot split."""
    pieces = _statements(prelude)
    code = "\n".join(_code(t) for t in [prelude, *bodies])
    out, per_call = [], []
    for piece in pieces:
        text = _code(piece)
        if text.strip() and not text.startswith("local"):
            # A top-level call (redis.setresp, say) would run once at FUNCTION LOAD, not per call.
            raise ValueError(f"cannot hoist a top-level statement that is not a local:\n{piece}")
        m = TOP_LOCAL.match(text.strip())
        if m is None or piece.startswith("local function"):
            out.append(piece)
            continue
        names = [n.strip() for n in m.group(1).split(",")]
        if re.search(r"\b(KEYS|ARGV)\b", text) or any(changed(n, code) for n in names):
            out.append(f"local {m.group(1)}\n")
            per_call.append(f"  {m.group(1)} = {m.group(2).strip()}\n")
        else:
            out.append(piece)
    return "".join(out), per_call


# Operations whose script issues no write command. Redis runs a function registered without
# 'no-writes' as a writer: it refuses it up front once used memory passes maxmemory, where
# EVAL of a script without flags runs until its first write. A read of events or estimates must
# still answer from a full Redis (tests/test_accounting.py, the full-Redis batch test).
READ_ONLY = ("events", "estimates")


def _flags(op: str) -> str:
    return "{'no-writes'}" if op in READ_ONLY else "{}"


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def library(kind: str = "hoisted") -> tuple[str, dict[str, str]]:
    """(the library text for FUNCTION LOAD, operation -> function name)."""
    prelude = _read(_scripts.PRELUDE)
    bodies = {op: _read(op) for op in _scripts.OPERATIONS}
    digest = _digest(kind + prelude + "".join(bodies.values()))
    names = {op: f"agentbill_{digest}_{op}" for op in _scripts.OPERATIONS}
    parts = [f"#!lua name=agentbill_{digest}\n"]
    if kind == "wrapped":
        for op, body in bodies.items():
            parts.append(
                f"redis.register_function{{function_name = '{names[op]}', "
                f"flags = {_flags(op)}, callback = function(KEYS, ARGV)\n"
                f"{prelude}\n{body}\nend}}\n"
            )
    elif kind == "hoisted":
        top, per_call = split_prelude(prelude, list(bodies.values()))
        parts.append(top)
        parts.append("local function begin(KEYS, ARGV)\n" + "".join(per_call) + "end\n")
        for op, body in bodies.items():
            parts.append(
                f"redis.register_function{{function_name = '{names[op]}', "
                f"flags = {_flags(op)}, callback = function(KEYS, ARGV)\n"
                f"begin(KEYS, ARGV)\n{body}\nend}}\n"
            )
    else:
        raise ValueError(kind)
    return "".join(parts), names


# -- the measurement ---------------------------------------------------------------------------


def cases(bench: _server_cost.Bench) -> list[_server_cost.Case]:
    """Preflight and settle through EVALSHA (as the client sends them today) and through
    FCALL of each library, with the same KEYS/ARGV, on ``bench``'s server."""
    r = bench.r
    out = [
        bench.preflight_case("preflight, EVALSHA", bench.client._scripts["preflight"].sha),
        bench.settle_case("settle, EVALSHA", bench.client._scripts["settle"].sha),
    ]
    for kind in ("wrapped", "hoisted"):
        text, names = library(kind)
        r.function_load(text, replace=True)
        out += [_fcall_case(bench, f"preflight, FCALL {kind}", names["preflight"], False)]
        out += [_fcall_case(bench, f"settle, FCALL {kind}", names["settle"], True)]
    return out


def _fcall_case(
    bench: _server_cost.Bench, name: str, function: str, settle: bool
) -> _server_cost.Case:
    def fcall(c: _core.Call) -> object:
        return bench.r.fcall(function, len(c.keys), *c.keys, *c.args)

    if not settle:
        return _server_cost.Case(name, fcall, bench.plan, bench.release)

    def after(pairs: list[tuple[_core.Call, _core.Call]]) -> None:
        bench.release([pre for pre, _ in pairs])

    return _server_cost.Case(name, lambda pair: fcall(pair[1]), bench.made, after)


def main() -> None:
    """``python -m benchmarks._functions [--n 300] [--rounds 3]``: instructions per call
    (callgrind) and µs per call (INFO commandstats), EVALSHA against FCALL, one server each."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    ns = parser.parse_args()
    meters: list[tuple[str, Callable[[], RedisServer]]] = []
    if _server_cost.callgrind_available():
        meters.append(("instructions", _server_cost.CallgrindServer))
    meters.append(("µs", RedisServer))
    for unit, make in meters:
        server = make()
        with _server_cost.bench_on(server) as b:
            meter: _server_cost.Meter
            if isinstance(server, _server_cost.CallgrindServer):
                meter = _server_cost.Instructions(server)
            else:
                meter = _server_cost.Micros(b.r)
            print(
                f"\n| {unit} per call (rounds interleaved) | "
                + " | ".join(f"round {i + 1}" for i in range(ns.rounds))
                + " |",
                flush=True,
            )
            all_cases = cases(b)
            results: dict[str, list[float]] = {c.name: [] for c in all_cases}
            for r in range(ns.rounds):
                # Each round starts at another case: the state a block leaves behind (the
                # ledger grows) then weighs on every case alike.
                shift = (2 * r) % len(all_cases)
                for c in all_cases[shift:] + all_cases[:shift]:
                    results[c.name].append(meter.per_call(c, ns.n))
            for name, vals in results.items():
                print(f"| {name} | " + " | ".join(f"{v:,.0f}" for v in vals) + " |", flush=True)


if __name__ == "__main__":
    main()
