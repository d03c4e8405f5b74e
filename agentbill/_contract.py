"""The scripts' wire contract (``lua/contract.json``), loaded once: calls built and replies read by
name.

The file beside the scripts (in the wheel: ``agentbill/lua/contract.json``) is the only place that
says in which order a script takes its KEYS, its ARGV and the fields of its packed argument, and
in which order its reply holds its fields. The TypeScript client reads the same file, and
``tests/test_contract.py`` checks it against the scripts' header comments. ``_core`` names every
key, argument and field; this module turns the names into positions, once, at import:

- a call's KEYS and ARGV are built by two small functions per script, written here from the
  file's names and compiled (as dataclasses and namedtuple write theirs). Their keyword-only
  parameters are the names, so a missing or unknown name is a TypeError, never a shifted field;
  their bodies are one tuple of f-strings in the file's order, as cheap as a tuple written by
  hand. ``Script.source`` shows them. For preflight.lua, shortened::

      def args(common, *, reservation_id, estimated_units, ceiling, ..., adoptable):
          return (*common, f"{reservation_id}\\x1f{estimated_units}\\x1f{'' if ceiling is None
                  else ceiling}\\x1f...\\x1f{'1' if adoptable else '0'}")

- a reply becomes a named tuple whose class was made from the file's names (``reply.approved``),
  a scope, ledger entry or threshold crossing likewise (:class:`Struct`).
"""

from __future__ import annotations

import json
import keyword
from collections import namedtuple
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from agentbill._scripts import OPERATIONS, lua_dir

FORMAT = 1
"""The version of the file's shape this module reads."""


def _load() -> dict[str, Any]:
    path = lua_dir() / "contract.json"
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if data.get("format") != FORMAT:
        raise RuntimeError(f"{path} has format {data.get('format')}; agentbill reads {FORMAT}")
    missing = set(OPERATIONS) - set(data["scripts"])
    if missing:
        raise RuntimeError(f"{path} lacks the scripts {sorted(missing)}")
    return data


FILE = _load()
_ENC = FILE["encoding"]
SEP: str = _ENC["separator"]
"""Joins the fields of a packed argument or reply (\\x1f: ids never hold control characters)."""
LIST_SEP: str = _ENC["list_separator"]
_NULL: str = _ENC["null"]
_TRUE: str = _ENC["true"]
_FALSE: str = _ENC["false"]


class ContractError(RuntimeError):
    """A call or a reply that does not fit the contract: a bug in agentbill, never bad input."""


class Packed(Protocol):
    """A packed reply's fields by contract name: the text, or None where the script sent ''."""

    def __getattr__(self, name: str) -> str | None: ...


class Items(Protocol):
    """An array reply's (or a struct's) items by contract name, as redis-py returned them."""

    def __getattr__(self, name: str) -> Any: ...


# -- building a call ---------------------------------------------------------------------------


def _value(name: str, kind: str) -> str:
    """The expression that encodes parameter ``name`` of type ``kind`` (the file's encoding)."""
    if kind in ("int?", "str?"):
        return f"{_NULL!r} if {name} is None else {name}"
    if kind == "bool":
        return f"{_TRUE!r} if {name} else {_FALSE!r}"
    if kind == "list":
        return f"{LIST_SEP!r}.join(map(str, {name}))"
    if kind in ("int", "str"):
        return name
    raise ContractError(f"lua/contract.json: field {name} has an unknown type {kind!r}")


def _fstring(values: Sequence[str]) -> str:
    """An f-string of ``values`` (expressions) joined by the separator."""
    sep = SEP.encode("unicode_escape").decode()
    return 'f"' + sep.join("{" + v + "}" for v in values) + '"'


def _params(names: Iterable[str]) -> list[str]:
    out = list(names)
    for name in out:
        if not name.isidentifier() or keyword.iskeyword(name) or name in ("ck", "common"):
            raise ContractError(f"lua/contract.json: {name!r} cannot be a parameter name")
    if len(set(out)) != len(out):
        raise ContractError(f"lua/contract.json: a name appears twice in {out}")
    return out


def _args_source(args: Sequence[Mapping[str, Any]], packed: Sequence[Mapping[str, Any]]) -> str:
    """``def args(common, *, <names>)``: ARGV, ``common`` first (None: the common ones)."""
    params: list[str] = []
    exprs: list[str] = []
    for arg in args:
        if arg["type"] == "packed":
            params += (f["name"] for f in packed)
            exprs.append(_fstring([_value(f["name"], f["type"]) for f in packed]))
        else:
            params.append(arg["name"])
            exprs.append(_fstring([_value(arg["name"], arg["type"])]))
    keywords = ", *, " + ", ".join(_params(params)) if params else ""
    return f"def args(common{keywords}):\n    return (*common, {', '.join(exprs)})\n"


def _keys_source(own: Sequence[Mapping[str, Any]]) -> str:
    """``def keys(ck, *, <own keys>)``: KEYS, the customer's first; an optional key defaults to
    None, and is then not sent (nor any after it)."""
    customer = [f"ck.{k['name']}" for k in FILE["customer_keys"]]
    names = _params(k["name"] for k in own)
    params = [f"{k['name']}=None" if k.get("optional") else k["name"] for k in own]
    lines = [f"def keys(ck{', *, ' + ', '.join(params) if params else ''}):"]
    for i, k in enumerate(own):
        if k.get("optional"):
            lines.append(f"    if {k['name']} is None:")
            lines.append(f"        return ({', '.join([*customer, *names[:i]])},)")
    lines.append(f"    return ({', '.join([*customer, *names])},)")
    return "\n".join(lines) + "\n"


