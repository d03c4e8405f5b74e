"""What the commands print: JSON for scripts (the library's field names), tables for people."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from rich.console import Console, RenderableType
from rich.table import Table

from agentbill._results import BudgetStatus, Event, Usage

DASH = "-"
UNBOUNDED = 100_000
"""Columns of the console that measures what a table needs."""
EVENT_FIELDS = tuple(f.name for f in dataclasses.fields(Event))


def console(pipe_width: int = 100) -> Console:
    """stdout for people: colours on a terminal, plain text in a pipe, where tables get at
    least ``pipe_width`` columns (a pipe has no width of its own)."""
    out = Console(highlight=False, soft_wrap=False)
    if not out.is_terminal and out.width < pipe_width:
        out = Console(highlight=False, soft_wrap=False, width=pipe_width)
    return out


def show(renderable: RenderableType, pipe_width: int = 100) -> None:
    """Print ``renderable`` for people. On a terminal it fits the screen; in a pipe (a log, a
    file) it takes the width it needs, so that no id and no number is cut short (…)."""
    out = console(pipe_width)
    if not out.is_terminal:
        need = Console(width=UNBOUNDED).measure(renderable).maximum
        if need > out.width:
            out = Console(highlight=False, soft_wrap=False, width=need)
    out.print(renderable)


def jsonable(value: Any) -> Any:
    """A result as plain JSON values: dataclasses as objects (their fields, by the library's
    names), times as ISO 8601 strings, tuples as lists, paths as strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: jsonable(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if not f.name.startswith("_")
        }
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def emit_json(value: Any) -> None:
    """One JSON document on one line of stdout."""
    sys.stdout.write(json.dumps(jsonable(value), separators=(",", ":"), ensure_ascii=False))
    sys.stdout.write("\n")
    sys.stdout.flush()


# -- numbers and times ---------------------------------------------------------------------------


def units(value: int | None, none: str = "unlimited") -> str:
    return none if value is None else f"{value:,}"


def duration(seconds: float | None) -> str:
    """``3d 4h``, ``2h 5m``, ``4m 10s``, ``12s``: the two largest parts."""
    if seconds is None:
        return DASH
    left = max(0, int(seconds))
    parts: list[str] = []
    for size, name in ((86400, "d"), (3600, "h"), (60, "m"), (1, "s")):
        if left >= size or (name == "s" and not parts):
            parts.append(f"{left // size}{name}")
            left %= size
    return " ".join(parts[:2])


def moment(value: datetime | None) -> str:
    """A time in UTC, to the second."""
    if value is None:
        return DASH
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# -- budgets -------------------------------------------------------------------------------------


def scope_name(status: BudgetStatus) -> str:
    return status.customer_id if status.agent_id is None else f"  agent {status.agent_id}"


def budget_table(status: BudgetStatus) -> Table:
    """One scope's budget, a row per field."""
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    rate = status.rate_limit
    rows: list[tuple[str, str]] = [
        ("customer", status.customer_id),
        ("agent", status.agent_id or DASH),
        ("limit", units(status.limit)),
        ("spent", units(status.spent)),
        ("reserved", units(status.reserved)),
        ("remaining", units(status.remaining)),
        ("in flight", units(status.open_reservations)),
        ("period", status.period or "lifetime"),
        ("period start", moment(status.period_start)),
        ("period end", moment(status.period_end)),
        ("resets in", duration(status.resets_in)),
        ("thresholds", ", ".join(f"{t}%" for t in status.thresholds) or DASH),
        (
            "rate limit",
            f"{rate.units:,} units / {rate.per_seconds:,} s, burst {rate.burst:,}"
            if rate is not None
            else DASH,
        ),
        ("max in flight", units(status.max_in_flight, none=DASH)),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def usage_table(usage: Usage) -> Table:
    """The customer, then each agent: a row per scope."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name, justify in (
        ("SCOPE", "left"),
        ("LIMIT", "right"),
        ("SPENT", "right"),
        ("RESERVED", "right"),
        ("REMAINING", "right"),
        ("IN FLIGHT", "right"),
        ("PERIOD END", "left"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for status in (usage.customer, *usage.agents):
        table.add_row(
            scope_name(status),
            units(status.limit),
            units(status.spent),
            units(status.reserved),
            units(status.remaining),
            units(status.open_reservations),
            moment(status.period_end),
        )
    return table


# -- events --------------------------------------------------------------------------------------

EVENT_COLUMNS = (
    ("TIME", 23),
    ("TYPE", 9),
    ("AGENT", 16),
    ("TASK", 12),
    ("UNITS", 9),
    ("RELEASED", 9),
    ("REASON", 21),
    ("SCOPE", 8),
)


def event_header() -> str:
    return "  ".join(f"{name:<{width}}" for name, width in EVENT_COLUMNS) + "  ID"


def event_line(event: Event) -> str:
    """One event as a line of fixed-width columns (a stream prints as it reads)."""
    cells = (
        event.time.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:23],
        event.type,
        event.agent_id or DASH,
        event.task_ref or DASH,
        f"{event.units:,}",
        f"{event.released:,}",
        event.reason or DASH,
        event.scope or DASH,
    )
    padded = (f"{cell:<{width}}" for cell, (_, width) in zip(cells, EVENT_COLUMNS, strict=True))
    return "  ".join(padded) + f"  {event.id}"


def csv_row(event: Event) -> list[str]:
    values = jsonable(event)
    return ["" if values[name] is None else str(values[name]) for name in EVENT_FIELDS]


def lines(rows: Iterable[str]) -> None:
    for row in rows:
        sys.stdout.write(row + "\n")
    sys.stdout.flush()
