"""The Redis Functions lever (issue 13, benchmarks/LEVERS.md): FCALL of agentbill's library
against EVALSHA of the same operations as the clients sent them before the library.

The library (lua/library.lua, agentbill/_scripts.py) runs the prelude once, at FUNCTION LOAD;
each function starts with ``begin(KEYS, ARGV)``. Before it, every call was an EVALSHA of the
whole text, ``prelude + begin(KEYS, ARGV) + operation``, so every call built the prelude's
functions and tables again. :func:`cases` measures both with the same KEYS/ARGV on one server.

``python -m benchmarks._functions [--n 300] [--rounds 3]`` prints instructions per call
(callgrind, when valgrind is installed) and µs per call. First run on redis-server 7.0.15,
December 2026 (helper "functions", the prelude hoisted): FCALL saved 7.4% of a preflight's
instructions and 6.1% of a settle's; the same operations wrapped whole in a function (the
prelude still built per call) saved nothing (within ±0.6%): FCALL's dispatch alone buys nothing.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from agentbill import _scripts
from benchmarks import _server_cost
from tests._servers import RedisServer


def script_text(operation: str) -> str:
    """The script EVALSHA ran for ``operation`` before the library: the whole text per call."""
    prelude = _scripts.source(_scripts.PRELUDE)
    return f"{prelude}\nbegin(KEYS, ARGV)\n{_scripts.source(operation)}"


def cases(bench: _server_cost.Bench) -> list[_server_cost.Case]:
    """Preflight and settle through EVALSHA of the whole script and through FCALL of the
    library, with the same KEYS/ARGV, on ``bench``'s server."""
    r, library = bench.r, bench.library
    shas = {op: r.script_load(script_text(op)) for op in ("preflight", "settle")}

    def evalsha_preflight(name: str) -> _server_cost.Case:
        case = bench.preflight_case(name, library.function("preflight"))
        case.call = lambda c: r.evalsha(shas["preflight"], len(c.keys), *c.keys, *c.args)
        return case

    def evalsha_settle(name: str) -> _server_cost.Case:
        case = bench.settle_case(name, library.function("settle"))
        case.call = lambda pair: r.evalsha(
            shas["settle"], len(pair[1].keys), *pair[1].keys, *pair[1].args
        )
        return case

    return [
        evalsha_preflight("preflight, EVALSHA of the whole script"),
        bench.preflight_case("preflight, FCALL of the library", library.function("preflight")),
        evalsha_settle("settle, EVALSHA of the whole script"),
        bench.settle_case("settle, FCALL of the library", library.function("settle")),
    ]


def main() -> None:
    """Instructions per call (callgrind) and µs per call (INFO commandstats), EVALSHA of the
    whole script against FCALL of the library, one server each, rounds interleaved."""
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
            rounds = " | ".join(f"round {i + 1}" for i in range(ns.rounds))
            print(f"\n| {unit} per call (rounds interleaved) | {rounds} |", flush=True)
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
