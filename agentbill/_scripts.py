"""Loads ``lua/*.lua`` once and binds the scripts to a redis client.

Each operation's script is ``lua/_common.lua`` (the shared prelude) followed by the operation's
own file. Binding uses redis-py's ``register_script``: it runs EVALSHA and, when the server
answers NOSCRIPT (after a restart, a failover or SCRIPT FLUSH), loads the script and retries.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

OPERATIONS = (
    "preflight",
    "settle",
    "get_budget",
    "set_budget",
    "set_limits",
    "get_usage",
    "events",
    "open_task",
    "get_task",
    "extend",
    "estimates",
)
PRELUDE = "_common"


def lua_dir() -> Path:
    """Where the scripts are: inside the installed package, else the source checkout's lua/."""
    packaged = Path(str(resources.files("agentbill"))) / "lua"
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parent.parent / "lua"
    if checkout.is_dir():
        return checkout
    raise RuntimeError(f"agentbill's Lua scripts are missing (looked in {packaged}, {checkout})")


@cache
def source(operation: str) -> str:
    """The full text of one operation's script (prelude + operation)."""
    if operation not in OPERATIONS:
        raise KeyError(operation)
    folder = lua_dir()
    prelude = (folder / f"{PRELUDE}.lua").read_text(encoding="utf-8")
    body = (folder / f"{operation}.lua").read_text(encoding="utf-8")
    return f"{prelude}\n{body}"


def pipeline_args(script: Any, keys: tuple[str, ...], args: tuple[str | int, ...]) -> list[Any]:
    """EVALSHA's arguments for ``script`` in a pipeline. A redis-py Script queued in a pipeline
    sends SCRIPT EXISTS on every execute; a batch sends EVALSHA alone and, for any item answered
    NOSCRIPT, loads that script and sends the item again (see the clients' ``_send_batch``)."""
    return [script.sha, len(keys), *keys, *args]


def bind(client: Any) -> dict[str, Any]:
    """One redis-py Script (or AsyncScript) per operation, registered on ``client``."""
    return {op: client.register_script(source(op)) for op in OPERATIONS}