def _compile(source: str, name: str, where: str) -> Callable[..., tuple[str, ...]]:
    namespace: dict[str, Any] = {}
    exec(compile(source, f"<lua/contract.json {where}>", "exec"), namespace)
    fn: Callable[..., tuple[str, ...]] = namespace[name]
    return fn


_common_args = _compile(_args_source(FILE["common_args"], ()), "args", "common_args")


def common_args(**values: object) -> tuple[str, ...]:
    """The first ARGV of every script (``common_args`` of the file), by name."""
    return _common_args((), **values)


# -- reading a reply ---------------------------------------------------------------------------


def _record_type(name: str, fields: Sequence[Mapping[str, Any]]) -> Any:
    """A named tuple class whose fields are the contract's, in its order."""
    return namedtuple(name, _params(f["name"] for f in fields))


def _mismatch(what: str, got: int) -> ContractError:
    return ContractError(
        f"{what}: {got} items, not the number lua/contract.json names (the scripts on Redis "
        "and this client's contract file from different versions?)"
    )


class Struct:
    """A struct of the file (``structs``): a scope, a ledger entry, a threshold crossing."""

    __slots__ = ("_count", "_keys", "_type", "name", "separator")

    def __init__(self, name: str, spec: Mapping[str, Any]) -> None:
        self.name = name
        self._type = _record_type(name, spec["fields"])
        self._count = len(spec["fields"])
        self._keys = tuple(f.get("key", f["name"]) for f in spec["fields"])
        self.separator: str | None = spec.get("separator")

    def items(self, raw: Sequence[Any]) -> Items:
        """An array (a scope_reply) as its items by name."""
        if len(raw) != self._count:
            raise _mismatch(self.name, len(raw))
        return tuple.__new__(self._type, raw)  # type: ignore[no-any-return]

    def split(self, text: str) -> Items:
        """One item of a list of these structs (``customer:80:9``) as its fields by name."""
        if self.separator is None:
            raise ContractError(f"{self.name} is not written as one string")
        return self.items(text.split(self.separator))

    def by_key(self, flat: Sequence[Any], decode: Callable[[Any], str]) -> Items:
        """A stream entry's flat ``[key, value, ...]`` as its fields by name ('' if absent)."""
        found = {decode(flat[i]): decode(flat[i + 1]) for i in range(0, len(flat), 2)}
        return tuple.__new__(self._type, (found.get(k, "") for k in self._keys))  # type: ignore[no-any-return]


STRUCTS = {name: Struct(name, spec) for name, spec in FILE["structs"].items()}


# -- one script --------------------------------------------------------------------------------


class Script:
    """One script's contract: how to build its KEYS and ARGV, and read its reply, by name.

    ``keys(ck, **own)``: the customer's keys (:class:`~agentbill._keys.CustomerKeys`), then the
    script's own keys by name. ``args(common, **values)``: ``common`` (see
    :func:`common_args`), then the script's arguments by name, a packed argument from its
    fields' names. Both take exactly the file's names (a TypeError otherwise).
    """

    __slots__ = ("_count", "_type", "args", "keys", "name", "packed", "reply_type", "source")

    def __init__(self, name: str, spec: Mapping[str, Any]) -> None:
        self.name = name
        self.packed: tuple[str, ...] = tuple(f["name"] for f in spec.get("packed", ()))
        keys = _keys_source(spec["keys"])
        args = _args_source(spec["args"], spec.get("packed", ()))
        self.source = keys + "\n\n" + args
        self.keys = _compile(keys, "keys", f"{name} keys")
        self.args = _compile(args, "args", f"{name} args")
        reply = spec["reply"]
        if "same_as" in reply:
            reply = FILE["scripts"][reply["same_as"]]["reply"]
        self.reply_type: str = reply["type"]
        fields = reply.get("fields", ())
        self._type: Any = _record_type(f"{name}_reply", fields) if fields else tuple
        self._count = len(fields)

    def unpack(self, reply: Any) -> Packed:
        """A packed reply (one string, see packed() in lua/_common.lua) by field name; '' is
        None."""
        text = reply.decode() if isinstance(reply, bytes) else str(reply)
        fields = [field or None for field in text.split(SEP)]
        if len(fields) != self._count or self.reply_type != "packed":
            raise _mismatch(f"{self.name}'s packed reply", len(fields))
        return tuple.__new__(self._type, fields)  # type: ignore[no-any-return]

    def items(self, reply: Sequence[Any]) -> Items:
        """An array reply by item name, as redis-py returned them."""
        if len(reply) != self._count or self.reply_type != "array":
            raise _mismatch(f"{self.name}'s reply", len(reply))
        return tuple.__new__(self._type, reply)  # type: ignore[no-any-return]

    def read_args(self, args: Sequence[Any]) -> dict[str, str]:
        """A call's ARGV after the common ones by name, a packed argument's fields included:
        how a test or a debugger reads what a call sends."""
        spec = FILE["scripts"][self.name]
        sent = [a.decode() if isinstance(a, bytes) else str(a) for a in args]
        sent = sent[len(FILE["common_args"]) :]
        out: dict[str, str] = {}
        for arg, value in zip(spec["args"], sent, strict=True):
            if arg["type"] == "packed":
                out.update(zip(self.packed, value.split(SEP), strict=True))
            else:
                out[arg["name"]] = value
        return out


SCRIPTS = {name: Script(name, FILE["scripts"][name]) for name in OPERATIONS}
