"""The ``agentbill`` command line (and ``python -m agentbill``): typer + rich, extra ``cli``.

    agentbill budget set|get        a customer's (or an agent's) budget
    agentbill limit rate|concurrency
    agentbill usage CUSTOMER        the customer and every agent: limit, spent, reserved, ...
    agentbill events CUSTOMER       the ledger (--follow, --json, --csv)
    agentbill top                   a live view of the customers' burn-down
    agentbill exporter              Prometheus metrics of the budgets, on /metrics
    agentbill local ...             the embedded local server
    agentbill keys ...              tenant keys
    agentbill mcp                   the MCP server (agentbill.mcp_server)

Exit status: 0 done, 2 bad input (nothing was written), 3 Redis unavailable, 1 anything else;
an error is one line on stderr, never a traceback. This module imports nothing heavy: without
typer and rich it says which extra to install.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from agentbill._install import pip_install

__all__ = ["main"]

MISSING_EXTRA = 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    try:
        import rich  # noqa: F401
        import typer  # noqa: F401
    except ImportError as exc:
        print(
            f"agentbill: the command line needs {exc.name or 'typer and rich'}: "
            + pip_install("cli"),
            file=sys.stderr,
        )
        return MISSING_EXTRA
    from agentbill.cli._main import run

    return run(argv)
