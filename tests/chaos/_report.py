"""RELIABILITY.md, written by the chaos suite from what its last full run measured.

Each scenario records its figures when (and only when) every one of its assertions passed; at
the end of the session, if every scenario below recorded, the file is rewritten: the fixed text
here with the figures filled in. A partial run (``-k``, a failure) leaves the file alone, so it
always describes one complete run.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from tests.chaos._sizes import PREFIX, Sizes

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PATH = ROOT / "RELIABILITY.md"
ENV_PATH = f"{PREFIX}REPORT"
"""Where to write the file instead (an empty value: do not write it)."""

Figure = int | float | str


@dataclass(frozen=True, slots=True)
class Scenario:
    short: str
    """Its name in the summary table."""
    title: str
    does: str
    asserts: tuple[str, ...]
    figures: tuple[tuple[str, str], ...]
    """(key, label) of every figure, in table order."""


SUMMARY = (
    ("processes", "worker processes"),
    ("operations", "operations"),
    ("kills", "SIGKILLs (workers or redis-server)"),
    ("restarts", "Redis restarts"),
    ("overspend", "overspend found (units)"),
    ("lost", "acknowledged records lost"),
)

FAILOVER = (
    ("resumed", "seconds from the kill to a run finished after the promotion"),
    ("in_doubt", "calls in doubt (StoreUnavailableError), sent again"),
    ("approvals", "approvals"),
    ("records", "acknowledged records and releases"),
    ("lost_units", "units of acknowledged records lost"),
    ("direct", "records charged directly (their reservation was lost)"),
    ("spent", "spent at the end"),
    ("samples", "monitor samples"),
)
"""The figures of a failover scenario (Sentinel or Cluster)."""
EXTRA_RESERVATIONS = (
    "extra_reservations",
    "reservations no approval returned: in doubt, held until their TTL (negative: lost)",
)

SCENARIOS: dict[str, Scenario] = {
    "load": Scenario(
        "Load",
        "Load: processes racing on a few hot budgets",
        "{load[processes]} worker processes (forkserver, one client and one connection "
        "each) start together and each makes {sizes[load_ops]} runs: preflight an estimate of 1 "
        "to 8 units on one of three hot customers, then record 0 to the estimate by reservation "
        "id, record without an id (closing the agent's oldest open reservation), or release. A "
        "monitor thread samples every budget without pause and tops a limit up by a few units "
        "whenever almost nothing is left, so the racers stay at the edge of the budget for the "
        "whole run instead of only until it runs out. A fourth customer takes records up to 3 "
        "units above the estimate, to measure the one way spent can pass a limit.",
        (
            "every approval left spent + reserved <= limit, read from the preflight script's own "
            "reply (Check.remaining is clamped at 0, so it could not show an overspend), and "
            "Check.remaining agrees with those counters",
            "every settlement and every monitor sample of the three hot customers showed "
            "spent + reserved <= limit",
            "at the end reserved == 0 and no reservation is open, and spent == the sum of "
            "Settlement.charged the workers received, per customer; no settlement was a replay",
            "Redis made exactly one reservation per approval (the budget's own sequence counter)",
            "the customer with overshooting records ended with spent <= limit + the units "
            "recorded above estimates, and its approvals still never passed the limit",
            "the budgets were contended: each hot customer saw approvals and refusals",
        ),
        (
            ("preflights", "preflights"),
            ("approvals", "approvals"),
            ("refusals", "refusals"),
            ("settlements", "records and releases"),
            ("edge", "approvals that left exactly 0 units"),
            ("samples", "monitor samples"),
            ("topups", "limit top-ups"),
            ("spent", "spent at the end (hot customers)"),
            ("charged", "sum charged as the workers saw it"),
            ("reserved", "reserved at the end"),
            ("overshoot_units", "units recorded above estimates (overshoot customer)"),
            ("overshoot_over", "overshoot customer: spent above its limit at the end"),
            ("overshoot_limit", "overshoot customer: its limit"),
        ),
    ),
    "death": Scenario(
        "Worker death",
        "Worker death: SIGKILL between preflight and record",
        "{sizes[workers]} worker processes at a time ({death[processes]} in all) each loop: "
        'preflight (TTL {death[ttl]} s), a random pause of up to 20 ms of "work", then record '
        "or release. {death[kills_random]} times, at random "
        "moments, a random worker is SIGKILLed and a fresh one takes its place; at the end every "
        "worker left ({death[kills_final]}) is killed at once. Every worker journals each call "
        "before sending it and after it returns, so the test knows where each one died.",
        (
            "once the TTL has passed on Redis's clock, one get_budget per customer (at most "
            "ceil(kills / reap_limit) calls) shows reserved == 0 and no open reservation: "
            "every unit held by a dead worker is back",
            "every reservation a dead worker held and never settled closed as `expired`, charged "
            "nothing; every settlement in flight at a kill landed once (`recorded` or "
            "`released`) or not at all (`expired`)",
            "every acknowledged settlement is remembered with the status and charge its worker "
            "was told, and none was a replay",
            "spent == the sum of what every reservation was charged: nothing charged twice, "
            "nothing charged for a run that was never recorded",
            "Redis made at least one reservation per approval and at most one more per preflight "
            "a kill cut short",
            "every approval, settlement and monitor sample showed spent + reserved <= limit",
        ),
        (
            ("kills_random", "random kills (each worker replaced)"),
            ("kills_final", "workers killed at once at the end"),
            ("died_holding", "kills that left an approved, unsettled reservation"),
            ("died_settling", "kills during a record or release (in doubt)"),
            ("in_doubt_landed", "of those, settlements that had landed"),
            ("died_preflight", "kills during a preflight"),
            ("orphaned_units", "units held by dead workers' known reservations"),
            ("approvals", "approvals"),
            ("settlements", "acknowledged records and releases"),
            (
                "units_back",
                "seconds from the last kill to the first look (TTL + 0.25 s later, Redis clock) "
                "that found every unit back",
            ),
            ("reap_calls", "get_budget calls that took to show it"),
            ("spent", "spent at the end"),
            ("samples", "monitor samples"),
        ),
    ),
    "restart-always": Scenario(
        "Redis restart, fsync always",
        "Redis restart under load, appendonly yes + appendfsync always",
        "redis-server runs with `appendonly yes` and `appendfsync always`. "
        "{restart-always[processes]} workers make runs (every preflight with an idempotency key, "
        "TTL 5 s) while redis-server is killed with SIGKILL {restart-always[restarts]} times "
        "mid-load and restarted on the same port and data directory. A call that raises "
        "StoreUnavailableError is in doubt; the worker sends it again as the same request (the "
        "same idempotency key, the same reservation id) until it is answered.",
        (
            "no record that returned success is lost: after the last restart every acknowledged "
            "settlement is still there with the status and charge its worker was told",
            "spent == the sum of every acknowledged charge, per customer, exactly: each in-doubt "
            "call landed once, whether its first attempt had run or not",
            "one reservation per approval (Redis's own count of reservations made): an "
            "in-doubt preflight sent again with its key reserved once; none is left open",
            "every approval, settlement and monitor sample showed spent + reserved <= limit",
        ),
        (
            ("approvals", "approvals"),
            ("records", "acknowledged records and releases"),
            ("acked_before_kills", "of those, acknowledged before a kill"),
            ("downtime", "longest outage (kill to first PING after the restart), s"),
            ("in_doubt_preflights", "preflights in doubt (StoreUnavailableError)"),
            ("in_doubt_preflights_landed", "of those, that had reserved before failing"),
            ("in_doubt_settles", "settlements in doubt"),
            ("in_doubt_settles_landed", "of those, that had landed before failing"),
            ("down_max", "longest call before StoreUnavailableError, s"),
            ("lost_units", "units of acknowledged records lost"),
            ("spent", "spent at the end"),
            ("samples", "monitor samples"),
        ),
    ),
    "restart-everysec": Scenario(
        "Redis restart, fsync everysec",
        "Redis restart under load, appendonly yes + appendfsync everysec",
        "The same load and kill -9 with `appendfsync everysec`, Redis's default fsync policy "
        "with AOF on (and the embedded local server's), restarted once.",
        (
            "every acknowledged record that did not survive (if any) was acknowledged within the "
            "documented window: at most 2 s before the kill",
            "spent == the sum of acknowledged charges minus exactly the records found lost: "
            "nothing charged twice",
            "every approval, settlement and monitor sample showed spent + reserved <= limit",
        ),
        (
            ("approvals", "approvals"),
            ("records", "acknowledged records and releases"),
            ("acked_before_kills", "of those, acknowledged before the kill"),
            ("at_risk", "records acknowledged in the last second before the kill"),
            ("delayed_fsync", "writes Redis postponed for a slow fsync (aof_delayed_fsync)"),
            ("in_doubt_settles", "settlements in doubt"),
            ("in_doubt_settles_landed", "of those, that had landed before failing"),
            ("lost_units", "units of acknowledged records lost"),
            ("samples", "monitor samples"),
        ),
    ),
    "dropped": Scenario(
        "Dropped connections",
        "Dropped connections: CLIENT KILL while calls are in flight",
        "{dropped[processes]} workers make {sizes[churn_ops]} runs each (preflight with an "
        "idempotency key; record by id, record without an id with a key, or release) while a "
        "killer thread sends `CLIENT KILL TYPE normal SKIPME yes` every 10 to 40 ms, dropping "
        "every client connection, often between a script running and its reply reaching the "
        "client. The client's own retries resend with the same request id; a call whose every "
        "attempt failed raises StoreUnavailableError and the worker resends it with the same key "
        "or reservation id. Reservations have the default one-hour TTL, so a doubled reservation "
        "would still be open at the end.",
        (
            "at the end, with no TTL having passed, reserved == 0 and no reservation is open: no "
            "retry left a second reservation behind",
            "Redis made exactly one reservation per approval (the budget's own sequence "
            "counter, which a reservation made twice would advance even once closed); each "
            "idempotency key yielded one reservation id; each reservation was closed once, by "
            "the call meant to close it",
            "spent == the sum of what the workers were charged, per customer: no retry charged "
            "twice",
            "every approval, settlement and monitor sample showed spent + reserved <= limit",
        ),
        (
            ("connections_killed", "connections killed"),
            ("kill_rounds", "CLIENT KILL commands"),
            ("lost_replies", "script runs whose reply never reached the caller"),
            ("unavailable", "calls that raised StoreUnavailableError (resent)"),
            ("unavailable_landed", "of those, that had already landed"),
            ("approvals", "approvals"),
            ("spent", "spent at the end"),
            ("samples", "monitor samples"),
        ),
    ),
    "outage": Scenario(
        "Redis unreachable or silent",
        "Redis unreachable, and Redis that accepts connections but never answers",
        "With the default client settings: {outage[unreachable_calls]} preflights from "
        "{sizes[outage_threads]} threads, each with its own client, against a port where nothing "
        "listens; then {outage[paused_calls]} against a redis-server stopped with SIGSTOP (the "
        "kernel still accepts connections), half on connections opened before the pause. The "
        "server is then resumed and runs whatever was queued in its sockets.",
        (
            "every call raised StoreUnavailableError, none returned an approval",
            "unreachable and never answering: each within 2 s (the bound the README "
            "documents; the calls are timed, the bound is the product's promise)",
            "after the resume, each failed call left at most one reservation, holding exactly "
            "its estimate, charged nothing, and every unit was back once the TTL passed",
        ),
        (
            ("unreachable_max", "unreachable: slowest failure, s"),
            ("unreachable_median", "unreachable: median failure, s"),
            ("paused_max", "never answering: slowest failure, s"),
            ("paused_median", "never answering: median failure, s"),
            ("approvals", "approvals"),
            ("landed", "reservations the paused server made after it resumed"),
            ("units_back", "seconds until their units were back"),
        ),
    ),
    "sentinel-replicated": Scenario(
        "Sentinel failover, replicated",
        "Sentinel failover under load, durability='replicated'",
        "A master, one replica and 3 sentinels (down-after 1 s). {sentinel-replicated[processes]} "
        "workers on one `redis+sentinel://` URL with `durability='replicated'` make "
        "{sizes[failover_ops]} runs (every preflight with an idempotency key, TTL 5 s); then the "
        "replica is paused (SIGSTOP) while the master keeps taking calls for 0.5 s, the master "
        "is SIGKILLed, the replica resumed, and the sentinels promote it; the workers make "
        "{sizes[failover_ops]} runs more. A call that raises StoreUnavailableError is sent again "
        "as the same request until it is answered.",
        (
            "no acknowledged record or release is lost: on the promoted replica every one is "
            "there with the status and charge its worker was told; only a record in doubt for "
            "longer than the TTL (its reservation expired meanwhile) was charged directly, once",
            "spent == the sum of every acknowledged charge, per customer: nothing lost, nothing "
            "charged twice",
            "every approval's reservation is on the new master, and at most one more per "
            "preflight in doubt",
            "every approval and monitor sample showed spent + reserved <= limit",
        ),
        (*FAILOVER[:6], EXTRA_RESERVATIONS, *FAILOVER[6:]),
    ),
    "sentinel-primary": Scenario(
        "Sentinel failover, primary",
        "Sentinel failover under load, default durability (the window, measured)",
        "The same failover with the default `durability='primary'`: what the master "
        "acknowledged while its replica was paused (0.5 s: a replication lag made long on "
        "purpose) never reached the replica that was promoted.",
        (
            "spent on the new master <= what the workers were told they were charged, minus the "
            "records found lost, plus what was charged directly: lost, never charged twice",
            "every approval and monitor sample showed spent + reserved <= limit (of the "
            "counters each master held)",
        ),
        (*FAILOVER[:6], EXTRA_RESERVATIONS, *FAILOVER[6:]),
    ),
    "cluster-replicated": Scenario(
        "Cluster failover, replicated",
        "Redis Cluster failover under load, durability='replicated'",
        "3 primaries with a replica each (cluster-node-timeout 2 s). "
        "{cluster-replicated[processes]} workers on one `redis+cluster://` URL, each with a tenant "
        "key, make {sizes[failover_ops]} runs on three hot customers; then the primary that owns "
        "the first customer's slot is SIGKILLed and its replica promoted; they make "
        "{sizes[failover_ops]} runs more. Calls answered CLUSTERDOWN or refused meanwhile are "
        "sent again as the same request until answered. The workers use "
        "`durability='replicated'` (WAIT on each slot's node); the old primary is restarted "
        "once its replica is promoted and rejoins as the new primary's replica.",
        (
            "no acknowledged record lost; only a record in doubt for longer than the TTL was "
            "charged directly, once",
            "spent == the sum of acknowledged charges, per customer: nothing lost, nothing "
            "charged twice",
            "every approval and monitor sample showed spent + reserved <= limit",
        ),
        FAILOVER,
    ),
    "cluster-primary": Scenario(
        "Cluster failover",
        "Redis Cluster failover under load, default durability",
        "3 primaries with a replica each (cluster-node-timeout 2 s). "
        "{cluster-primary[processes]} workers on one `redis+cluster://` URL, each with a tenant "
        "key, make {sizes[failover_ops]} runs on three hot customers; then the primary that owns "
        "the first customer's slot is SIGKILLed and its replica promoted; they make "
        "{sizes[failover_ops]} runs more. Calls answered CLUSTERDOWN or refused meanwhile are "
        "sent again as the same request until answered. Default durability: what the primary "
        "acknowledged and had not replicated is lost: measured here.",
        (
            "spent <= the sum of acknowledged charges minus the records found lost, plus what "
            "was charged directly: lost perhaps, charged twice never",
            "every approval and monitor sample showed spent + reserved <= limit",
        ),
        FAILOVER,
    ),
    "resharding": Scenario(
        "Resharding",
        "Resharding: a hot customer's slot migrated under load",
        "A 3-primary Redis Cluster; {resharding[processes]} workers on one `redis+cluster://` "
        "URL, each with a tenant key (`keys create` on the cluster), make "
        "{sizes[failover_ops]} runs on three hot customers; then the slot of the first "
        "customer moves to another primary (SETSLOT IMPORTING/MIGRATING, MIGRATE 5 keys at a "
        "time with the workers' calls in between, SETSLOT NODE on every primary) and they make "
        "{sizes[failover_ops]} runs more. redis-py follows ASK and MOVED; TRYAGAIN (a script's "
        "keys split between the two nodes) is retried as 'not now'.",
        (
            "nothing lost, nothing charged twice: spent == the sum of acknowledged charges, per "
            "customer, and every settlement is there as its worker was told",
            "one reservation per approval",
            "every approval and monitor sample showed spent + reserved <= limit",
        ),
        (
            ("moved_keys", "keys migrated"),
            ("in_doubt", "calls in doubt (StoreUnavailableError), sent again"),
            ("resumed", "seconds from the start of the migration to a run finished after its end"),
            ("approvals", "approvals"),
            ("records", "acknowledged records and releases"),
            ("spent", "spent at the end"),
            ("samples", "monitor samples"),
        ),
    ),
}

PROMISES = """\
## The promises, and their exact conditions

