"""The server: the tools over one AsyncAgentBillClient, configured from the environment, served
over stdio or streamable HTTP."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any, cast

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.tools import Tool
from mcp.server.mcpserver.utilities.func_metadata import ArgModelBase, FuncMetadata
from mcp_types import ToolAnnotations
from pydantic import BaseModel, ConfigDict, ValidationError

from agentbill._async_client import AsyncAgentBillClient
from agentbill._exceptions import InvalidRequestError
from agentbill._version import __version__
from agentbill.mcp_server._tools import ADMIN_TOOLS, AGENT_TOOLS, Tools

ENV_API_KEY = "AGENTBILL_API_KEY"
ENV_NAMESPACE = "AGENTBILL_NAMESPACE"
ENV_REDIS_URL = "AGENTBILL_REDIS_URL"
# The tools have no authentication of their own: HTTP is served on loopback only, where the
# SDK also checks Host and Origin (DNS rebinding protection) by itself.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

INSTRUCTIONS = """\
Budgets for agent runs, shared with every other worker of the same customers. Before work \
that costs units (tokens, calls or whatever the operator counts), call preflight with an \
estimate. approved false means do not start: reason says which rule refused. When approved, \
do the work, then call record with the units actually used and the reservation_id, or release \
if the work is abandoned. When you retry a call, pass the same idempotency_key (derived from \
your task and step, e.g. "task-42:step-3"): a retried preflight then holds one reservation \
and a retried record charges once."""


def client_from_env() -> AsyncAgentBillClient:
    """The server's client: ``AGENTBILL_REDIS_URL`` (read by the client itself; unset: the
    embedded local server), ``AGENTBILL_NAMESPACE`` and ``AGENTBILL_API_KEY`` passed as
    ``AsyncAgentBillClient(api_key=..., namespace=...)`` takes them.

    Raises InvalidRequestError naming the environment variable that is wrong.
    """
    api_key = os.environ.get(ENV_API_KEY) or None
    namespace = os.environ.get(ENV_NAMESPACE) or None
    try:
        if namespace is None:  # the client's default, or the key's own namespace
            return AsyncAgentBillClient(api_key)
        return AsyncAgentBillClient(api_key, namespace=namespace)
    except InvalidRequestError as exc:
        names = {"api_key": ENV_API_KEY, "namespace": ENV_NAMESPACE, "redis_url": ENV_REDIS_URL}
        raise InvalidRequestError(names.get(exc.field, exc.field), exc.message) from None


class ExactArguments(FuncMetadata):
    """Arguments as the agent sent them. The SDK parses any string that looks like JSON for a
    parameter not annotated plain ``str``: ``customer_id: "null"`` would become None, the
    default customer, though a Python worker's customer "null" is another budget. Only a list
    parameter (``lists``) sent as a JSON string, as some hosts send them, is parsed here."""

    lists: frozenset[str] = frozenset()

    def pre_parse_json(self, data: dict[str, Any]) -> dict[str, Any]:
        parsed = dict(data)
        for name in self.lists & data.keys():
            if isinstance(data[name], str):
                with contextlib.suppress(ValueError):
                    parsed[name] = json.loads(data[name])
        return parsed


class StrictTool(Tool):
    """A tool whose arguments that break its input schema are refused in the library's words,
    on one line: ``invalid <field>: <rule> (nothing was written)``, as the client's own
    InvalidRequestError reads (see ``_tools.tool_errors``), rather than pydantic's multi-line
    report with a link and the value echoed."""

    async def run(
        self, arguments: dict[str, Any], context: Any, convert_result: bool = False
    ) -> Any:
        try:
            return await super().run(arguments, context, convert_result)
        except ToolError as exc:
            cause = exc.__cause__
            if type(exc) is not ToolError or not isinstance(cause, ValidationError):
                raise
            raise ToolError(f"Error executing tool {self.name}: {refusal(cause)}") from cause


def refusal(exc: ValidationError) -> str:
    """The schema's refusal of a call, as InvalidRequestError would say it."""
    broken = []
    for err in exc.errors(include_url=False, include_input=False, include_context=False):
        field = ".".join(str(part) for part in err["loc"]) or "arguments"
        broken.append(f"invalid {field}: {err['msg']}")
    return "; ".join(broken) + " (nothing was written)"


def strict_tool(fn: Callable[..., Awaitable[BaseModel]], annotations: ToolAnnotations) -> Tool:
    """``fn`` as a Tool that takes its arguments exactly: an unknown one is refused (the SDK
    would ignore it, and a misspelt ``customer_id`` would charge the default customer), and
    strings stay strings (see ExactArguments)."""
    tool = StrictTool.from_function(fn, annotations=annotations)
    meta = tool.fn_metadata
    strict = cast(
        type[ArgModelBase],
        type(
            meta.arg_model.__name__, (meta.arg_model,), {"model_config": ConfigDict(extra="forbid")}
        ),
    )
    tool.parameters = strict.model_json_schema(by_alias=True)  # additionalProperties: false
    tool.fn_metadata = ExactArguments(
        arg_model=strict,
        output_schema=meta.output_schema,
        output_model=meta.output_model,
        wrap_output=meta.wrap_output,
        lists=frozenset(
            name
            for name, schema in tool.parameters["properties"].items()
            if "array" in {schema.get("type"), *(s.get("type") for s in schema.get("anyOf", ()))}
        ),
    )
    return tool


def build_server(client: AsyncAgentBillClient, *, allow_admin: bool = False) -> MCPServer:
    """An MCPServer whose tools call ``client``: ``AGENT_TOOLS`` always, ``ADMIN_TOOLS`` (which
    change budgets and limits) only with ``allow_admin``."""
    tools = Tools(client)
    listed = {**AGENT_TOOLS, **(ADMIN_TOOLS if allow_admin else {})}
    return MCPServer(
        "agentbill",
        instructions=INSTRUCTIONS,
        version=__version__,
        log_level="WARNING",
        tools=[strict_tool(getattr(tools, name), hints) for name, hints in listed.items()],
    )


def parse_address(http: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as (host, port), on a loopback host only.

    Raises InvalidRequestError naming ``--http``.
    """
    host, sep, port = http.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidRequestError("--http", "must be HOST:PORT, e.g. 127.0.0.1:8765")
    if host not in LOOPBACK_HOSTS:
        raise InvalidRequestError(
            "--http",
            f"serves on a loopback host only ({', '.join(LOOPBACK_HOSTS)}): the tools have no "
            "authentication of their own",
        )
    return host, int(port)


def serve(*, http: str | None = None, allow_admin: bool = False) -> None:
    """Run the MCP server until its transport ends: over stdio (``http`` None) until the host
    closes stdin, or over streamable HTTP on ``http`` ("HOST:PORT", loopback only, path
    ``/mcp``) until interrupted. The budget-changing tools are listed only with
    ``allow_admin``.

    Raises InvalidRequestError (a bad ``http`` or AGENTBILL_* setting; ``field`` names it)
    before serving; StoreUnavailableError when the embedded local server cannot be started.
    """
    address = parse_address(http) if http is not None else None
    client = client_from_env()
    server = build_server(client, allow_admin=allow_admin)

    async def run() -> None:
        try:
            if address is None:
                await server.run_stdio_async()
            else:
                host, port = address
                await server.run_streamable_http_async(host=host, port=port)
        finally:
            await client.close()

    anyio.run(run)
