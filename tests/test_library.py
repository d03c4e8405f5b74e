"""lua/library.lua, the Functions library every client loads, is what the scripts make, and its
top level holds no state one call could leave to the next.

The library's top level (the prelude) runs once, at FUNCTION LOAD; every call then shares the
locals it made. A top-level local that any call changes would carry one call's state into the
next, so the only per-call state is what ``begin(KEYS, ARGV)`` assigns, at every call's start.
"""

from __future__ import annotations

import re

import pytest
import redis

from agentbill import _scripts
from agentbill._scripts import OPERATIONS, PRELUDE, build, installed, source

TOP_LOCAL = re.compile(r"^local (?!function )([A-Za-z_][\w, ]*?)\s*(?:=|$)", re.M)
BEGIN = re.compile(r"^local function begin\(KEYS, ARGV\)\n(.*?)^end\n", re.M | re.S)


def _code(text: str) -> str:
    """``text`` without its comments and string literals (their words are not code)."""
    text = re.sub(r"'(?:[^'\\\n]|\\.)*'", "''", text)
    return re.sub(r"--[^\n]*", "", text)


def _changed(name: str, code: str) -> bool:
    """Whether ``code`` assigns ``name`` or a field or index of it, or hands it to
    table.insert/remove/sort. (A write through an alias is not seen: keep tables constant.)"""
    assigned = re.search(rf"(?<![\w.])(?<!local ){name}\s*(\[[^\]]*\]|\.\w+)?\s*=(?!=)", code)
    return bool(assigned or re.search(rf"table\.(insert|remove|sort)\(\s*{name}\b", code))


def test_library_lua_is_built_from_the_scripts() -> None:
    assert installed().text == build().text, "lua/ changed: run `make library` and commit it"


def test_library_names_every_operation_once() -> None:
    library = installed()
    assert library.name.startswith("agentbill_")
    for op in OPERATIONS:
        assert library.text.count(f"function_name = '{library.function(op)}'") == 1
    with pytest.raises(KeyError):
        library.function("nope")


def test_a_changed_script_makes_another_library_name() -> None:
    def read(name: str) -> str:
        return source(name) + ("\n-- changed\n" if name == "settle" else "")

    assert build(read).name != installed().name


def test_per_call_state_is_only_what_begin_assigns() -> None:
    prelude = source(PRELUDE)
    begin = BEGIN.search(prelude)
    assert begin is not None, "lua/_common.lua lost `local function begin(KEYS, ARGV)`"
    per_call = {
        name.strip()
        for line in re.findall(r"^  ([A-Za-z_][\w, ]*?) = ", begin.group(1), re.M)
        for name in line.split(",")
    }
    outside = prelude[: begin.start()] + prelude[begin.end() :]
    # KEYS and ARGV are a function's arguments in a library: only begin() may read them.
    assert not re.search(r"\b(KEYS|ARGV)\b", _code(outside))
    code = "\n".join(_code(t) for t in [outside, *(source(op) for op in OPERATIONS)])
    top = {n.strip() for m in TOP_LOCAL.finditer(_code(prelude)) for n in m.group(1).split(",")}
    assert per_call <= top
    shared_and_changed = sorted(n for n in top - per_call if _changed(n, code))
    assert shared_and_changed == [], "a top-level local a call changes: make it begin()'s"


def test_the_checks_see_a_changed_top_level_table() -> None:
    """The check above can fail: a script that writes to a constant table is caught."""
    code = _code(source(PRELUDE)) + "\nSCOPE_FIELDS[1] = 'x'\n"
    assert _changed("SCOPE_FIELDS", code)
    assert not _changed("SCOPE_FIELDS", _code(source(PRELUDE)))


def test_the_library_loads_with_each_operations_flags(raw: redis.Redis) -> None:
    library = installed()
    assert raw.function_load(library.text, replace=True) == library.name
    try:
        (listed,) = raw.function_list(library=library.name)
        info = dict(zip(listed[::2], listed[1::2], strict=True))
        functions = {
            dict(zip(f[::2], f[1::2], strict=True))["name"]: dict(zip(f[::2], f[1::2], strict=True))
            for f in info["functions"]
        }
        assert set(functions) == {library.function(op) for op in OPERATIONS}
        for op in OPERATIONS:
            declared = set(_scripts.flags(source(op)))
            assert set(functions[library.function(op)]["flags"]) == declared
        assert _scripts.flags(source("events")) == ("no-writes",)
    finally:
        raw.function_delete(library.name)