### Overspend bound

For a customer with a budget limit `L`:

- **Every approval leaves `spent + reserved <= L`.** The check and the reservation are one Lua
  script, so no interleaving of processes, dropped connections, worker deaths or Redis
  restarts can split them. Checked on the script's own reply for every one of the
  {total[approvals]} approvals of the last run, on every settlement, and on
  {total[samples]} monitor samples: {total[overspend]} units of overspend found.
- **`spent + reserved <= L` at all times** holds as long as: every record charges at most its
  run's estimate; there are no direct records (a `record()` with no open reservation to close
  charges in full); no record arrives after its reservation's TTL (the estimate has gone back
  to the budget, perhaps to another run, and the `late` record is charged in full); the limit
  is not lowered below what is already spent and reserved (`set_budget` allows it: it only
  refuses new runs); the clients keep the default `on_outage="fail_closed"` (`fail_open` and
  `allowance` approve runs offline, unchecked); and Redis keeps what it acknowledged (see
  Durability).
- **Otherwise `spent <= L + Σ max(0, actual - estimate) + Σ direct and late records`**
  (an offline approval's record, delivered once Redis is back, is one of the last two). A
  record above its estimate is charged in full, by design: records report what happened. In
  the last run,
  records {load[overshoot_units]} units above their estimates left that customer
  {load[overshoot_over]} units over its limit of {load[overshoot_limit]}.
- A reservation nobody settles (a crashed worker, a preflight whose reply was lost) is not an
  overspend: it holds its estimate until its TTL, is never charged unless recorded, and can
  only make the budget refuse early, never late.

### Durability

Durability is Redis's; what each setting gives:

- **`appendonly yes` and `appendfsync always`**: every call that returned (an approval, a
  record, a release, a `set_budget`) was written and fsynced to the append-only file before
  Redis replied. It survives a `kill -9` of redis-server (measured: {restart-always[lost]} lost
  of {restart-always[acked_before_kills]} settlements acknowledged before one of
  {restart-always[restarts]} kills)
  and, being on disk, a crash of the machine (not simulated here).
- **`appendonly yes` and `appendfsync everysec`** (Redis's default policy when the AOF is on;
  the embedded local server uses it): Redis writes each reply's data to the file before
  replying and fsyncs once a second. A `kill -9` of redis-server loses nothing acknowledged,
  because the operating system keeps what was written (measured: {restart-everysec[lost]} of
  {restart-everysec[acked_before_kills]} acknowledged before the kill), except when a slow disk
  makes Redis postpone its writes, by up to 2 s (`aof_delayed_fsync` in `INFO persistence`
  counts those; {restart-everysec[delayed_fsync]} in the last run). A crash of the machine or
  a power cut loses what was not yet fsynced: up to about 1 s of acknowledged writes (2 s
  when fsync stalls). The suite cannot crash the machine; in the last run
  {restart-everysec[at_risk]} records were acknowledged in the last second before the kill,
  which is what such a crash at that moment would have put at risk.
- **`appendonly no`** (redis-server's own default; RDB snapshots alone): a restart loses every
  write since the last snapshot. No promise.
- **A call that raised `StoreUnavailableError` is in doubt**: it may or may not have run. Sent
  again as the same request (the same reservation id for `record`/`release`, the same
  `idempotency_key` for `preflight` and for `record` without a reservation id) it lands exactly
  once. Without that, its effect is bounded: at most its estimate reserved until the TTL
  (a preflight), or at most its units charged (a record).
- Lost writes undercount: acknowledged records Redis lost are no longer in `spent`, and later
  preflights may approve against budget that was in fact used.

### Fail-closed

With the default client settings, a preflight that cannot reach Redis raises
`StoreUnavailableError` and approves nothing: within 2 s when nothing listens (slowest of
{outage[unreachable_calls]} in the last run: {outage[unreachable_max]} s), and within 2 s too when
Redis accepts connections but never answers (slowest of {outage[paused_calls]}:
{outage[paused_max]} s: one 1 s attempt). A preflight sent to a silent server can still run
when it wakes: it then holds its estimate until its TTL, at most one reservation per failed
call, and is never charged.
"""


@dataclass(slots=True)
class Result:
    seconds: float
    figures: dict[str, Figure]


@dataclass(slots=True)
class Report:
    """The session's collector: scenario key -> what it measured."""

    sizes: Sizes
    results: dict[str, Result] = field(default_factory=dict)

    def record(self, key: str, seconds: float, figures: Mapping[str, Figure]) -> None:
        scenario = SCENARIOS[key]
        expected = {k for k, _ in (*SUMMARY, *scenario.figures)}
        missing = expected - set(figures)
        assert not missing, f"{key} did not measure {sorted(missing)}"
        self.results[key] = Result(seconds, dict(figures))
        if os.environ.get(f"{PREFIX}VERBOSE"):
            print(f"\n{key} ({seconds:.1f} s): {figures}")

    def complete(self) -> bool:
        return set(self.results) == set(SCENARIOS)


def target() -> Path | None:
    raw = os.environ.get(ENV_PATH)
    if raw is None:
        return DEFAULT_PATH
    return Path(raw) if raw else None


def write(report: Report, path: Path) -> None:
    path.write_text(render(report), encoding="utf-8")


def show(value: Figure) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def render(report: Report) -> str:
    values: dict[str, dict[str, str]] = {
        key: {k: show(v) for k, v in result.figures.items()}
        for key, result in report.results.items()
    }
    values["sizes"] = {k: str(v) for k, v in report.sizes.settings().items()}
    values["total"] = {
        "approvals": str(sum(int(r.figures.get("approvals", 0)) for r in report.results.values())),
        "samples": str(sum(int(r.figures.get("samples", 0)) for r in report.results.values())),
        "overspend": str(sum(int(r.figures["overspend"]) for r in report.results.values())),
    }
    seconds = sum(r.seconds for r in report.results.values())
    out = [
        "# Reliability",
        "",
        "Written by the chaos suite (`tests/chaos/`) at the end of its last full run: every "
        "figure below was measured by that run. Do not edit by hand; the text lives in "
        "`tests/chaos/_report.py`. Run it with `.venv/bin/python -m pytest tests/chaos` "
        f"(`make test` runs it too; `{ENV_PATH}=path` writes the file elsewhere, an empty "
        "value nowhere).",
        "",
        "| | |",
        "|---|---|",
        f"| run | {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {revision()} |",
        f"| machine | {machine()} |",
        f"| time | {seconds:.0f} s for the {len(SCENARIOS)} scenarios |",
        f"| sizes | {sizes_line(report.sizes)} |",
        "",
        "| scenario | " + " | ".join(label for _, label in SUMMARY) + " |",
        "|---" * (len(SUMMARY) + 1) + "|",
    ]
    for key, scenario in SCENARIOS.items():
        row = [show(report.results[key].figures[k]) for k, _ in SUMMARY]
        out.append(f"| [{scenario.short}](#{anchor(key)}) | " + " | ".join(row) + " |")
    out += ["", PROMISES.format_map(values), "## Scenarios", ""]
    for n, (key, scenario) in enumerate(SCENARIOS.items(), 1):
        result = report.results[key]
        out += [
            f'<a id="{anchor(key)}"></a>',
            f"### {n}. {scenario.title}",
            "",
            scenario.does.format_map(values),
            "",
            "Asserts:",
            "",
            *(f"- {line}" for line in scenario.asserts),
            "",
            f"Last run ({result.seconds:.0f} s):",
            "",
            "| figure | value |",
            "|---|---|",
            *(
                f"| {label} | {show(result.figures[k])} |"
                for k, label in (*SUMMARY, *scenario.figures)
            ),
            "",
        ]
    return "\n".join(out).rstrip() + "\n"


def anchor(key: str) -> str:
    return f"scenario-{key}"


def sizes_line(sizes: Sizes) -> str:
    parts = [f"`{k}={v}`" for k, v in sizes.settings().items()]
    return (
        " ".join(parts)
        + f" (each settable as `{PREFIX}<NAME>`; `{PREFIX}SEED={sizes.seed}` replays this run)"
    )


def revision() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        )
        return done.stdout.strip() if done.returncode == 0 else ""

    if shutil.which("git") is None or not (commit := git("rev-parse", "--short", "HEAD")):
        return "commit unknown"
    dirty = git("status", "--porcelain", "--", "agentbill", "lua")
    return f"commit {commit}" + (" with uncommitted changes to agentbill/ or lua/" if dirty else "")


def machine() -> str:
    from agentbill._local import find_server_binary

    binary = find_server_binary()
    try:
        version = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.split()
        server = next((v.split("=", 1)[1] for v in version if v.startswith("v=")), "?")
    except OSError:
        server = "?"
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, {Path(binary).name} {server}"
    )
