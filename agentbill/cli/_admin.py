"""``agentbill local`` (the embedded server), ``agentbill keys`` (tenant keys) and
``agentbill mcp`` (the MCP server of ``agentbill.mcp_server``, imported only when run)."""

from __future__ import annotations

import importlib
import re
import sys
from typing import Annotated

import typer

from agentbill._exceptions import InvalidRequestError
from agentbill._install import pip_install
from agentbill._key_admin import ENV_ADMIN_URL, KeyAdmin
from agentbill._local import (
    HOME_ENV,
    ensure_local_server,
    local_status,
    stop_local_server,
)
from agentbill._tenants import KEY_ID_PATTERN
from agentbill.cli._common import (
    EXIT_BAD_INPUT,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    Failed,
    Json,
    bad_input,
    example,
    group,
    warning,
)
from agentbill.cli._output import emit_json

local = group(
    "local",
    "The local server agentbill starts when no Redis is configured. Its data lives in "
    f"${HOME_ENV} (default: the per-user data directory); set AGENTBILL_REDIS_URL to share "
    "budgets across machines instead.",
    "agentbill local status",
    'export AGENTBILL_REDIS_URL="$(agentbill local start)"',
)
keys = group(
    "keys",
    "Tenant keys: one Redis ACL user per key, confined to its namespace's keys and to "
    "calling agentbill's functions, which the operator loads (keys create does; keys "
    "load-library again after FUNCTION FLUSH). Run with a privileged connection: "
    f"${ENV_ADMIN_URL}, or --redis-url (a URL on the command line, password included, shows "
    "in ps and shell history).",
    "AGENTBILL_ADMIN_URL=redis://admin:secret@redis:6379/0 agentbill keys create acme",
    "agentbill keys list --json",
    "agentbill keys load-library",
)


# -- local ---------------------------------------------------------------------------------------


@local.command(
    "start",
    epilog=example(
        "agentbill local start", 'export AGENTBILL_REDIS_URL="$(agentbill local start)"'
    ),
)
def local_start(as_json: Json = False) -> None:
    """Start the local server unless it runs; print its URL."""
    url = ensure_local_server()
    if as_json:
        emit_json({"url": url})
    else:
        print(url)


@local.command(
    "status",
    epilog=example(
        "agentbill local status",
        "agentbill local status --json",
        exits=f"Exit status: {EXIT_OK} running, {EXIT_UNAVAILABLE} not running, "
        f"{EXIT_ERROR} error.",
    ),
)
def local_status_command(as_json: Json = False) -> None:
    """Show whether it runs, its pid, version and where its data lives (starts nothing)."""
    s = local_status()
    if as_json:
        emit_json(s)
    else:
        if s.running:
            state = "running"
        elif s.pid is not None:
            state = "not answering"
        else:
            state = "not running"
        rows = [
            ("state", state),
            ("pid", s.pid),
            ("version", s.version),
            ("binary", s.binary or f"none found: {pip_install('local')}"),
            ("url", s.url),
            ("data", s.data_dir),
        ]
        for name, value in rows:
            if value is not None:
                print(f"{name + ':':<9}{value}")
    if not s.running:
        raise typer.Exit(EXIT_UNAVAILABLE)


@local.command(
    "stop",
    epilog=example(
        "agentbill local stop",
        exits=f"Exit status: {EXIT_OK} stopped or not running, {EXIT_ERROR} error.",
    ),
)
def local_stop(
    timeout: Annotated[
        float, typer.Option(min=0, help="seconds to wait for the server to exit")
    ] = 10.0,
    as_json: Json = False,
) -> None:
    """Stop the local server (its data stays, and the next client to need it starts it)."""
    before = local_status()
    stopped = stop_local_server(timeout=timeout)
    if as_json:
        emit_json({"stopped": stopped, "pid": before.pid, "data_dir": before.data_dir})
    elif stopped:
        print(f"stopped the local server (pid {before.pid}); its data stays in {before.data_dir}")
    else:
        print(f"no local server running for {before.data_dir}")


@local.command("url", epilog=example("agentbill local url"))
def local_url(as_json: Json = False) -> None:
    """Print the URL of the local server, without starting it."""
    url = local_status().url
    if as_json:
        emit_json({"url": url})
    else:
        print(url)


# -- keys ----------------------------------------------------------------------------------------

AdminUrl = Annotated[
    str | None,
    typer.Option(
        "--redis-url",
        help=f"the privileged connection (default: ${ENV_ADMIN_URL})",
        show_default=False,
    ),
]
ConfigRewrite = Annotated[
    bool,
    typer.Option(
        "--config-rewrite",
        help="if the server has no aclfile, run CONFIG REWRITE so the change survives a "
        "restart (the server must run from a config file)",
    ),
]


def admin(redis_url: str | None, rewrite: bool = False) -> KeyAdmin:
    try:
        return KeyAdmin(redis_url, rewrite_config=rewrite)
    except InvalidRequestError as exc:
        # No admin connection configured: the environment is missing, not the input.
        raise Failed(exc.message) from None


def not_persisted() -> None:
    warning(
        "the server has no aclfile, so this change lives in its memory only and is lost when "
        "Redis restarts: run CONFIG REWRITE (or pass --config-rewrite), or configure an aclfile"
    )


