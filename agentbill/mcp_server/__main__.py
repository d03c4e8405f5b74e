"""``python -m agentbill.mcp_server [--http HOST:PORT] [--allow-admin]``: see the package."""

from __future__ import annotations

import argparse
import sys

from agentbill._exceptions import InvalidRequestError, StoreError
from agentbill.mcp_server import serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m agentbill.mcp_server",
        description="agentbill's MCP server: budget tools for agent hosts. Reads "
        "AGENTBILL_REDIS_URL, AGENTBILL_NAMESPACE and AGENTBILL_API_KEY.",
    )
    parser.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="serve streamable HTTP on this loopback address (path /mcp) instead of stdio",
    )
    parser.add_argument(
        "--allow-admin",
        action="store_true",
        help="also list the budget-changing tools (set_budget, set_rate_limit, "
        "set_concurrency_limit, open_task): never for an agent you do not trust with them",
    )
    args = parser.parse_args(argv)
    try:
        serve(http=args.http, allow_admin=args.allow_admin)
    except InvalidRequestError as exc:
        print(f"agentbill mcp: {exc}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"agentbill mcp: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
