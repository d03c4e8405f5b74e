"""The MCP server, end to end: the MCP SDK's own client drives ``python -m agentbill.mcp_server``
processes over stdio (once over streamable HTTP) against the suite's redis-server, and what the
tools answer is checked against the Python client and the keys in Redis."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest
import redis
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp_types import CallToolResult, TextContent
from pydantic import BaseModel

from agentbill import AgentBillClient, KeyAdmin, _check, _results
from agentbill.mcp_server import ADMIN_TOOLS, AGENT_TOOLS
from agentbill.mcp_server._results import (
    BudgetResult,
    PreflightResult,
    RateLimitResult,
    SettlementResult,
    TaskResult,
    UsageResult,
)
from agentbill.mcp_server._server import parse_address
from agentbill.mcp_server._tools import Tools
from tests._servers import AclRedisServer, RedisServer, free_port
from tests.conftest import namespace_keys

T = TypeVar("T")
README = Path(__file__).resolve().parent.parent / "README.md"

# A hang fails the test instead of waiting for pytest's timeout; no call needs near this long.
CALL_TIMEOUT = 30.0
# The client's bound on a Redis that is down or silent is about 2 s (README, "Fail-closed");
# a tool call must come back with the error well within this.
OUTAGE_CALL_TIMEOUT = 10.0
MAX_UNITS = 2**53 - 1


def server_env(url: str, namespace: str | None = None, **extra: str) -> dict[str, str]:
    env = {"AGENTBILL_REDIS_URL": url, **extra}
    if namespace is not None:
        env["AGENTBILL_NAMESPACE"] = namespace
    return env


def stdio(env: dict[str, str], *args: str, module: str = "agentbill.mcp_server") -> Client:
    """An MCP client that starts ``python -m <module> <args>`` and talks to it over stdio, with
    the initialize handshake the hosts in use today speak."""
    params = StdioServerParameters(
        command=sys.executable, args=["-m", module, *args], env=env, cwd=Path.cwd()
    )
    return Client(params, mode="legacy", read_timeout_seconds=CALL_TIMEOUT)


def run(body: Callable[[], Awaitable[T]]) -> T:
    return anyio.run(body)


def text(result: CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, TextContent))


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    """The tool's structured result; fails the test on a tool error."""
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, text(result)
    assert result.structured_content is not None
    return dict(result.structured_content)


async def error(client: Client, tool: str, arguments: dict[str, Any], **kwargs: Any) -> str:
    """The tool error's text; fails the test when the call succeeds."""
    result = await client.call_tool(tool, arguments, **kwargs)
    assert result.is_error, f"{tool}({arguments}) succeeded: {result.structured_content}"
    return text(result)


def as_result(model: type[BaseModel], value: object) -> dict[str, Any]:
    """A library result as the tool would answer it (JSON types)."""
    return model.model_validate(value).model_dump(mode="json")


def unclocked(budget: dict[str, Any]) -> dict[str, Any]:
    """A budget without ``resets_in``, which counts down between two reads."""
    return {k: v for k, v in budget.items() if k != "resets_in"}


