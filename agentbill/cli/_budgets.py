"""``agentbill budget``, ``limit``, ``usage`` and ``events``: one client call each."""

from __future__ import annotations

import csv
import sys
import time
from collections.abc import Callable
from typing import Annotated

import typer

from agentbill._client import AgentBillClient
from agentbill._exceptions import StoreUnavailableError
from agentbill._results import BudgetStatus, Event, Period
from agentbill.cli._common import (
    Json,
    Namespace,
    RedisUrl,
    bad_input,
    example,
    group,
    session,
    warning,
)
from agentbill.cli._output import (
    EVENT_FIELDS,
    budget_table,
    csv_row,
    emit_json,
    event_header,
    event_line,
    lines,
    show,
    usage_table,
)

Customer = Annotated[str, typer.Argument(metavar="CUSTOMER", help="the customer id")]
Agent = Annotated[
    str | None,
    typer.Option("--agent", metavar="AGENT", help="the agent's budget within the customer's"),
]

budget = group(
    "budget",
    "Set and read a customer's (or one agent's) budget.",
    "agentbill budget set cust_42 1000 --period month",
    "agentbill budget get cust_42 --json",
)
# A command whose arguments are numbers takes "-5" as one (refused by the rule it breaks,
# which it names) rather than as an unknown option; a misspelt option is still refused, as
# an argument too many.
NUMBERS = {"ignore_unknown_options": True}
limit = group(
    "limit",
    "Rate (GCRA) and concurrency limits of a customer or an agent.",
    "agentbill limit rate cust_42 600 60 --burst 100",
    "agentbill limit concurrency cust_42 5",
)


def show_status(status: BudgetStatus, as_json: bool) -> None:
    if as_json:
        emit_json(status)
    else:
        show(budget_table(status))


# -- budget --------------------------------------------------------------------------------------


def parse_limit(text: str) -> int | None:
    """LIMIT: units, or ``none``/``unlimited``."""
    if text.lower() in ("none", "unlimited"):
        return None
    try:
        return int(text)  # Python's grammar: 1_000 is a thousand, 1__0_ is no number
    except ValueError:
        bad_input(f"{text!r} is not a whole number of units, nor 'none'", "LIMIT")


@budget.command(
    "set",
    context_settings=NUMBERS,
    epilog=example(
        "agentbill budget set cust_42 1000 --period month --threshold 80",
        "agentbill budget set cust_42 200 --agent summariser",
        "agentbill budget set cust_42 none            # unlimited",
    ),
)
def budget_set(
    customer: Customer,
    limit: Annotated[str, typer.Argument(metavar="LIMIT", help="units, or 'none' for unlimited")],
    period: Annotated[
        Period | None,
        typer.Option(
            help="a calendar period after which a fresh budget starts (default: a lifetime "
            "budget, as set_budget without period)",
        ),
    ] = None,
    tz: Annotated[str, typer.Option("--tz", help="the period's IANA time zone")] = "UTC",
    agent: Agent = None,
    threshold: Annotated[
        list[int] | None,
        typer.Option(
            "--threshold",
            metavar="PCT",
            help="a percent of the limit whose crossing is written to the ledger (repeat it; "
            "the list replaces the old one)",
        ),
    ] = None,
    as_json: Json = False,
    redis_url: RedisUrl = None,
    namespace: Namespace = "agentbill",
) -> None:
    """Set the budget of CUSTOMER (or with --agent, of that agent within it).

    As the library's set_budget: every option not given takes its default (no --period is a
    lifetime budget, no --threshold clears the thresholds). Prints the new budget.
    """
    units = parse_limit(limit)
    with session(redis_url, namespace) as s:
        status = s.client.set_budget(
            customer,
            units,
            period=period,
            tz=tz,
            agent_id=agent,
            thresholds=tuple(threshold or ()),
        )
    show_status(status, as_json)


@budget.command(
    "get",
    epilog=example(
        "agentbill budget get cust_42",
        "agentbill budget get cust_42 --agent summariser --json",
    ),
)
def budget_get(
    customer: Customer,
    agent: Agent = None,
    as_json: Json = False,
    redis_url: RedisUrl = None,
    namespace: Namespace = "agentbill",
) -> None:
    """The budget of CUSTOMER (or of one agent) in its current period."""
    with session(redis_url, namespace) as s:
        status = s.client.get_budget(customer, agent_id=agent)
    show_status(status, as_json)


# -- limit ---------------------------------------------------------------------------------------

Remove = Annotated[bool, typer.Option("--remove", help="remove the limit")]


@limit.command(
    "rate",
    context_settings=NUMBERS,
    epilog=example(
        "agentbill limit rate cust_42 600 60 --burst 100   # 600 units a minute, bursts of 100",
        "agentbill limit rate cust_42 --agent summariser --remove",
    ),
)
def limit_rate(
    customer: Customer,
    units: Annotated[
        int | None, typer.Argument(metavar="UNITS", help="units sustained per PER_SECONDS")
    ] = None,
    per_seconds: Annotated[
        int | None, typer.Argument(metavar="PER_SECONDS", help="the rate's period, in seconds")
    ] = None,
    burst: Annotated[
        int | None, typer.Option(metavar="N", help="the largest burst (default: UNITS)")
    ] = None,
    agent: Agent = None,
    remove: Remove = False,
    as_json: Json = False,
    redis_url: RedisUrl = None,
    namespace: Namespace = "agentbill",
) -> None:
    """Limit CUSTOMER (or an agent) to UNITS per PER_SECONDS (GCRA on the estimates
    preflights reserve), or --remove the limit."""
    if remove and (units is not None or per_seconds is not None or burst is not None):
        bad_input("give UNITS PER_SECONDS [--burst N], or --remove, not both", "--remove")
    if not remove and (units is None or per_seconds is None):
        bad_input("give UNITS and PER_SECONDS (or --remove)", "UNITS PER_SECONDS")
    with session(redis_url, namespace) as s:
        status = s.client.set_rate_limit(customer, units, per_seconds, burst=burst, agent_id=agent)
    show_status(status, as_json)


