"""``agentbill top``: the customers' burn-down, refreshed in place.

It only reads, with the operations every client has, and adds nothing to the preflight path:
no write, no counter, no key. Per refresh, for each customer: one ``get_usage`` call (limit,
spent, reserved, runs in flight of the customer and its agents) and, for the rows shown, one
``events`` call reading the ledger entries written since the last refresh. Approvals and
refusals per second are the ``approved`` and ``refused`` entries of the ledger (which every
preflight already writes) whose stream ids, Redis's clock in milliseconds, fall within the
last ``window`` seconds of the server's ``TIME``. A leased run shows as its slice's approval.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import time
import tty
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

import redis
import typer
from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from agentbill._client import AgentBillClient
from agentbill._exceptions import AgentBillError
from agentbill._results import BudgetStatus, Usage
from agentbill._retry import translated
from agentbill.cli._common import Namespace, RedisUrl, Session, bad_input, example, session
from agentbill.cli._customers import Customers
from agentbill.cli._output import DASH, console, duration, emit_json, jsonable, show, units

BAR = 16
"""Cells of a burn-down bar."""
MAX_EVENTS = 10_000
"""Ledger entries read per customer and refresh; past it a rate is a lower bound (shown ≥)."""
PAGE = 1000
PIPE_WIDTH = 132
ID_WIDTH = 24
"""Columns of the customer (and agent) names: a longer id ends in …."""

# -- rates from the ledger -----------------------------------------------------------------------


def _ms(event_id: str) -> int:
    return int(event_id.split("-", 1)[0])


@dataclass
class RateWindow:
    """One customer's approvals and refusals over the last ``window_ms``, read from its ledger
    incrementally: each update reads only what was written since the last one."""

    window_ms: int
    last_id: str | None = None
    seen: deque[tuple[int, bool]] = field(default_factory=deque)
    complete: bool = True
    """False when the last update stopped at MAX_EVENTS: the rates are lower bounds."""

    def update(self, client: AgentBillClient, customer: str, now_ms: int) -> None:
        start = now_ms - self.window_ms
        since = self.last_id
        if since is None or _ms(since) < start:
            since = f"{max(0, start)}-0"
        read = 0
        self.complete = True
        while True:
            batch = client.events(customer, since=since, limit=PAGE)
            for event in batch:
                if event.type in ("approved", "refused"):
                    self.seen.append((_ms(event.id), event.type == "approved"))
            read += len(batch)
            if batch:
                since = batch[-1].id
            if len(batch) < PAGE:
                break
            if read >= MAX_EVENTS:
                self.complete = False
                break
        # After a capped read, start the next one from the window again rather than lag.
        self.last_id = since if self.complete else None
        while self.seen and self.seen[0][0] <= start:
            self.seen.popleft()

    def rates(self) -> tuple[float, float]:
        """(approvals, refusals) per second over the window."""
        approved = sum(1 for _, ok in self.seen if ok)
        seconds = self.window_ms / 1000
        return approved / seconds, (len(self.seen) - approved) / seconds


# -- frames --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    usage: Usage
    approved_per_second: float
    refused_per_second: float
    rates_complete: bool


@dataclass(frozen=True)
class Frame:
    """What one refresh read: the time on Redis's clock and a row per customer shown."""

    time: datetime
    namespace: str
    where: str
    window_seconds: float
    rows: tuple[Row, ...]
    customers: int
    """Customers known (named, or found by SCAN); ``rows`` are the first ``--rows``."""


def redis_time_ms(r: redis.Redis) -> int:
    """The server's clock (TIME), in milliseconds: the clock of the ledger's ids."""
    with translated():
        seconds, micros = r.time()
    return int(seconds) * 1000 + int(micros) // 1000


def burn_order(usage: Usage) -> tuple[bool, float, int, str]:
    """Budgets nearest to exhaustion first; unlimited customers after, by spent."""
    c = usage.customer
    used = (c.spent + c.reserved) / c.limit if c.limit else 1.0 if c.limit == 0 else 0.0
    return (c.limit is None, -used, -c.spent, c.customer_id)


