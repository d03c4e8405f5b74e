"""Running the command line in tests: typer's runner in this process, or the real thing in a
subprocess, both against the suite's redis-server and a namespace of the test's own."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from typer.testing import CliRunner

from agentbill.cli._main import app

AGENTBILL = Path(sys.executable).parent / "agentbill"
"""The console script pip installed beside this interpreter."""


@dataclass(frozen=True)
class Ran:
    code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return self.stderr.splitlines()


def cli_env(url: str | None, namespace: str | None, home: Path | None = None) -> dict[str, str]:
    """The environment a command runs in: the suite's server, the test's namespace, never the
    user's embedded local server (AGENTBILL_HOME points at ``home`` or nowhere useful)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("AGENTBILL_") and k not in ("COLUMNS", "LINES")
    }
    env["AGENTBILL_HOME"] = str(home) if home is not None else "/nonexistent/agentbill-test"
    if url is not None:
        env["AGENTBILL_REDIS_URL"] = url
    if namespace is not None:
        env["AGENTBILL_NAMESPACE"] = namespace
    return env


def invoke(*args: str, env: Mapping[str, str] | None = None) -> Ran:
    """typer's runner: the same ``main`` as the console script, in this process."""
    unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith("AGENTBILL_")}
    result = CliRunner().invoke(
        app, list(args), env=unset | dict(env or {}), catch_exceptions=False
    )
    return Ran(result.exit_code, result.stdout, result.stderr)


def run(*args: str, env: Mapping[str, str], timeout: float = 60) -> Ran:
    """``python -m agentbill ARGS`` in a subprocess."""
    done = subprocess.run(
        [sys.executable, "-m", "agentbill", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=dict(env),
    )
    return Ran(done.returncode, done.stdout, done.stderr)
