"""Every "install this" hint names this project's distribution, agentbill-redis.

On PyPI the name ``agentbill`` belongs to another project (an OpenTelemetry SDK): a hint that
says to pip-install ``agentbill`` (with or without an extra) installs the wrong package. The name
lives in one place, ``agentbill._install.DISTRIBUTION``, and it is pyproject.toml's; no file of
the project keeps the stale form.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from agentbill._install import DISTRIBUTION, pip_install

ROOT = Path(__file__).resolve().parent.parent
# The stale forms, written so that this file does not match itself: the bare import name with
# an extra ("agentbill" + "[cli]"), or after "pip install".
STALE = re.compile(
    r"(?<![\w-])agentbill" + r"\[" + r"|pip install ['\"]?agentbill(?![\w-])",
)
BARE = "agentbill"  # the examples below are built from it, for the same reason
SUFFIXES = {".py", ".md", ".toml", ".ts", ".mjs", ".json", ".txt", ".cfg", ".sh", ".yml"}


def tracked_files() -> list[Path]:
    """The project's files as git has them (what a clone gets), generated ones aside."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    files = [ROOT / name for name in out]
    return [
        f
        for f in files
        if f.is_file()
        and (f.suffix in SUFFIXES or f.name == "Makefile")
        and "vectors" not in f.parts
        and f.name != "package-lock.json"
    ]


def test_the_distribution_name_is_pyprojects_and_packagejsons() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["name"] == DISTRIBUTION
    package = json.loads((ROOT / "clients/typescript/package.json").read_text(encoding="utf-8"))
    assert package["name"] == DISTRIBUTION


def test_the_hint_installs_this_project() -> None:
    assert pip_install() == "pip install agentbill-redis"
    assert pip_install("cli") == "pip install 'agentbill-redis[cli]'"


def test_no_file_says_to_install_the_bare_name() -> None:
    files = tracked_files()
    assert ROOT / "agentbill" / "_install.py" in files  # the listing does see the package
    stale = [
        f"{f.relative_to(ROOT)}:{n}: {line.strip()}"
        for f in files
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1)
        if STALE.search(line)
    ]
    assert stale == []


@pytest.mark.parametrize(
    "line",
    [
        f"pip install '{BARE}[cli]'",
        f'pip install "{BARE}[rq]"',
        f"``{BARE}[local]``",
        f"pip install {BARE}",
        f"pip install {BARE} and go",
    ],
)
def test_the_stale_forms_are_recognised(line: str) -> None:
    assert STALE.search(line)


@pytest.mark.parametrize(
    "line",
    [
        "pip install 'agentbill-redis[cli]'",
        "pip install agentbill-redis",
        "pip uninstall agentbill agentbill-sdk agentbill-redis",
        "from agentbill import AgentBillClient",
    ],
)
def test_the_right_forms_are_not(line: str) -> None:
    assert not STALE.search(line)
