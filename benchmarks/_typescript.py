"""The TypeScript client's row of ``make bench``: its preflight p50 as a ratio to an ioredis
PING in the same run.

``clients/typescript/bench/latency.mjs`` measures, in one Node process against the benchmark's
server, an ioredis PING, the TypeScript client's preflight and its preflight + record pair,
interleaved as ``_timing.interleave`` does for the Python rows; this module runs it (building the
package first when its sources are newer) and writes its section of RESULTS.md.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TS = ROOT / "clients" / "typescript"
SCRIPT = TS / "bench" / "latency.mjs"
PING = "PING (ioredis)"
PREFLIGHT = "preflight (TypeScript)"


@dataclass(frozen=True)
class Row:
    """One operation, times in seconds."""

    p50: float
    p99: float
    cpu_per_call: float
    calls: int


@dataclass(frozen=True)
class TypeScriptLatency:
    node: str
    ioredis: str
    rows: dict[str, Row]

    @property
    def ping(self) -> Row:
        return self.rows[PING]

    def x(self, seconds: float) -> float:
        """``seconds`` as a multiple of this run's ioredis PING p50."""
        return seconds / self.ping.p50


def _built() -> None:
    """dist/ from this checkout's sources and lua/ (rebuilt when older than either)."""
    sources = [*TS.glob("src/*.ts"), *(ROOT / "lua").iterdir()]
    built = TS / "dist" / "index.js"
    if not built.exists() or max(p.stat().st_mtime for p in sources) > built.stat().st_mtime:
        subprocess.run(["npm", "run", "build"], cwd=TS, check=True, capture_output=True)


def measure_typescript(url: str, n: int) -> TypeScriptLatency | str:
    """``n`` timed calls of each operation, or why it could not run (the row says so)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "not measured: node and npm are not installed"
    if not (TS / "node_modules").is_dir():
        return "not measured: run `make ts-setup` (npm ci in clients/typescript)"
    _built()
    out = subprocess.run(
        ["node", str(SCRIPT), url, str(n)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if out.returncode != 0:
        return f"not measured: the Node benchmark failed: {out.stderr.strip()[-500:]}"
    data = json.loads(out.stdout)
    rows = {name: Row(**row) for name, row in data["rows"].items()}
    return TypeScriptLatency(node=data["node"], ioredis=data["ioredis"], rows=rows)


def typescript_section(ts: TypeScriptLatency | str | None) -> list[str]:
    """RESULTS.md's TypeScript section (nothing when the run did not try)."""
    if ts is None:
        return []
    out = ["", "## TypeScript client: preflight against an ioredis PING", ""]
    if isinstance(ts, str):
        return [*out, ts]
    rows = [
        [
            name,
            f"{ts.x(r.p50):.2f}x",
            f"{ts.x(r.p99):.2f}x",
            f"{ts.x(r.cpu_per_call):.2f}x",
            f"{r.p50 * 1e6:,.0f}",
        ]
        for name, r in ts.rows.items()
    ]
    head = ["operation", "p50", "p99", "client CPU", "p50 µs"]
    out += ["| " + " | ".join(head) + " |", "| --- | ---: | ---: | ---: | ---: |"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    out += [
        "",
        f"**TypeScript preflight p50: {ts.x(ts.rows[PREFLIGHT].p50):.2f}x an ioredis PING p50** "
        f"({ts.ping.p50 * 1e6:,.0f} µs), measured in the same run against the same server. "
        f"Ratios here are to the ioredis PING, not redis-py's. Node {ts.node}, ioredis "
        f"{ts.ioredis}, one Node process (`clients/typescript/bench/latency.mjs`): blocks of 100 "
        "calls of each operation in turn, the order rotating, after 200 warm-up calls each; "
        "each measured preflight is released, untimed. *client CPU*: the Node process's "
        "user+system CPU per call.",
    ]
    return out