# -- the tools and their schemas -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["legacy", "auto"])
def test_lists_the_agent_tools_with_input_and_output_schemas(
    redis_server: RedisServer, namespace: str, mode: str
) -> None:
    async def body() -> None:
        params = StdioServerParameters(
            command=sys.executable,
            args=["-m", "agentbill.mcp_server"],
            env=server_env(redis_server.url, namespace),
        )
        async with Client(params, mode=mode, read_timeout_seconds=CALL_TIMEOUT) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
        assert set(tools) == set(AGENT_TOOLS)
        for tool in tools.values():
            assert tool.description, tool.name
            assert tool.input_schema["additionalProperties"] is False, tool.name
            assert tool.output_schema is not None, tool.name
        preflight = tools["preflight"]
        assert preflight.input_schema["required"] == ["agent_id", "estimated_units"]
        props = preflight.input_schema["properties"]
        assert set(props) == {
            "agent_id",
            "estimated_units",
            "customer_id",
            "task_ref",
            "task_ceiling",
            "idempotency_key",
            "ttl",
        }
        units = props["estimated_units"]
        assert (units["type"], units["minimum"], units["maximum"]) == ("integer", 0, MAX_UNITS)
        assert (props["agent_id"]["minLength"], props["agent_id"]["maxLength"]) == (1, 256)
        assert props["idempotency_key"]["description"]
        assert preflight.output_schema is not None
        assert set(preflight.output_schema["properties"]) == {
            "approved",
            "reason",
            "scope",
            "reservation_id",
            "expires_at",
            "remaining",
            "retry_after",
        }
        reason = preflight.output_schema["properties"]["reason"]["anyOf"][0]["enum"]
        assert "budget_exhausted" in reason
        record = tools["record"]
        assert record.input_schema["required"] == ["agent_id", "units"]
        assert "idempotency_key" in record.input_schema["properties"]
        assert record.output_schema is not None
        assert {"status", "charged", "spent", "remaining", "replayed"} <= set(
            record.output_schema["properties"]
        )
        assert set(tools["release"].input_schema["properties"]) == {
            "reservation_id",
            "idempotency_key",
            "customer_id",
        }
        assert tools["get_budget"].annotations is not None
        assert tools["get_budget"].annotations.read_only_hint is True

    run(body)


def test_result_models_keep_the_library_field_names() -> None:
    pairs: list[tuple[type[BaseModel], type[object]]] = [
        (PreflightResult, _check.BaseCheck),
        (SettlementResult, _results.Settlement),
        (BudgetResult, _results.BudgetStatus),
        (RateLimitResult, _results.RateLimit),
        (UsageResult, _results.Usage),
        (TaskResult, _results.TaskStatus),
    ]
    for model, result in pairs:
        library = {f.name for f in dataclasses.fields(result)}  # type: ignore[arg-type]
        assert set(model.model_fields) <= library, model.__name__
    # Every result field a tool can answer with, except what only Python callers use.
    assert set(SettlementResult.model_fields) == {
        f.name for f in dataclasses.fields(_results.Settlement)
    } - {"metadata", "crossed"}
    assert set(BudgetResult.model_fields) == {
        f.name for f in dataclasses.fields(_results.BudgetStatus)
    }
    assert set(TaskResult.model_fields) == {f.name for f in dataclasses.fields(_results.TaskStatus)}


def test_every_tool_is_a_client_method_with_the_same_parameter_names() -> None:
    import inspect

    from agentbill import AsyncAgentBillClient

    methods = {"usage": "get_usage"}
    for name in (*AGENT_TOOLS, *ADMIN_TOOLS):
        tool = inspect.signature(getattr(Tools, name)).parameters
        method = inspect.signature(getattr(AsyncAgentBillClient, methods.get(name, name)))
        assert set(tool) <= set(method.parameters), name


def test_admin_tools_are_listed_only_with_allow_admin(
    redis_server: RedisServer, namespace: str, client: AgentBillClient, raw: redis.Redis
) -> None:
    env = server_env(redis_server.url, namespace)

    async def body() -> None:
        async with stdio(env) as agent:
            names = {t.name for t in (await agent.list_tools()).tools}
            assert names == set(AGENT_TOOLS)
            assert "set_budget" in await error(agent, "set_budget", {"limit": 5})
        assert namespace_keys(raw, namespace, ledger=True) == {}

        async with stdio(env, "--allow-admin") as admin:
            tools = {t.name: t for t in (await admin.list_tools()).tools}
            assert set(tools) == set(AGENT_TOOLS) | set(ADMIN_TOOLS)
            for name in ADMIN_TOOLS:
                assert tools[name].input_schema["additionalProperties"] is False
            status = await call(
                admin, "set_budget", customer_id="acme", limit=500, period="day", thresholds=[80]
            )
            assert unclocked(status) == unclocked(
                as_result(BudgetResult, client.get_budget("acme"))
            )
            assert (status["limit"], status["period"], status["thresholds"]) == (500, "day", [80])
            limited = await call(
                admin, "set_rate_limit", customer_id="acme", units=60, per_seconds=60
            )
            assert limited["rate_limit"] == {"units": 60, "per_seconds": 60, "burst": 60}
            capped = await call(admin, "set_concurrency_limit", customer_id="acme", max_in_flight=3)
            assert capped["max_in_flight"] == 3
            task = await call(admin, "open_task", task_ref="t1", ceiling=40, customer_id="acme")
            assert task == as_result(TaskResult, client.get_task("t1", "acme"))
            before = namespace_keys(raw, namespace, ledger=True)
            message = await error(
                admin, "set_budget", {"customer_id": "acme", "limit": 1, "tz": "Mars/Base"}
            )
            assert "tz" in message
            assert namespace_keys(raw, namespace, ledger=True) == before
        assert client.get_budget("acme").limit == 500

    run(body)


