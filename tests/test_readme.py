"""Every Python example in the README runs, and prints what its comments say it prints."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from tests._servers import RedisServer

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples() -> None:
    assert len(BLOCKS) >= 3


def test_every_python_block_runs_in_order(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTBILL_REDIS_URL", redis_server.url)
    monkeypatch.setenv("AGENTBILL_ADMIN_URL", redis_server.url)  # the tenant keys example
    with redis_server.client() as r:
        for key in r.scan_iter(match="agentbill:*"):
            r.delete(key)
    for i, block in enumerate(BLOCKS):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, f"README block {i}", "exec"), {})
        # The comment lines that end a block which prints show what it prints, in order
        # (a line ending in ", ...)" shows a prefix of one).
        lines = block.rstrip("\n").splitlines()
        shown: list[str] = []
        while "print(" in block and lines and lines[-1].startswith("# "):
            shown.insert(0, lines.pop()[2:].removesuffix(", ...)"))
        printed = out.getvalue().splitlines()
        assert len(printed) >= len(shown), f"block {i}: printed {printed!r}"
        for want, got in zip(shown, printed[-len(shown) :] if shown else [], strict=True):
            assert got.startswith(want), f"block {i}: {got!r} does not show {want!r}"