class Sampler:
    """Reads frames for ``top``; keeps each shown customer's rate window between refreshes."""

    def __init__(self, s: Session, customers: Customers, rows: int, window: float) -> None:
        self._session = s
        self._customers = customers
        self._rows = rows
        self._window_ms = int(window * 1000)
        self._windows: dict[str, RateWindow] = {}

    def sample(self) -> Frame:
        s = self._session
        ids = self._customers.current()
        usages = [s.client.get_usage(c) for c in ids]
        if self._customers.discovered:
            usages.sort(key=burn_order)
        shown = usages[: self._rows]
        now_ms = redis_time_ms(s.redis)
        rows = []
        for usage in shown:
            cid = usage.customer.customer_id
            window = self._windows.setdefault(cid, RateWindow(self._window_ms))
            window.update(s.client, cid, now_ms)
            approved, refused = window.rates()
            rows.append(Row(usage, approved, refused, window.complete))
        for cid in set(self._windows) - {u.customer.customer_id for u in shown}:
            del self._windows[cid]  # read afresh if it is shown again
        return Frame(
            time=datetime.fromtimestamp(now_ms / 1000, tz=UTC),
            namespace=s.namespace,
            where=s.where,
            window_seconds=self._window_ms / 1000,
            rows=tuple(rows),
            customers=len(ids),
        )


def bar(status: BudgetStatus) -> Text:
    """Spent (█), reserved (▒) and free (·) cells of the limit, and the percent committed."""
    if status.limit is None:
        return Text("unlimited".ljust(BAR + 6), style="dim")
    committed = status.spent + status.reserved
    if status.limit == 0:
        spent_cells, reserved_cells, percent = (BAR, 0, 100.0) if committed else (0, 0, 100.0)
    else:
        spent_cells = min(BAR, round(BAR * status.spent / status.limit))
        reserved_cells = min(BAR - spent_cells, round(BAR * status.reserved / status.limit))
        percent = 100 * committed / status.limit
    colour = "red" if percent >= 90 else "yellow" if percent >= 70 else "green"
    text = Text()
    text.append("█" * spent_cells, style=colour)
    text.append("▒" * reserved_cells, style="yellow")
    text.append("·" * (BAR - spent_cells - reserved_cells), style="dim")
    text.append(f" {percent:4.0f}%")
    return text


def rate(value: float, complete: bool) -> str:
    return ("" if complete else "≥") + f"{value:.1f}"


def render(frame: Frame, agents: bool = False, live: bool = False) -> RenderableType:
    """A frame as a header line and a table, a row per customer (and per agent)."""
    header = Text.assemble(
        ("agentbill top", "bold"),
        f"  namespace {frame.namespace}  {frame.where}  ",
        frame.time.strftime("%Y-%m-%d %H:%M:%S UTC"),
        f"  rates over {frame.window_seconds:g} s",
        ("  q quits" if live else "", "dim"),
    )
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name, justify in (
        ("CUSTOMER", "left"),
        ("BUDGET", "left"),
        ("SPENT", "right"),
        ("RESERVED", "right"),
        ("LIMIT", "right"),
        ("REMAINING", "right"),
        ("APPROVED/s", "right"),
        ("REFUSED/s", "right"),
        ("IN FLIGHT", "right"),
        ("RESETS IN", "right"),
    ):
        table.add_column(
            name,
            justify=justify,  # type: ignore[arg-type]
            no_wrap=True,
            min_width=len(name) if name != "CUSTOMER" else 8,
            # Ids run to 256 characters: a long one is cut (…), never the other columns.
            max_width=ID_WIDTH if name == "CUSTOMER" else None,
            overflow="ellipsis",
        )
    for row in frame.rows:
        c = row.usage.customer
        table.add_row(
            c.customer_id,
            bar(c),
            units(c.spent),
            units(c.reserved),
            units(c.limit),
            units(c.remaining, none=DASH),
            rate(row.approved_per_second, row.rates_complete),
            rate(row.refused_per_second, row.rates_complete),
            units(c.open_reservations),
            duration(c.resets_in),
        )
        for a in row.usage.agents if agents else ():
            table.add_row(
                Text(f"  └ {a.agent_id}", style="dim"),
                bar(a),
                units(a.spent),
                units(a.reserved),
                units(a.limit),
                units(a.remaining, none=DASH),
                "",
                "",
                units(a.open_reservations),
                duration(a.resets_in),
            )
    footer = Text(
        f"{len(frame.rows)} of {frame.customers} customers"
        + ("" if frame.rows else ": none found in this namespace"),
        style="dim",
    )
    return Group(header, Text(""), table, Text(""), footer)