# -- round trips, against the Python client --------------------------------------------------


def test_preflight_record_release_and_reads_agree_with_the_python_client(
    redis_server: RedisServer, namespace: str, client: AgentBillClient
) -> None:
    client.set_budget("acme", 100)

    async def body() -> None:
        async with stdio(server_env(redis_server.url, namespace)) as mcp:
            check = await call(
                mcp,
                "preflight",
                agent_id="writer",
                estimated_units=30,
                customer_id="acme",
                task_ref="report-1",
                task_ceiling=50,
            )
            assert check["approved"] is True
            assert (check["reason"], check["scope"], check["retry_after"]) == (None, None, None)
            assert check["remaining"] == 70
            assert check["expires_at"] is not None
            rid = check["reservation_id"]
            budget = client.get_budget("acme")
            assert (budget.reserved, budget.remaining, budget.open_reservations) == (30, 70, 1)
            assert await call(mcp, "get_budget", customer_id="acme") == as_result(
                BudgetResult, budget
            )
            assert await call(mcp, "get_task", task_ref="report-1", customer_id="acme") == (
                as_result(TaskResult, client.get_task("report-1", "acme"))
            )

            settled = await call(
                mcp,
                "record",
                agent_id="writer",
                units=25,
                customer_id="acme",
                reservation_id=rid,
                task_ref="report-1",
            )
            assert settled["status"] == "recorded"
            assert (settled["reservation_id"], settled["charged"], settled["released"]) == (
                rid,
                25,
                30,
            )
            assert (settled["late"], settled["replayed"]) == (False, False)
            budget = client.get_budget("acme")
            assert (settled["spent"], settled["reserved"]) == (budget.spent, budget.reserved)
            assert (settled["limit"], settled["remaining"]) == (budget.limit, budget.remaining)
            assert (budget.spent, budget.reserved, budget.remaining) == (25, 0, 75)
            assert client.get_task("report-1", "acme").used == 25

            # A reservation made by the Python client, released through the tool, by its id.
            held = client.preflight("reader", 10, "acme")
            released = await call(mcp, "release", reservation_id=held.reservation_id)
            assert (released["status"], released["charged"], released["released"]) == (
                "released",
                0,
                10,
            )
            assert client.get_budget("acme").reserved == 0

            # By the preflight's idempotency key: it needs the preflight's customer_id.
            keyed = await call(
                mcp,
                "preflight",
                agent_id="reader",
                estimated_units=5,
                customer_id="acme",
                idempotency_key="task-9:step-1",
            )
            assert keyed["approved"] is True
            await call(mcp, "release", idempotency_key="task-9:step-1")  # the default customer's
            assert client.get_budget("acme").reserved == 5
            by_key = await call(mcp, "release", idempotency_key="task-9:step-1", customer_id="acme")
            assert (by_key["status"], by_key["reservation_id"]) == (
                "released",
                keyed["reservation_id"],
            )
            assert client.get_budget("acme").reserved == 0

            usage = await call(mcp, "usage", customer_id="acme")
            assert usage == as_result(UsageResult, client.get_usage("acme"))
            assert {a["agent_id"]: a["spent"] for a in usage["agents"]} == {
                "writer": 25,
                "reader": 0,
            }

    run(body)


