"""lua/contract.json, the wire contract every client reads, agrees with the scripts.

Each script's header comment (its first comment lines) states its contract in words: every
``KEYS[i]``, every ``ARGV[i]``, the numbered fields of a packed argument, the reply. The file
states the same by name, for machines. These tests read both and fail where they disagree, item
by item and in order, and check the parts of the code that fix a count (``packed({...}, N)``,
the highest ``A[i]`` / ``ARGV[i]`` / ``KEYS[i]`` used, ``scope_reply``'s list, ``ledger()``'s
stream fields, ``AGENTBILL <code>`` errors).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from agentbill._exceptions import InvalidRequestError
from agentbill._retry import translate
from agentbill._scripts import OPERATIONS

LUA = Path(__file__).resolve().parent.parent / "lua"
CONTRACT: dict[str, Any] = json.loads((LUA / "contract.json").read_text(encoding="utf-8"))
SCRIPTS: dict[str, Any] = CONTRACT["scripts"]
FIELD_TYPES = {"int", "int?", "str", "str?", "bool", "list", "packed"}
REPLY_TYPES = FIELD_TYPES | {"scope", "scope?", "pairs<str,scope>"}


def _norm(text: str) -> str:
    return " ".join(text.split())


@dataclass
class Header:
    """What a script's header comment says, item by item (texts whitespace-collapsed)."""

    keys: dict[str, str] = field(default_factory=dict)  # "1", "10", "1..9" -> text
    argv: dict[str, str] = field(default_factory=dict)  # "1", "6", "1..5" -> text
    packed: list[tuple[int, str]] = field(default_factory=list)
    reply: str = ""  # everything from "Reply:" to "Error(s)"
    errors: list[str] = field(default_factory=list)  # codes, "overflow units" with a field


_ITEM = re.compile(
    r"^(?P<indent>\s*)(?P<kind>KEYS|ARGV)\[(?P<index>\d+(?:\.\.\d+)?)\]\s+(?P<text>.*)$"
)
_FIELD = re.compile(r"^(?P<indent>\s+)(?P<index>\d+) (?P<text>.*)$")


def parse_header(path: Path) -> Header:
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("--"):
            break
        lines.append(line[2:])
    header = Header()
    current: tuple[dict[str, str] | list[tuple[int, str]], str | int, int] | None = None
    in_reply = in_errors = False
    for body in lines:
        if body.strip().startswith("Error") or in_errors:  # to the end of the header
            header.errors += re.findall(r"'AGENTBILL (\w+(?: \w+)?)'", body)
            current, in_reply, in_errors = None, False, True
            continue
        if in_reply:
            header.reply += " " + body
            continue
        if body.strip().startswith("Reply:"):
            in_reply = True
            header.reply = body.strip().removeprefix("Reply:")
            current = None
            continue
        item = _ITEM.match(body)
        numbered = _FIELD.match(body) if header.argv else None
        if item:
            items = header.keys if item["kind"] == "KEYS" else header.argv
            items[item["index"]] = item["text"]
            current = (items, item["index"], len(item["indent"]))
        elif numbered:
            header.packed.append((int(numbered["index"]), numbered["text"]))
            current = (header.packed, len(header.packed) - 1, len(numbered["indent"]))
        elif current is not None and body.strip() and len(body) - len(body.lstrip()) > current[2]:
            into, index, _ = current  # a continuation line, indented deeper than its item
            if isinstance(into, list):
                assert isinstance(index, int)
                number, text = into[index]
                into[index] = (number, f"{text} {body.strip()}")
            else:
                assert isinstance(index, str)
                into[index] += " " + body.strip()
        else:
            current = None
    header.keys = {k: _norm(v) for k, v in header.keys.items()}
    header.argv = {k: _norm(v) for k, v in header.argv.items()}
    header.packed = [(n, _norm(t)) for n, t in header.packed]
    header.reply = _norm(header.reply)
    return header