@keys.command(
    "create",
    epilog=example(
        "AGENTBILL_ADMIN_URL=redis://admin:secret@redis:6379/0 agentbill keys create acme"
    ),
)
def keys_create(
    namespace: Annotated[str, typer.Argument(metavar="NAMESPACE", help="the tenant's namespace")],
    redis_url: AdminUrl = None,
    config_rewrite: ConfigRewrite = False,
    as_json: Json = False,
) -> None:
    """Create a key for NAMESPACE (and load agentbill's functions, as load-library does). The
    key alone goes to stdout (it cannot be shown again); what was done goes to stderr. Redis
    stores only the SHA-256 of its secret."""
    with admin(redis_url, config_rewrite) as a:
        issued = a.create_key(namespace)
    if as_json:
        emit_json(issued)
    else:
        print(issued.api_key.get_secret_value())
    print(
        f"created key {issued.key_id} for namespace {issued.namespace!r} (ACL user "
        f"{issued.username}); store it now: it cannot be shown again",
        file=sys.stderr,
    )
    if issued.persisted is None:
        not_persisted()


@keys.command("list", epilog=example("agentbill keys list --namespace acme"))
def keys_list(
    namespace: Annotated[
        str | None, typer.Option("--namespace", help="only the keys of this namespace")
    ] = None,
    redis_url: AdminUrl = None,
    as_json: Annotated[bool, typer.Option("--json", help="a JSON array of keys")] = False,
) -> None:
    """List every agentbill key on the server: key id, namespace (never a secret)."""
    with admin(redis_url) as a:
        found = a.list_keys(namespace)
    if as_json:
        emit_json(found)
        return
    if found:
        print(f"{'KEY ID':<18}NAMESPACE")
    for info in found:
        print(f"{info.key_id:<18}{info.namespace}")


@keys.command(
    "revoke",
    epilog=example(
        "agentbill keys revoke 3f9a0c1d2e4b5a69",
        exits=f"Exit status: {EXIT_OK} revoked, {EXIT_BAD_INPUT} not a key id, "
        f"{EXIT_UNAVAILABLE} not revoked on every node (those not reached are named: run it "
        f"again once they are back), {EXIT_ERROR} no such key or another error.",
    ),
)
def keys_revoke(
    key_id: Annotated[str, typer.Argument(metavar="KEY_ID", help="the key's id (keys list)")],
    redis_url: AdminUrl = None,
    config_rewrite: ConfigRewrite = False,
    as_json: Json = False,
) -> None:
    """Delete the key's ACL user: Redis closes every connection authenticated with it and
    refuses it at once. The key id is the part between the dots of agb_<namespace>.<id>.<secret>."""
    if re.fullmatch(KEY_ID_PATTERN, key_id) is None:
        bad_input("is not a key id (16 hexadecimal digits)", "KEY_ID")
    with admin(redis_url, config_rewrite) as a:
        try:
            revoked = a.revoke_key(key_id)
        except InvalidRequestError as exc:
            raise Failed(exc.message) from None  # a well-formed id that no key has
    if as_json:
        emit_json(revoked)
    else:
        print(f"revoked key {revoked.key_id} of namespace {revoked.namespace!r}")
    if revoked.persisted is None:
        not_persisted()


@keys.command(
    "load-library",
    epilog=example(
        "AGENTBILL_ADMIN_URL=redis://admin:secret@redis:6379/0 agentbill keys load-library",
        exits=f"Exit status: {EXIT_OK} loaded on every primary, {EXIT_UNAVAILABLE} some nodes "
        f"not reached (they are named: run it again once they are back), {EXIT_ERROR} another "
        "error.",
    ),
)
def keys_load_library(redis_url: AdminUrl = None, as_json: Json = False) -> None:
    """Load agentbill's Functions library on every primary (replicas copy it). Tenant keys
    may call its functions but not load it: run this after FUNCTION FLUSH, for a node added
    later, or after a restart that lost the data (their calls then raise
    LibraryNotLoadedError). Loading it again changes nothing."""
    with admin(redis_url) as a:
        loaded = a.load_library()
    if as_json:
        emit_json(loaded)
        return
    print(f"loaded {loaded.name} on {len(loaded.primaries)} primaries")
    if loaded.replicas:
        print(f"skipped {len(loaded.replicas)} replicas: they copy their primary's functions")


# -- mcp -----------------------------------------------------------------------------------------

HOST_PORT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(?P<port>\d{1,5})$")


def mcp(
    http: Annotated[
        str | None,
        typer.Option(
            metavar="HOST:PORT",
            help="serve streamable HTTP on this local address (default: stdio)",
        ),
    ] = None,
    allow_admin: Annotated[
        bool,
        typer.Option(
            "--allow-admin",
            help="also expose the budget-changing tools (set_budget, limits) to agents",
        ),
    ] = False,
) -> None:
    """Serve agentbill's tools to an MCP host (Claude Code, Cursor, ...) over stdio, or
    streamable HTTP with --http. Connection and tenant key come from AGENTBILL_REDIS_URL,
    AGENTBILL_NAMESPACE and AGENTBILL_API_KEY."""
    if http is not None:
        match = HOST_PORT.match(http)
        if match is None or not 0 < int(match["port"]) < 65536:
            bad_input(f"{http!r} is not HOST:PORT", "--http")
    try:
        server = importlib.import_module("agentbill.mcp_server")  # issue 15's, when installed
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.startswith("agentbill.mcp_server"):
            raise Failed(
                "agentbill mcp: this installation has no MCP server (agentbill.mcp_server)"
            ) from None
        raise Failed(f"agentbill mcp needs {exc.name}: {pip_install('mcp')}") from None
    server.serve(http=http, allow_admin=allow_admin)


MCP_EXAMPLE = example(
    "agentbill mcp                              # stdio, for a host's command/args config",
    "agentbill mcp --http 127.0.0.1:8765 --allow-admin",
)