def test_a_refusal_is_a_result_not_a_tool_error(
    redis_server: RedisServer, namespace: str, client: AgentBillClient
) -> None:
    client.set_budget("acme", 10)
    client.set_rate_limit("beta", 5, 3600)

    async def body() -> None:
        async with stdio(server_env(redis_server.url, namespace)) as mcp:
            refused = await call(
                mcp, "preflight", agent_id="writer", estimated_units=11, customer_id="acme"
            )
            assert refused == {
                "approved": False,
                "reason": "budget_exhausted",
                "scope": "customer",
                "reservation_id": None,
                "expires_at": None,
                "remaining": 10,
                "retry_after": None,
            }
            assert await call(
                mcp, "preflight", agent_id="writer", estimated_units=5, customer_id="beta"
            )
            limited = await call(
                mcp, "preflight", agent_id="writer", estimated_units=5, customer_id="beta"
            )
            assert (limited["approved"], limited["reason"]) == (False, "rate_limited")
            assert limited["retry_after"] > 0

    run(body)
    budget = client.get_budget("acme")
    assert (budget.spent, budget.reserved) == (0, 0)
    assert client.get_budget("beta").reserved == 5


def test_ids_are_taken_exactly_as_sent(
    redis_server: RedisServer, namespace: str, client: AgentBillClient
) -> None:
    """The SDK would parse a string argument that looks like JSON: customer "null" would be
    the default customer and customer "[1]" refused, unlike in the Python client."""

    async def body() -> None:
        async with stdio(server_env(redis_server.url, namespace), "--allow-admin") as mcp:
            for customer in ("null", "[1]", '{"a": 1}', "12", "true"):
                check = await call(mcp, "preflight", agent_id="a", estimated_units=2,
                                   customer_id=customer, idempotency_key="null")  # fmt: skip
                assert check["approved"] is True
                assert client.get_budget(customer).reserved == 2, customer
            # A list sent as a JSON string, as some hosts send them, is still a list.
            status = await call(mcp, "set_budget", limit=10, thresholds="[50, 80]")
            assert status["thresholds"] == [50, 80]

    run(body)
    assert client.get_budget().reserved == 0


BAD_CALLS: list[tuple[str, dict[str, Any], str]] = [
    ("preflight", {"agent_id": "a", "estimated_units": -1}, "estimated_units"),
    ("preflight", {"agent_id": "a", "estimated_units": "5"}, "estimated_units"),
    ("preflight", {"agent_id": "a", "estimated_units": True}, "estimated_units"),
    ("preflight", {"agent_id": "a", "estimated_units": 1.5}, "estimated_units"),
    ("preflight", {"agent_id": "a", "estimated_units": MAX_UNITS + 1}, "estimated_units"),
    ("preflight", {"agent_id": "a", "estimated_units": None}, "estimated_units"),
    ("preflight", {"estimated_units": 1}, "agent_id"),
    ("preflight", {"agent_id": "", "estimated_units": 1}, "agent_id"),
    ("preflight", {"agent_id": "a\x00b", "estimated_units": 1}, "agent_id"),
    ("preflight", {"agent_id": "a" * 257, "estimated_units": 1}, "agent_id"),
    ("preflight", {"agent_id": "a", "estimated_units": 1, "customer_id": 7}, "customer_id"),
    ("preflight", {"agent_id": "a", "estimated_units": 1, "ttl": 0}, "ttl"),
    ("preflight", {"agent_id": "a", "estimated_units": 1, "custmer_id": "acme"}, "custmer_id"),
    ("record", {"agent_id": "a", "units": -3, "customer_id": "acme"}, "units"),
    ("record", {"agent_id": "a", "units": 3, "success": "yes"}, "success"),
    ("release", {}, "reservation_id"),
    ("release", {"reservation_id": "r", "idempotency_key": "k"}, "reservation_id"),
    ("get_task", {"customer_id": "acme"}, "task_ref"),
]


