"""The command line's table of contents: every group and command, registered in help order."""

from __future__ import annotations

from collections.abc import Sequence

import typer

from agentbill.cli import _admin, _budgets, _exporter, _top
from agentbill.cli._common import (
    ENV_API_KEY,
    ENV_NAMESPACE,
    ENV_REDIS_URL,
    EXIT_STATUS_TEXT,
    AgentBillGroup,
    exit_status,
)

app = typer.Typer(
    cls=AgentBillGroup,
    name="agentbill",
    help=(
        "Pre-flight budget enforcement for AI agent runs: budgets, limits, usage, the ledger, "
        "a live view and a Prometheus exporter, against the Redis your workers share.\n\n"
        f"Connection: --redis-url or ${ENV_REDIS_URL} (default: the embedded local server), "
        f"--namespace or ${ENV_NAMESPACE}, a tenant key in ${ENV_API_KEY}.\n\n"
        f"{EXIT_STATUS_TEXT}"
    ),
    epilog="**Example**\n\n    agentbill budget set cust_42 1000 --period month",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

app.add_typer(_budgets.budget)
app.add_typer(_budgets.limit)
app.command("usage", epilog=_budgets.USAGE_EXAMPLE)(_budgets.usage)
app.command("events", epilog=_budgets.EVENTS_EXAMPLE)(_budgets.events)
app.command("top", epilog=_top.TOP_EXAMPLE)(_top.top)
app.command("exporter", epilog=_exporter.EXPORTER_EXAMPLE)(_exporter.exporter)
app.add_typer(_admin.local)
app.add_typer(_admin.keys)
app.command("mcp", epilog=_admin.MCP_EXAMPLE)(_admin.mcp)


def run(argv: Sequence[str] | None = None) -> int:
    """The command line as a function: ``argv`` (default ``sys.argv[1:]``) -> exit status."""
    return exit_status(
        lambda: typer.main.get_command(app).main(
            args=argv, prog_name="agentbill", standalone_mode=False
        )
    )
