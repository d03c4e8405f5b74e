"""agentbill's MCP server: budget tools for agent hosts, on the same Redis budgets as the library.

    python -m agentbill.mcp_server [--http HOST:PORT] [--allow-admin]

Over stdio by default (what hosts such as Claude Code, Cursor and desktop agents launch), or
streamable HTTP on a loopback address (``--http 127.0.0.1:8765``, path ``/mcp``). The
connection, namespace and tenant key come from ``AGENTBILL_REDIS_URL``, ``AGENTBILL_NAMESPACE``
and ``AGENTBILL_API_KEY``. Agents get ``preflight``, ``record``, ``release``, ``get_budget``,
``get_task`` and ``usage``; the budget-changing tools (``set_budget``, ``set_rate_limit``,
``set_concurrency_limit``, ``open_task``) are listed only with ``--allow-admin``.

Needs the ``mcp`` extra: ``pip install 'agentbill-redis[mcp]'``.
"""

from __future__ import annotations

from agentbill._install import pip_install

try:
    import mcp.server.mcpserver  # noqa: F401 - only to name the extra when it is missing
except ImportError as exc:
    raise ImportError(
        f"agentbill.mcp_server needs the MCP SDK (mcp 2.x): {pip_install('mcp')}"
    ) from exc

from agentbill.mcp_server._server import (
    build_server,
    client_from_env,
    serve,
)
from agentbill.mcp_server._tools import ADMIN_TOOLS, AGENT_TOOLS

__all__ = ["ADMIN_TOOLS", "AGENT_TOOLS", "build_server", "client_from_env", "serve"]
