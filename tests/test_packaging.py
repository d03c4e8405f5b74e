"""The wheel ships every Lua script, the Functions library the clients load (lua/library.lua)
and the wire contract beside them (lua/contract.json), and the installed package loads them
from inside itself."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import agentbill
from agentbill._scripts import LIBRARY_FILE, OPERATIONS, PRELUDE, installed

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    (built,) = out.glob("agentbill_redis-*.whl")  # the distribution name (pyproject.toml)
    return built


def test_wheel_contains_every_script_and_the_type_marker(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    scripts = {p.name for p in (ROOT / "lua").glob("*.lua")}
    assert {f"{op}.lua" for op in (*OPERATIONS, PRELUDE)} | {LIBRARY_FILE} <= scripts
    for script in scripts:
        assert f"agentbill/lua/{script}" in names
    assert "agentbill/lua/contract.json" in names
    assert "agentbill/py.typed" in names


def test_installed_wheel_loads_scripts_from_the_package(wheel: Path, tmp_path: Path) -> None:
    zipfile.ZipFile(wheel).extractall(tmp_path)
    probe = (
        "import agentbill._scripts as s; print(s.lua_dir());"
        "print(all(s.source(op) for op in s.OPERATIONS));"
        "print(s.installed().text == (s.lua_dir() / 'library.lua').read_text());"
        "print(s.installed().name);"
        "import json, agentbill._contract as c;"
        "print(c.FILE == json.loads((s.lua_dir() / 'contract.json').read_text()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path)},
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert out == [str(tmp_path / "agentbill" / "lua"), "True", "True", installed().name, "True"]


def test_public_surface_is_sorted_and_importable() -> None:
    assert agentbill.__all__ == sorted(agentbill.__all__)
    for name in agentbill.__all__:
        assert hasattr(agentbill, name), name


def test_importing_agentbill_starts_nothing_and_imports_no_local_server_code() -> None:
    probe = "import sys, agentbill; print('agentbill._local' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
