"""The ``python -m agentbill`` command line: one subcommand group per area.

    python -m agentbill local status   show this user's local server (exit 0 running, 3 not)
    python -m agentbill local stop     stop it (exit 0 whether or not one was running)
    python -m agentbill keys create NAMESPACE   create a tenant key; print it, once
    python -m agentbill keys list [--namespace NAMESPACE]
    python -m agentbill keys revoke KEY_ID       refuse the key at once

Each group registers its own commands in an ``_add_<group>`` function and each command is a
function ``(args) -> exit status``; adding a group is one more ``_add_<group>`` call in
:func:`build_parser`. Errors print one line to stderr and exit 1; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from agentbill._exceptions import AgentBillError
from agentbill._local import HOME_ENV, local_status, stop_local_server
from agentbill._tenants import ENV_ADMIN_URL, KeyAdmin

Command = Callable[[argparse.Namespace], int]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_NOT_RUNNING = 3  # what an init script's `status` answers for a stopped service


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; each subcommand stores its function as ``command``."""
    parser = argparse.ArgumentParser(
        prog="python -m agentbill",
        description="Pre-flight budget enforcement for AI agent runs.",
    )
    groups = parser.add_subparsers(title="command groups", metavar="GROUP", required=True)
    _add_local(groups)
    _add_keys(groups)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = build_parser().parse_args(argv)
    command: Command = args.command
    try:
        return command(args)
    except AgentBillError as exc:
        print(f"agentbill: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


# --- local ---------------------------------------------------------------------------------------


def _add_local(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    local = groups.add_parser(
        "local",
        help="the local server used when no Redis is configured",
        description=(
            "The local server agentbill starts when no Redis is configured. Its data lives in "
            f"${HOME_ENV} (default: the per-user data directory); set AGENTBILL_REDIS_URL to "
            "share budgets across machines instead."
        ),
    )
    commands = local.add_subparsers(title="commands", metavar="COMMAND", required=True)

    status = commands.add_parser(
        "status",
        help="show whether it runs, its pid, version and where its data lives",
        description="Show the local server without starting it.",
        epilog=f"exit status: {EXIT_OK} running, {EXIT_NOT_RUNNING} not running, "
        f"{EXIT_ERROR} error",
    )
    status.set_defaults(command=_local_status)

    stop = commands.add_parser(
        "stop",
        help="stop it (its data stays and is loaded by the next start)",
        description="Stop the local server; the next client to need it starts it again.",
        epilog=f"exit status: {EXIT_OK} stopped or not running, {EXIT_ERROR} error",
    )
    stop.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="seconds to wait for the server to exit (default: %(default)s)",
    )
    stop.set_defaults(command=_local_stop)


def _local_status(args: argparse.Namespace) -> int:
    s = local_status()
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
        ("binary", s.binary or "none found: pip install 'agentbill[local]'"),
        ("url", s.url),
        ("data", s.data_dir),
    ]
    for name, value in rows:
        if value is not None:
            print(f"{name + ':':<9}{value}")
    return EXIT_OK if s.running else EXIT_NOT_RUNNING


def _local_stop(args: argparse.Namespace) -> int:
    before = local_status()
    if stop_local_server(timeout=args.timeout):
        print(f"stopped the local server (pid {before.pid}); its data stays in {before.data_dir}")
    else:
        print(f"no local server running for {before.data_dir}")
    return EXIT_OK


# --- keys ----------------------------------------------------------------------------------------


def _add_keys(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = groups.add_parser(
        "keys",
        help="tenant keys: one Redis ACL user per key, confined to its namespace",
        description=(
            "Create, list and revoke tenant keys (agb_...). Each key is a Redis ACL user that "
            "may touch only its namespace's keys, with only the commands agentbill sends. Run "
            f"with a privileged connection: ${ENV_ADMIN_URL}, or --redis-url (a URL on the "
            "command line, password included, shows in ps and shell history)."
        ),
    )
    commands = keys.add_subparsers(title="commands", metavar="COMMAND", required=True)

    create = commands.add_parser(
        "create",
        help="create a key for a namespace and print it (it cannot be shown again)",
        description=(
            "Create a key for NAMESPACE. The key alone goes to stdout; what was done goes to "
            "stderr. Redis stores only the SHA-256 of its secret."
        ),
    )
    create.add_argument("namespace", metavar="NAMESPACE", help="the tenant's namespace")
    _admin_arguments(create, persist=True)
    create.set_defaults(command=_keys_create)

    listing = commands.add_parser(
        "list",
        help="list key ids and namespaces (never secrets)",
        description="List every agentbill key on the server: key id, namespace, ACL user.",
    )
    listing.add_argument("--namespace", help="only the keys of this namespace")
    _admin_arguments(listing, persist=False)
    listing.set_defaults(command=_keys_list)

    revoke = commands.add_parser(
        "revoke",
        help="delete a key: its connections are closed and it is refused at once",
        description=(
            "Delete the key's ACL user. Redis closes every connection authenticated with it. "
            "The key id is the part between the dots: agb_<namespace>.<key id>.<secret>."
        ),
        epilog=f"exit status: {EXIT_OK} revoked, {EXIT_ERROR} no such key or error",
    )
    revoke.add_argument("key_id", metavar="KEY_ID", help="the key's id (see `keys list`)")
    _admin_arguments(revoke, persist=True)
    revoke.set_defaults(command=_keys_revoke)


def _admin_arguments(parser: argparse.ArgumentParser, *, persist: bool) -> None:
    parser.add_argument(
        "--redis-url",
        help=f"the privileged connection (default: ${ENV_ADMIN_URL})",
    )
    if persist:
        parser.add_argument(
            "--config-rewrite",
            action="store_true",
            help="if the server has no aclfile, run CONFIG REWRITE so the change survives a "
            "restart (the server must run from a config file)",
        )


def _admin(args: argparse.Namespace) -> KeyAdmin:
    return KeyAdmin(args.redis_url, rewrite_config=getattr(args, "config_rewrite", False))


def _not_persisted() -> None:
    print(
        "agentbill: warning: the server has no aclfile, so this change lives in its memory "
        "only and is lost when Redis restarts: run CONFIG REWRITE (or pass --config-rewrite), "
        "or configure an aclfile",
        file=sys.stderr,
    )


def _keys_create(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        issued = admin.create_key(args.namespace)
    print(issued.api_key.get_secret_value())
    print(
        f"created key {issued.key_id} for namespace {issued.namespace!r} (ACL user "
        f"{issued.username}); store it now: it cannot be shown again",
        file=sys.stderr,
    )
    if issued.persisted is None:
        _not_persisted()
    return EXIT_OK


def _keys_list(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        found = admin.list_keys(args.namespace)
    if found:
        print(f"{'KEY ID':<18}NAMESPACE")
    for info in found:
        print(f"{info.key_id:<18}{info.namespace}")
    return EXIT_OK


def _keys_revoke(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        revoked = admin.revoke_key(args.key_id)
    print(f"revoked key {revoked.key_id} of namespace {revoked.namespace!r}")
    if revoked.persisted is None:
        _not_persisted()
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