def top_level_items(text: str) -> list[str]:
    """The comma-separated items of the first balanced ``{...}`` in ``text``, nesting kept."""
    start = text.index("{")
    depth, items, item = 0, [], ""
    for ch in text[start:]:
        if ch == "{":
            depth += 1
            if depth == 1:
                continue
        elif ch == "}":
            depth -= 1
            if depth == 0:
                items.append(item.strip())
                return items
        if ch == "," and depth == 1:
            items.append(item.strip())
            item = ""
        else:
            item += ch
    raise AssertionError(f"unbalanced braces in {text!r}")


def reply_fields(op: str) -> list[dict[str, Any]]:
    reply = SCRIPTS[op]["reply"]
    if "same_as" in reply:
        return reply_fields(reply["same_as"])
    fields: list[dict[str, Any]] = reply.get("fields", [])
    return fields


def source(op: str) -> str:
    return (LUA / f"{op}.lua").read_text(encoding="utf-8")


# -- the file itself ---------------------------------------------------------------------------


def test_the_contract_covers_exactly_the_scripts_the_clients_load() -> None:
    assert set(SCRIPTS) == set(OPERATIONS)
    assert {p.stem for p in LUA.glob("*.lua")} == {*OPERATIONS, "_common", "library"}


def test_every_name_is_unique_and_every_type_known() -> None:
    for op, script in SCRIPTS.items():
        for part in ("keys", "args", "packed"):
            names = [f["name"] for f in script.get(part, [])]
            assert len(names) == len(set(names)), (op, part)
        for f in script["args"] + script.get("packed", []):
            assert f["type"] in FIELD_TYPES, (op, f)
        for f in reply_fields(op):
            assert f["type"] in REPLY_TYPES, (op, f)
        assert ("packed" in script) == any(f["type"] == "packed" for f in script["args"]), op
        assert set(script.get("errors", [])) <= set(CONTRACT["errors"]), op
    for struct in CONTRACT["structs"].values():
        names = [f["name"] for f in struct["fields"]]
        assert len(names) == len(set(names))


def test_python_translates_every_script_error_as_the_contract_says() -> None:
    for code, e in CONTRACT["errors"].items():
        # An error without a field of its own names it after the code ('AGENTBILL overflow units').
        error = translate(redis.ResponseError(f"AGENTBILL {code} units"))
        assert isinstance(error, InvalidRequestError)
        assert (error.field, error.message) == (e["field"] or "units", e["message"])


# -- the file against the header comments ------------------------------------------------------


def test_common_keys_and_args_match_the_prelude_header() -> None:
    header = parse_header(LUA / "_common.lua")
    keys = [(f["name"], f["doc"]) for f in CONTRACT["customer_keys"]]
    assert [(str(i), f"{name} {doc}") for i, (name, doc) in enumerate(keys, 1)] == list(
        header.keys.items()
    )
    args = [(str(i), f["doc"]) for i, f in enumerate(CONTRACT["common_args"], 1)]
    assert args == list(header.argv.items())


@pytest.mark.parametrize("op", sorted(SCRIPTS))
def test_keys_and_args_match_the_header(op: str) -> None:
    header = parse_header(LUA / f"{op}.lua")
    script = SCRIPTS[op]
    customer, common = len(CONTRACT["customer_keys"]), len(CONTRACT["common_args"])
    assert header.keys.pop(f"1..{customer}") == "the customer's keys (see _common.lua)"
    assert header.argv.pop(f"1..{common}") == (
        "reap limit, retentions, ledger cap (see _common.lua)"
    )
    expected_keys = [(str(i), f["doc"]) for i, f in enumerate(script["keys"], customer + 1)]
    assert list(header.keys.items()) == expected_keys
    expected_args = [(str(i), f["doc"]) for i, f in enumerate(script["args"], common + 1)]
    assert list(header.argv.items()) == expected_args


@pytest.mark.parametrize("op", sorted(op for op in SCRIPTS if "packed" in SCRIPTS[op]))
def test_packed_fields_match_the_header(op: str) -> None:
    header = parse_header(LUA / f"{op}.lua")
    expected = [(i, f["doc"]) for i, f in enumerate(SCRIPTS[op]["packed"], 1)]
    assert header.packed == expected