def test_bad_input_is_a_tool_error_naming_the_field_and_writes_nothing(
    redis_server: RedisServer, namespace: str, client: AgentBillClient, raw: redis.Redis
) -> None:
    client.set_budget("acme", 100)
    check = client.preflight("a", 10, "acme", idempotency_key="k1")
    before = namespace_keys(raw, namespace, ledger=True)

    async def body() -> None:
        async with stdio(server_env(redis_server.url, namespace)) as mcp:
            for tool, arguments, field in BAD_CALLS:
                message = await error(mcp, tool, arguments)
                assert field in message, (tool, arguments, message)
                # One line in the library's words, whether the schema or the client refused.
                assert message.startswith(f"Error executing tool {tool}: invalid "), message
                assert message.endswith(" (nothing was written)"), message
                assert "\n" not in message
                assert "pydantic" not in message
            # Refused by Redis, not by a schema: the same key with other arguments.
            message = await error(
                mcp,
                "preflight",
                {
                    "agent_id": "a",
                    "estimated_units": 11,
                    "customer_id": "acme",
                    "idempotency_key": "k1",
                },
            )
            assert "idempotency_key" in message

    run(body)
    assert namespace_keys(raw, namespace, ledger=True) == before
    assert client.get_budget("acme").reserved == check.estimated_units


# -- retries -----------------------------------------------------------------------------------


def test_a_retried_record_with_the_same_key_is_charged_once(
    redis_server: RedisServer, namespace: str, client: AgentBillClient
) -> None:
    client.set_budget("acme", 100)

    async def body() -> None:
        async with stdio(server_env(redis_server.url, namespace)) as mcp:
            # With the reservation's id: the agent retries after a lost answer.
            check = await call(
                mcp,
                "preflight",
                agent_id="writer",
                estimated_units=20,
                customer_id="acme",
                idempotency_key="task-1:step-1",
            )
            again = await call(
                mcp,
                "preflight",
                agent_id="writer",
                estimated_units=20,
                customer_id="acme",
                idempotency_key="task-1:step-1",
            )
            assert again["reservation_id"] == check["reservation_id"]
            assert client.get_budget("acme").reserved == 20
            record = {
                "agent_id": "writer",
                "units": 15,
                "customer_id": "acme",
                "reservation_id": check["reservation_id"],
                "idempotency_key": "task-1:step-1",
            }
            first = await call(mcp, "record", **record)
            retried = await call(mcp, "record", **record)
            assert (first["charged"], first["replayed"]) == (15, False)
            assert (retried["status"], retried["charged"], retried["replayed"]) == (
                "recorded",
                15,
                True,
            )
            # Without a reservation: a direct charge, retried with its key.
            direct = {"agent_id": "writer", "units": 7, "customer_id": "acme"}
            for _ in range(3):
                await call(mcp, "record", **direct, idempotency_key="task-1:step-2")

    run(body)
    budget = client.get_budget("acme")
    assert (budget.spent, budget.reserved) == (15 + 7, 0)
    assert [e.units for e in client.events("acme") if e.type == "recorded"] == [15, 7]


# -- concurrency -------------------------------------------------------------------------------


def test_two_server_processes_racing_on_one_budget_never_exceed_it(
    redis_server: RedisServer, namespace: str, client: AgentBillClient
) -> None:
    client.set_budget("race", 50)
    env = server_env(redis_server.url, namespace)
    asks = 40  # 40 x 3 units against 50: exactly 16 can be approved

    async def body() -> list[tuple[Client, dict[str, Any]]]:
        approved: list[tuple[Client, dict[str, Any]]] = []
        async with stdio(env) as one, stdio(env) as two:

            async def ask(server: Client, i: int) -> None:
                check = await call(
                    server, "preflight", agent_id=f"w{i}", estimated_units=3, customer_id="race"
                )
                if check["approved"]:
                    approved.append((server, {"agent_id": f"w{i}", **check}))

            async with anyio.create_task_group() as group:
                for i in range(asks):
                    group.start_soon(ask, one if i % 2 else two, i)
            budget = client.get_budget("race")
            assert budget.spent + budget.reserved <= 50
            assert (len(approved), budget.reserved) == (16, 48)

            async def settle(server: Client, check: dict[str, Any]) -> None:
                await call(
                    server,
                    "record",
                    agent_id=check["agent_id"],
                    units=3,
                    customer_id="race",
                    reservation_id=check["reservation_id"],
                )

            async with anyio.create_task_group() as group:
                for server, check in approved:
                    group.start_soon(settle, server, check)
        return approved

    run(body)
    budget = client.get_budget("race")
    assert (budget.spent, budget.reserved, budget.remaining) == (48, 0, 2)


