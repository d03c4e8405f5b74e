"""The ``python -m agentbill`` command line: one subcommand group per area.

    python -m agentbill local status   show this user's local server (exit 0 running, 3 not)
    python -m agentbill local stop     stop it (exit 0 whether or not one was running)

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


if __name__ == "__main__":
    raise SystemExit(main())