def frame_json(frame: Frame) -> dict[str, Any]:
    return {
        "time": frame.time.isoformat(),
        "namespace": frame.namespace,
        "window_seconds": frame.window_seconds,
        "customers": [
            {
                **jsonable(row.usage.customer),
                "approved_per_second": row.approved_per_second,
                "refused_per_second": row.refused_per_second,
                "rates_complete": row.rates_complete,
                "agents": jsonable(row.usage.agents),
            }
            for row in frame.rows
        ],
    }


# -- the live view -------------------------------------------------------------------------------


class Keys:
    """Single key presses from a terminal (cbreak mode while open); elsewhere, none."""

    def __init__(self) -> None:
        self._fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else None
        self._saved: list[Any] | None = None

    def __enter__(self) -> Keys:
        if self._fd is not None:
            self._saved = termios.tcgetattr(self._fd)
            tty.setcbreak(self._fd)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._fd is not None and self._saved is not None:
            termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)

    def wait(self, timeout: float) -> str | None:
        """The key pressed within ``timeout`` seconds, or None."""
        if self._fd is None:
            time.sleep(timeout)
            return None
        ready, _, _ = select.select([self._fd], [], [], timeout)
        return os.read(self._fd, 1).decode(errors="replace") if ready else None


def live_view(sampler: Sampler, interval: float, agents: bool) -> None:
    """Refresh every ``interval`` seconds until q (or Ctrl-C); keep going through outages."""
    out = console(PIPE_WIDTH)
    with Keys() as keys, Live(console=out, screen=True, auto_refresh=False) as live:
        while True:
            try:
                shown: RenderableType = render(sampler.sample(), agents, live=True)
            except AgentBillError as exc:
                shown = Text(f"agentbill top: {exc}; trying again every {interval:g} s")
            live.update(shown, refresh=True)
            deadline = time.monotonic() + interval
            while (left := deadline - time.monotonic()) > 0:
                if (keys.wait(left) or "").lower() == "q":
                    return


def top(
    customer: Annotated[
        list[str] | None,
        typer.Option(
            "--customer",
            "-c",
            metavar="C",
            help="show this customer (repeat it); default: every customer found by SCAN",
        ),
    ] = None,
    once: Annotated[bool, typer.Option("--once", help="print one frame and exit")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="with --once: the frame as JSON")] = False,
    interval: Annotated[float, typer.Option(min=0.1, help="seconds between refreshes")] = 2.0,
    window: Annotated[
        float, typer.Option(min=1, help="seconds over which approvals/refusals are counted")
    ] = 10.0,
    rows: Annotated[
        int, typer.Option(min=1, help="customers shown (found ones: nearest to their limit)")
    ] = 30,
    agents: Annotated[bool, typer.Option("--agents", help="a row per agent too")] = False,
    rescan: Annotated[
        float, typer.Option(min=1, help="seconds between SCANs for customers")
    ] = 60.0,
    redis_url: RedisUrl = None,
    namespace: Namespace = "agentbill",
) -> None:
    """A live view of the customers' burn-down: spent and reserved against the limit,
    approvals and refusals per second, runs in flight. q quits.

    It only reads (get_usage, the ledger, TIME) and adds no write and no key to the preflight
    path: the rates come from the ledger entries every preflight already writes.
    """
    if as_json and not once:
        bad_input("--json prints one frame: add --once", "--json")
    if not once and not console().is_terminal:
        bad_input("the live view needs a terminal: add --once (and --json for a script)", "--once")
    with session(redis_url, namespace) as s:
        sampler = Sampler(s, Customers(s.redis, s.namespace, customer or (), rescan), rows, window)
        if not once:
            with contextlib.suppress(KeyboardInterrupt):
                live_view(sampler, interval, agents)
            return
        frame = sampler.sample()
    if as_json:
        emit_json(frame_json(frame))
    else:
        show(render(frame, agents), PIPE_WIDTH)


TOP_EXAMPLE = example(
    "agentbill top",
    "agentbill top --customer cust_42 --customer cust_7 --agents",
    "agentbill top --once --json",
)