# -- failures ----------------------------------------------------------------------------------


def test_redis_down_or_silent_is_a_tool_error_within_the_clients_bound(namespace: str) -> None:
    down = f"redis://127.0.0.1:{free_port()}/0"
    silent = RedisServer().start()
    silent.pause()  # accepts connections (the kernel's backlog) and never answers
    try:

        async def body(url: str) -> list[str]:
            messages = []
            async with stdio(server_env(url, namespace)) as mcp:
                for tool, arguments in [
                    ("preflight", {"agent_id": "a", "estimated_units": 1}),
                    ("record", {"agent_id": "a", "units": 1, "idempotency_key": "k"}),
                    ("record", {"agent_id": "a", "units": 1}),
                    ("get_budget", {}),
                ]:
                    messages.append(
                        await error(mcp, tool, arguments, read_timeout_seconds=OUTAGE_CALL_TIMEOUT)
                    )
            return messages

        for url in (down, silent.url):
            preflight, record, unkeyed, read = run(functools.partial(body, url))
            for message in (preflight, record, unkeyed, read):
                assert "Redis is unavailable" in message, message
            assert "do not start work" in preflight
            assert "retry it later with the same idempotency_key" in record
            # A record Redis may have applied, with nothing to recognise its retry by: a
            # retry would charge again (no reservation left to close: charged directly).
            assert "retry" not in unkeyed.replace("do not retry", "")
            assert "do not retry" in unkeyed
            assert "could charge twice" in unkeyed
            assert "idempotency_key" not in read
    finally:
        silent.stop()


def test_bad_settings_stop_the_server_before_it_serves(tmp_path: Path) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("AGENTBILL_")}
    base["AGENTBILL_HOME"] = str(tmp_path)  # never the user's embedded server
    cases: list[tuple[dict[str, str], list[str], str]] = [
        ({"AGENTBILL_API_KEY": "agb_acme.nothex.secret"}, [], "AGENTBILL_API_KEY"),
        ({"AGENTBILL_API_KEY": "agb_acme.0123456789abcdef." + "s" * 43}, [], "AGENTBILL_API_KEY"),
        ({"AGENTBILL_NAMESPACE": "bad\x01ns"}, [], "AGENTBILL_NAMESPACE"),
        ({"AGENTBILL_REDIS_URL": "redis://127.0.0.1:1/0"}, ["--http", "0.0.0.0:8765"], "--http"),
        ({"AGENTBILL_REDIS_URL": "redis://127.0.0.1:1/0"}, ["--http", "8765"], "--http"),
    ]

    def start(env: dict[str, str], args: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agentbill.mcp_server", *args],
            env={**base, **env},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )

    # All at once: each server's interpreter start-up overlaps the others'.
    with ThreadPoolExecutor(len(cases)) as pool:
        ran = list(pool.map(lambda case: start(case[0], case[1]), cases))
    for (env, args, field), done in zip(cases, ran, strict=True):
        assert done.returncode == 2, (env, args, done.stderr)
        assert done.stderr.startswith(f"agentbill mcp: {field}:"), done.stderr
        assert "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


def test_parse_address_takes_loopback_hosts_only() -> None:
    assert parse_address("127.0.0.1:8765") == ("127.0.0.1", 8765)
    assert parse_address("localhost:1") == ("localhost", 1)
    assert parse_address("[::1]:65535") == ("::1", 65535)
    for bad in ("0.0.0.0:8765", "10.0.0.1:80", "example.com:80", "127.0.0.1", ":80", "h:0"):
        with pytest.raises(ValueError, match="--http"):
            parse_address(bad)


# -- tenant keys -------------------------------------------------------------------------------


def readme_host_config() -> dict[str, Any]:
    """The host configuration block of the README's MCP section."""
    section = README.read_text().split("### Agent hosts (MCP)", 1)[1]
    block = re.search(r"```json\n(.*?)```", section, flags=re.S)
    assert block is not None
    config: dict[str, Any] = json.loads(block.group(1))["mcpServers"]["agentbill"]
    return config