@pytest.mark.parametrize("op", sorted(SCRIPTS))
def test_reply_matches_the_header(op: str) -> None:
    header = parse_header(LUA / f"{op}.lua")
    reply = SCRIPTS[op]["reply"]
    if "doc" in reply:  # a reply with no fields of ours (events: XRANGE's own shape)
        assert header.reply == reply["doc"]
        return
    assert top_level_items(header.reply) == [f["doc"] for f in reply_fields(op)]
    assert header.reply.startswith("one string" if reply["type"] == "packed" else "{")


@pytest.mark.parametrize("op", sorted(SCRIPTS))
def test_errors_match_the_header_and_the_code(op: str) -> None:
    """Every error a script raises is in its header and in the file; an error that names a
    field after its code (overflow('units'), 'AGENTBILL overflow units') names a packed field
    of that script, so a client can say which of its arguments was at fault."""
    header = parse_header(LUA / f"{op}.lua")
    body = source(op)
    raised = re.findall(r"error_reply\('AGENTBILL (\w+)'\)", body)
    overflows = re.findall(r"\boverflow\('(\w+)'\)", body)
    raised += [f"overflow {name}" for name in overflows]
    listed = SCRIPTS[op].get("errors", [])
    assert [e.split()[0] for e in header.errors] == listed
    assert sorted(set(raised)) == sorted(set(header.errors))
    packed = {f["name"] for f in SCRIPTS[op].get("packed", [])}
    for error in set(header.errors):
        code, _, named = error.partition(" ")
        assert bool(named) == (CONTRACT["errors"][code]["field"] is None), error
        assert not named or named in packed, error


def test_the_overflow_error_is_raised_as_the_contract_says() -> None:
    prelude = source("_common")
    assert "redis.error_reply('AGENTBILL overflow ' .. field)" in prelude


# -- the file against the code -----------------------------------------------------------------


def _max_index(pattern: str, text: str) -> int:
    return max((int(i) for i in re.findall(pattern, text)), default=0)


@pytest.mark.parametrize("op", sorted(SCRIPTS))
def test_the_code_reads_no_key_or_argument_the_contract_lacks(op: str) -> None:
    script, body = SCRIPTS[op], source(op)
    customer, common = len(CONTRACT["customer_keys"]), len(CONTRACT["common_args"])
    assert _max_index(r"KEYS\[(\d+)\]", body) <= customer + len(script["keys"])
    assert _max_index(r"ARGV\[(\d+)\]", body) == common + len(script["args"]) or not script["args"]
    if "packed" in script:
        assert _max_index(r"\bA\[(\d+)\]", body) == len(script["packed"])


@pytest.mark.parametrize(
    "op", sorted(op for op in SCRIPTS if SCRIPTS[op]["reply"]["type"] == "packed")
)
def test_packed_replies_have_as_many_fields_as_the_contract(op: str) -> None:
    counts = {int(n) for n in re.findall(r"packed\(\{.*?\}, (\d+)\)", source(op), flags=re.S)}
    assert counts == {len(reply_fields(op))}


def test_prelude_keys_and_args_are_the_contract_names_in_order() -> None:
    """begin()'s K table and its ARGV settings use the file's names, in the file's order."""
    prelude = source("_common")
    table = re.search(r"  K = \{(.*?)\}", prelude, re.S)
    assert table is not None
    pairs = re.findall(r"(\w+) = KEYS\[(\d+)\]", table[1])
    assert [(name, str(i)) for i, name in enumerate(
        (k["name"] for k in CONTRACT["customer_keys"]), 1
    )] == pairs  # fmt: skip
    read = [
        int(i) for i in re.findall(r"^  \w+(?:, \w+)? = setting\(ARGV\[(\d+)\], ", prelude, re.M)
    ]
    assert read == list(range(1, len(CONTRACT["common_args"]) + 1))