@limit.command(
    "concurrency",
    context_settings=NUMBERS,
    epilog=example(
        "agentbill limit concurrency cust_42 5             # at most 5 runs in flight",
        "agentbill limit concurrency cust_42 --remove",
    ),
)
def limit_concurrency(
    customer: Customer,
    max_in_flight: Annotated[
        int | None, typer.Argument(metavar="N", help="runs in flight at most")
    ] = None,
    agent: Agent = None,
    remove: Remove = False,
    as_json: Json = False,
    redis_url: RedisUrl = None,
    namespace: Namespace = "agentbill",
) -> None:
    """Allow CUSTOMER (or an agent) at most N open reservations (runs in flight), or
    --remove the limit."""
    if remove == (max_in_flight is not None):
        bad_input("give N, or --remove", "N")
    with session(redis_url, namespace) as s:
        status = s.client.set_concurrency_limit(customer, max_in_flight, agent_id=agent)
    show_status(status, as_json)


# -- usage ---------------------------------------------------------------------------------------


def usage(
    customer: Customer,
    as_json: Json = False,
    redis_url: RedisUrl = None,
    namespace: Namespace = "agentbill",
) -> None:
    """CUSTOMER and every agent that ran or has a budget: limit, spent, reserved, remaining,
    runs in flight, period end. One round trip."""
    with session(redis_url, namespace) as s:
        result = s.client.get_usage(customer)
    if as_json:
        emit_json(result)
    else:
        show(usage_table(result))


USAGE_EXAMPLE = example("agentbill usage cust_42", "agentbill usage cust_42 --json | jq .customer")


# -- events --------------------------------------------------------------------------------------

PAGE = 1000
"""Events read per round trip."""


def events(
    customer: Customer,
    since: Annotated[
        str | None,
        typer.Option(metavar="ID", help="only the events after this one (an event's id)"),
    ] = None,
    limit: Annotated[
        int | None, typer.Option(metavar="N", min=1, help="at most N events (not with --follow)")
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="then print new events until interrupted")
    ] = False,
    interval: Annotated[
        float, typer.Option(min=0.05, help="seconds between reads with --follow")
    ] = 1.0,
    as_json: Annotated[
        bool, typer.Option("--json", help="one JSON object per line, with the Event fields")
    ] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV with a header row")] = False,
    redis_url: RedisUrl = None,
    namespace: Namespace = "agentbill",
) -> None:
    """The ledger of CUSTOMER, oldest first: every decision, record, release, expiry and
    threshold crossing (the last ledger_max_len kept). With --follow, it keeps reading new
    events (one events() call every --interval seconds) until interrupted."""
    if as_json and as_csv:
        bad_input("choose one of --json and --csv", "--csv")
    if follow and limit is not None:
        bad_input("--limit stops the listing, --follow never does: choose one", "--limit")
    out = csv.writer(sys.stdout, lineterminator="\n") if as_csv else None
    headed = False

    def show(batch: list[Event]) -> None:
        nonlocal headed
        if not headed:  # once the first read succeeded: a failed command prints nothing
            headed = True
            if out is not None:
                out.writerow(EVENT_FIELDS)
            elif not as_json:
                lines([event_header()])
        if as_json:
            for event in batch:
                emit_json(event)
        elif out is not None:
            out.writerows(csv_row(event) for event in batch)
            sys.stdout.flush()
        else:
            lines(event_line(event) for event in batch)

    with session(redis_url, namespace) as s:
        try:
            read(s.client, customer, since, limit, follow, interval, show)
        except KeyboardInterrupt:
            if not follow:
                raise  # an interrupted listing is incomplete: exit 130


def read(
    client: AgentBillClient,
    customer: str,
    since: str | None,
    limit: int | None,
    follow: bool,
    interval: float,
    show: Callable[[list[Event]], None],
) -> None:
    """Page through the ledger after ``since``; with ``follow``, poll for more forever.

    Following, an outage after the first read (a restart, a failover) does not end the
    stream: it is said once on stderr, and reading goes on from the last event shown when
    Redis answers again. The first read's failure ends the command (exit 3).
    """
    left = limit
    started = outage = False
    while True:
        want = PAGE if left is None else min(PAGE, left)
        try:
            batch = client.events(customer, since=since, limit=want)
        except StoreUnavailableError as exc:
            if not (follow and started):
                raise
            if not outage:
                warning(f"{exc}; still following, reading again every {interval:g} s")
                outage = True
            time.sleep(interval)
            continue
        if outage:
            warning("Redis answers again; following")
            outage = False
        started = True
        show(batch)
        if batch:
            since = batch[-1].id
        if left is not None:
            left -= len(batch)
            if left <= 0:
                return
        if len(batch) == want:
            continue  # more to read now
        if not follow:
            return
        time.sleep(interval)


EVENTS_EXAMPLE = example(
    "agentbill events cust_42 --limit 20",
    "agentbill events cust_42 --since 1733140800000-0 --json",
    "agentbill events cust_42 --follow --csv > ledger.csv",
)
