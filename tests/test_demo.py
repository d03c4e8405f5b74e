"""``make demo`` runs: worker processes on the embedded local server, no overspend, and it stops
the server it started."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentbill._local import local_status

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ab-demo-", dir="/tmp"))
    monkeypatch.setenv("AGENTBILL_HOME", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_demo_runs_without_overspend_and_stops_its_server(home: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "AGENTBILL_REDIS_URL"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no overspend" in done.stdout
    assert "refused: budget_exhausted" in done.stdout
    assert "refused: ceiling_exceeded" in done.stdout
    assert "AGENTBILL_REDIS_URL" in done.stderr  # the one line saying where the data lives
    assert not local_status().running