def _scope_comment() -> list[str]:
    """The items the comment above scope_reply lists (after "as scripts reply it:")."""
    prelude = source("_common").split("local function scope_reply", 1)[0]
    comment = " ".join(
        line.removeprefix("--").strip()
        for line in prelude.splitlines()[-4:]
        if line.startswith("--")
    )
    listed = comment.split("reply it:", 1)[1].strip().removesuffix(".")
    return [item.strip() for item in listed.split(",")]


def test_scope_reply_sends_the_scope_struct() -> None:
    prelude = source("_common")
    body = re.search(r"local function scope_reply\(s\)\s+return \{(.*?)\}\nend", prelude, re.S)
    assert body is not None
    items = [item.strip() for item in body[1].split(",")]
    names = [f["name"] for f in CONTRACT["structs"]["scope"]["fields"]]
    assert len(items) == len(names)
    assert _scope_comment() == [f["doc"] for f in CONTRACT["structs"]["scope"]["fields"]]
    # Spot checks that the order is the contract's: the counters and the nullable ones.
    by_name = dict(zip(names, items, strict=True))
    assert by_name["limit"] == "s.limit or false"
    assert by_name["spent"] == "s.spent"
    assert by_name["reserved"] == "s.reserved"
    assert by_name["open"] == "s.open"
    assert by_name["rate_units"] == "s.rl_n or false"
    assert by_name["max_in_flight"] == "s.cc or false"
    assert by_name["period"] == "s.period"


def test_ledger_entries_carry_the_contract_fields_in_order() -> None:
    call = re.search(r"redis\.call\('XADD', K\.ledger, (.*?)\)\nend", source("_common"), re.S)
    assert call is not None
    keys = re.findall(r"'(\w+)', [a-z_]", call[1])
    assert keys == [f["key"] for f in CONTRACT["structs"]["ledger_entry"]["fields"]]


def test_refusal_reasons_and_settle_statuses_are_the_enums() -> None:
    reasons = set(re.findall(r"reason = '(\w+)'", source("_common")))  # refusal()
    assert reasons == set(CONTRACT["enums"]["reason"])
    header = parse_header(LUA / "settle.lua")
    statuses = re.findall(r"'(\w+)' [a-z]", header.reply.split("status:", 1)[1])
    assert statuses == CONTRACT["enums"]["settle_status"]


# -- the header parser itself ------------------------------------------------------------------


def test_the_parser_sees_a_changed_header(tmp_path: Path) -> None:
    """A header with a field inserted no longer matches: the comparison can fail."""
    text = source("preflight").replace(
        "--    2 estimated units", "--    2 a new field\n--    3 estimated units", 1
    )
    changed = tmp_path / "preflight.lua"
    changed.write_text(text, encoding="utf-8")
    packed = parse_header(changed).packed
    assert packed[1] == (2, "a new field")
    assert packed != [(i, f["doc"]) for i, f in enumerate(SCRIPTS["preflight"]["packed"], 1)]


# -- shared test vectors (tests/vectors/*.json; the TypeScript suite asserts the same files) ----

VECTORS = Path(__file__).resolve().parent / "vectors"


def _vectors(name: str) -> Any:
    return json.loads((VECTORS / name).read_text(encoding="utf-8"))


def _generator() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("vectors_generate", VECTORS / "generate.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "name", ["keys.json", "calls.json", "validation.json", "zones.json", "urls.json"]
)
def test_python_gives_exactly_the_committed_vectors(name: str) -> None:
    """Python's _keys, _core, _models, _zones and _topology produce the committed files byte
    for byte: a change of a key rule, a digest, a packed field, a validation rule or the reading
    of a Redis URL shows up here (then
    regenerate with tests/vectors/generate.py, review the diff, and the TypeScript suite
    tells whether it still agrees)."""
    assert _generator().render(name) == (VECTORS / name).read_text(encoding="utf-8")