def test_a_host_configured_as_the_readme_says_needs_only_a_tenant_key() -> None:
    config = readme_host_config()
    assert config["command"] == "python"
    assert set(config["env"]) == {"AGENTBILL_REDIS_URL", "AGENTBILL_API_KEY"}
    server = AclRedisServer(admin_password="admin-secret").start()
    try:
        with KeyAdmin(server.admin_url) as admin:
            issued = admin.create_key("acme-tenant")
        key = issued.api_key.get_secret_value()
        params = StdioServerParameters(
            command=sys.executable,
            args=config["args"],
            env={"AGENTBILL_REDIS_URL": server.url, "AGENTBILL_API_KEY": key},
        )

        async def body() -> None:
            async with Client(params, mode="legacy", read_timeout_seconds=CALL_TIMEOUT) as mcp:
                check = await call(mcp, "preflight", agent_id="a", estimated_units=4)
                assert check["approved"] is True
                settled = await call(
                    mcp, "record", agent_id="a", units=3, reservation_id=check["reservation_id"]
                )
                assert settled["spent"] == 3
                with KeyAdmin(server.admin_url) as admin:
                    admin.revoke_key(issued.key_id)
                message = await error(mcp, "get_budget", {})
                assert "AGENTBILL_API_KEY" in message
                assert key not in message

        run(body)
        with AgentBillClient(redis_url=server.admin_url, namespace="acme-tenant") as operator:
            assert (operator.get_budget().spent, operator.get_budget().reserved) == (3, 0)
    finally:
        server.stop()


def test_agentbill_stays_light_and_a_missing_extra_is_named() -> None:
    probe = (
        "import sys, agentbill; print(sorted(m for m in sys.modules if m.split('.')[0] == 'mcp'))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    missing = (
        "import sys; sys.modules['mcp'] = None\n"
        "try:\n"
        "    import agentbill.mcp_server\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", missing], capture_output=True, text=True, check=True
    )
    assert "pip install 'agentbill-redis[mcp]'" in out.stdout


# -- transports and entry points ---------------------------------------------------------------


@asynccontextmanager
async def http_server(env: dict[str, str]) -> AsyncIterator[str]:
    """``python -m agentbill.mcp_server --http 127.0.0.1:<free port>``; yields its URL once it
    accepts connections, and interrupts it afterwards."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentbill.mcp_server", "--http", f"127.0.0.1:{port}"],
        env={**os.environ, **env},
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "the HTTP server never listened"
            await anyio.sleep(0.05)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stderr:
                proc.stderr.close()


def test_streamable_http_serves_the_same_tools(
    redis_server: RedisServer, namespace: str, client: AgentBillClient
) -> None:
    client.set_budget("acme", 10)

    async def body() -> None:
        async with (
            http_server(server_env(redis_server.url, namespace)) as url,
            Client(url, read_timeout_seconds=CALL_TIMEOUT) as mcp,
        ):
            assert {t.name for t in (await mcp.list_tools()).tools} == set(AGENT_TOOLS)
            check = await call(
                mcp, "preflight", agent_id="a", estimated_units=6, customer_id="acme"
            )
            assert (check["approved"], check["remaining"]) == (True, 4)
            refused = await call(
                mcp, "preflight", agent_id="a", estimated_units=6, customer_id="acme"
            )
            assert refused["reason"] == "budget_exhausted"
            await call(mcp, "record", agent_id="a", units=6, customer_id="acme",
                       reservation_id=check["reservation_id"])  # fmt: skip

    run(body)
    assert client.get_budget("acme").spent == 6


def test_agentbill_mcp_command_serves_the_tools(redis_server: RedisServer, namespace: str) -> None:
    """``python -m agentbill mcp`` (the CLI's subcommand) starts the same server."""

    async def body() -> None:
        async with stdio(server_env(redis_server.url, namespace), "mcp", module="agentbill") as mcp:
            assert {t.name for t in (await mcp.list_tools()).tools} == set(AGENT_TOOLS)
            check = await call(mcp, "preflight", agent_id="a", estimated_units=1)
            assert check["approved"] is True

    run(body)