def test_the_key_vectors_hold_for_python() -> None:
    from agentbill._keys import (
        KeySpace,
        customer_tag,
        digest,
        namespace_prefix,
        reservation_id,
        tag_of_reservation,
    )

    v = _vectors("keys.json")
    assert len(v["spaces"]) > 50
    for t in v["tags"]:
        assert customer_tag(t["customer_id"]) == t["tag"]
    for d in v["digests"]:
        assert digest(*d["parts"]) == d["digest"]
    for r in v["reservation_ids"]:
        assert reservation_id(r["tag"], r["token"]) == r["id"]
    for r in v["tag_of_reservation"]:
        assert tag_of_reservation(r["id"]) == r["tag"]
    for n in v["namespace_prefixes"]:
        assert namespace_prefix(n["namespace"]) == n["prefix"]
    for s in v["spaces"]:
        ck = KeySpace(s["namespace"]).customer(s["customer_id"])
        assert ck.prefix == s["prefix"]
        assert ck.fixed == tuple(s["fixed"][k["name"]] for k in CONTRACT["customer_keys"])
        for i in s["idempotency"]:
            assert ck.idempotency(i["operation"], i["key"]) == i["name"]
        for r in s["request"]:
            assert ck.request(r["token"]) == r["name"]
    # the hash tag really is one: every key of a customer maps to one cluster slot
    assert all("{" + s["tag"] + "}" in s["prefix"] for s in v["spaces"])


def _encode(value: str | int | bool | list[str] | None, kind: str) -> str:
    """A reference encoder of one contract field (see "encoding" in contract.json)."""
    enc = CONTRACT["encoding"]
    if value is None:
        assert kind.endswith("?") or kind == "list", kind
        return str(enc["null"])
    if kind == "bool":
        return str(enc["true"] if value else enc["false"])
    if kind == "list":
        assert isinstance(value, list)
        return str(enc["list_separator"]).join(value)
    return str(value)


def test_the_call_vectors_are_the_contract_fields_in_contract_order() -> None:
    """Each vector's named fields, put in the contract's order, are its exact KEYS and ARGV."""
    sep = CONTRACT["encoding"]["separator"]
    for case in _vectors("calls.json"):
        spec, named = SCRIPTS[case["script"]], case["named"]
        keys = [
            named["keys"][k["name"]]
            for k in CONTRACT["customer_keys"] + spec["keys"]
            if k["name"] in named["keys"]
        ]
        assert keys == case["keys"], case["name"]
        args = []
        for a in CONTRACT["common_args"] + spec["args"]:
            if a["type"] == "packed":
                args.append(sep.join(named["packed"][f["name"]] for f in spec["packed"]))
            else:
                args.append(named["args"][a["name"]])
        assert args == case["args"], case["name"]
        assert len(named["packed"] if "packed" in spec else ()) == len(spec.get("packed", ()))


def test_the_reference_encoder_follows_the_contract() -> None:
    assert _encode(None, "int?") == ""
    assert _encode(True, "bool") == "1"
    assert _encode(False, "bool") == "0"
    assert _encode(["80", "100"], "list") == "80,100"
    assert _encode([], "list") == ""
    assert _encode(12, "int") == "12"


@pytest.mark.parametrize("name", [c["name"] for c in _vectors("calls.json")])
def test_python_builds_each_call_vector(name: str) -> None:
    case = next(c for c in _vectors("calls.json") if c["name"] == name)
    call = _generator().plan(case, case["token"]).call
    assert call.script == case["script"]
    assert list(call.keys) == case["keys"]
    assert [str(a) for a in call.args] == case["args"]


def test_the_validation_vectors_hold_for_python() -> None:
    gen = _generator()
    v = _vectors("validation.json")
    assert [gen.id_valid(i["value"]) for i in v["ids"]] == [i["valid"] for i in v["ids"]]
    assert [gen.units_valid(u["value"]) for u in v["units"]] == [u["valid"] for u in v["units"]]
    assert [gen.since_valid(i["value"]) for i in v["since"]] == [i["valid"] for i in v["since"]]
    assert {True, False} == {i["valid"] for i in v["ids"]} == {u["valid"] for u in v["units"]}


# -- the Python client builds and reads by name (agentbill/_contract.py) -----------------------


def test_python_reads_the_contract_file_beside_its_scripts() -> None:
    from agentbill import _contract
    from agentbill._scripts import lua_dir

    assert json.loads((lua_dir() / "contract.json").read_text(encoding="utf-8")) == CONTRACT
    assert _contract.FILE == CONTRACT
    for op, script in _contract.SCRIPTS.items():
        assert script.packed == tuple(f["name"] for f in SCRIPTS[op].get("packed", []))


def test_core_numbers_no_field() -> None:
    """Field order lives in lua/contract.json alone: _core.py names every key, argument and
    reply field (no ``f[12]``, no ``reply[2]``, no hand-ordered KEYS or ARGV)."""
    text = (Path(__file__).resolve().parent.parent / "agentbill" / "_core.py").read_text("utf-8")
    assert re.findall(r"\[\s*-?\d+\s*\]", text) == []
    assert ".fixed" not in text  # the customer's keys come in the contract's order
    assert text.count("\\x1f") == 1  # fingerprint()'s joiner: a digest's input, not a field


def test_a_missing_or_unknown_name_is_an_error_not_a_shifted_field() -> None:
    from agentbill._contract import SCRIPTS as BY_NAME
    from agentbill._contract import common_args
    from agentbill._keys import KeySpace

    ck = KeySpace("ns").customer("c")
    get_task = BY_NAME["get_task"]
    assert get_task.keys(ck) == tuple(getattr(ck, k["name"]) for k in CONTRACT["customer_keys"])
    assert get_task.args(("c",), task_digest="d") == ("c", "d")
    with pytest.raises(TypeError):
        get_task.args(("c",))
    with pytest.raises(TypeError):
        get_task.args(("c",), task_digest="d", nope=1)
    with pytest.raises(TypeError):
        get_task.keys(ck, idem="x")
    with pytest.raises(TypeError):
        common_args(reap_limit=1)
    settle = BY_NAME["settle"]
    assert settle.keys(ck, idem="i")[-1] == "i"
    assert settle.keys(ck, idem="i", preflight_idem="p")[-2:] == ("i", "p")
    with pytest.raises(TypeError):
        settle.keys(ck)  # idem is not optional


def test_values_are_encoded_as_the_contract_says() -> None:
    from agentbill._contract import SCRIPTS as BY_NAME

    call = BY_NAME["set_budget"].args(
        (),
        agent_digest=None,
        limit=0,
        period="day",
        zone_table=None,
        thresholds=[50, 80],
        customer_id="c",
        agent_id=None,
    )
    assert call == ("", "0", "day", "", "50,80", "c", "")
    settle = BY_NAME["settle"]
    values: dict[str, object] = dict.fromkeys(settle.packed)
    values.update(units=5, idempotency_ttl_ms=9, request_id="q", charge=True, by_idempotency_key=0)
    values["rollback"] = False
    (packed,) = settle.args((), **values)
    read = settle.read_args([*range(len(CONTRACT["common_args"])), packed])
    assert read["units"] == "5"
    assert read["charge"] == "1"
    assert read["rollback"] == read["by_idempotency_key"] == "0"
    assert read["reservation_id"] == read["prefer"] == ""
    assert list(read) == list(settle.packed)


def test_a_reply_is_read_by_name_and_a_wrong_length_is_refused() -> None:
    from agentbill._contract import SCRIPTS as BY_NAME
    from agentbill._contract import ContractError

    fields = reply_fields("settle")
    values = {f["name"]: str(i) for i, f in enumerate(fields)}
    values["reservation_id"] = ""
    text = CONTRACT["encoding"]["separator"].join(values[f["name"]] for f in fields)
    reply = BY_NAME["settle"].unpack(text.encode())
    assert reply.status == values["status"]
    assert reply.agent_id == values["agent_id"]
    assert reply.reservation_id is None  # '' reads as None
    with pytest.raises(ContractError):
        BY_NAME["settle"].unpack(text + CONTRACT["encoding"]["separator"] + "extra")
    with pytest.raises(ContractError):
        BY_NAME["get_budget"].items([1, 2])
