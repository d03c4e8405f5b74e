"""Write the shared test vectors (tests/vectors/*.json) from the Python implementation.

Both suites assert against these files: tests/test_contract.py (Python's ``_keys``, ``_core``,
``_models``, ``_zones`` must give them) and clients/typescript/test/vectors.test.ts (the
TypeScript client must give the same). Regenerate after an intended change of a key rule, a
digest, a script's packed fields or validation, and review the diff:

    .venv/bin/python tests/vectors/generate.py
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any
from unittest import mock

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))

from agentbill import _core  # noqa: E402
from agentbill._check import BaseCheck  # noqa: E402
from agentbill._exceptions import InvalidRequestError  # noqa: E402
from agentbill._keys import (  # noqa: E402
    KeySpace,
    customer_tag,
    digest,
    namespace_prefix,
    reservation_id,
    tag_of_reservation,
)
from agentbill._models import EventsRequest, PreflightRequest, validate, validate_units  # noqa: E402
from agentbill._own import OwnReservations  # noqa: E402
from agentbill._zones import zone_table  # noqa: E402

CONTRACT = json.loads((ROOT / "lua" / "contract.json").read_text(encoding="utf-8"))
SEP = CONTRACT["encoding"]["separator"]

CUSTOMERS = [
    "default",
    "user_123",
    "ü日本語🚀",
    "{}",
    "{user_1}",
    "a:b:c",
    "}{:",
    "with space",
    "!*'()~-._",
    "%41%",
    "x" * 256,
    "🚀" * 256,
]
NAMESPACES = ["agentbill", "t-0123abcd", "acme corp/ü:{x}", "ns*?[]", "a.b~c_d-e", "%"]
IDEMPOTENCY_KEYS = ["job-1", "job:7 {x}/ü", "🚀" * 3, "a+b=c&d", "~._-"]
DIGEST_PARTS = [
    ["my_agent"],
    ["my_agent", ""],
    ["my_agent", "report-42"],
    ["ü", "{}"],
    [""],
    ["a", "b", "c"],
    ["ab", "c"],
    ["x" * 256, "🚀" * 256],
]
TOKENS = ["000102030405060708090a0b", "ffffffffffffffffffffffff"]
FINGERPRINTS: list[list[Any]] = [
    ["preflight", "my_agent", 10, None, None, None],
    ["preflight", "ü", 0, "report-42", 100, 30],
    ["record", None, "my_agent", 10, None, True],
    ["record", "rsv.0123456789abcdef01234567.000102030405060708090a0b", "a", 0, "t", False],
]
TAGGED = [
    "rsv.0123456789abcdef01234567.000102030405060708090a0b",
    "rsv.0123456789abcdef01234567.x",
    "rsv.0123456789ABCDEF01234567.x",
    "rsv.0123456789abcdef0123456.x",
    "rsv.0123456789abcdef01234567",
    "rsv.0123456789abcdef01234567.a.b",
    "res.0123456789abcdef01234567.x",
    "my-own-id",
    "",
]

# Each case: the client's settings, one operation's arguments (as the Python methods name them),
# and the request id the client would draw. "extra": what the client adds on its own: a
# preflight a record without an id must not close (``adoptable``: a lease's slice), the
# reservation of this client's own that such a record closes first (``prefer``), a release
# undoing an approval of a failed batch (``rollback``).
CALLS: list[dict[str, Any]] = [
    {
        "name": "preflight, the sheet's snippet",
        "client": {"ceiling": 50},
        "op": "preflight",
        "request": {"agent_id": "my_agent", "estimated_units": 10},
    },
    {
        "name": "preflight with every option",
        "client": {"namespace": "acme corp/ü", "reservation_ttl": 120, "idempotency_ttl": 600},
        "op": "preflight",
        "request": {
            "agent_id": "agent:{1}",
            "estimated_units": 9007199254740991,
            "customer_id": "{}:ü",
            "task_ref": "report/42 ü",
            "task_ceiling": 100,
            "idempotency_key": "job:7 {x}",
            "ttl": 30,
        },
    },
    {
        "name": "preflight not adoptable (a lease's slice), with retentions set",
        "client": {"task_retention": 3600, "idle_retention": 7 * 86400},
        "op": "preflight",
        "request": {"agent_id": "my_agent", "estimated_units": 1000, "task_ref": "t-1"},
        "extra": {"adoptable": False},
    },
    {
        "name": "record without a reservation id",
        "client": {},
        "op": "record",
        "request": {"agent_id": "my_agent", "units": 10},
    },
    {
        "name": "record without an id, this client's own reservation first",
        "client": {"idle_retention": 30 * 86400},
        "op": "record",
        "request": {"agent_id": "my_agent", "units": 7, "customer_id": "u", "task_ref": "t"},
        "extra": {"prefer": "rsv." + customer_tag("u") + ".0123456789abcdef01234567"},
    },
    {
        "name": "record by id, failed, with a key",
        "client": {"outcome_retention": 7200, "idempotency_ttl": 3600},
        "op": "record",
        "request": {
            "agent_id": "my_agent",
            "units": 0,
            "customer_id": "user_123",
            "reservation_id": "rsv." + customer_tag("user_123") + ".0123456789abcdef01234567",
            "task_ref": "t-1",
            "success": False,
            "idempotency_key": "job-9",
        },
    },
    {
        "name": "record by id, no customer given",
        "client": {},
        "op": "record",
        "request": {
            "agent_id": "a",
            "units": 3,
            "reservation_id": "rsv." + customer_tag("ü日本語🚀") + ".0123456789abcdef01234567",
        },
    },
    {
        "name": "release by id",
        "client": {},
        "op": "release",
        "request": {
            "reservation_id": "rsv." + customer_tag("default") + ".0123456789abcdef01234567"
        },
    },
    {
        "name": "release rolling back a failed batch's approval",
        "client": {},
        "op": "release",
        "request": {
            "reservation_id": "rsv." + customer_tag("user_123") + ".0123456789abcdef01234567"
        },
        "extra": {"rollback": True},
    },
    {
        "name": "release by a preflight's idempotency key",
        "client": {"namespace": "ns"},
        "op": "release",
        "request": {"idempotency_key": "job:7 {x}", "customer_id": "{}:ü"},
    },
    {
        "name": "set_budget of an agent, lifetime",
        "client": {},
        "op": "set_budget",
        "request": {
            "customer_id": "acme",
            "limit": 200,
            "agent_id": "researcher",
            "thresholds": [100, 80, 80],
        },
    },
    {
        "name": "set_budget unlimited, monthly UTC",
        "client": {},
        "op": "set_budget",
        "request": {"customer_id": None, "limit": None, "period": "month"},
    },
    {
        "name": "set_rate_limit",
        "client": {},
        "op": "set_rate_limit",
        "request": {"customer_id": "acme", "units": 600, "per_seconds": 60, "burst": 300},
    },
    {
        "name": "set_rate_limit removed, of an agent",
        "client": {},
        "op": "set_rate_limit",
        "request": {"customer_id": "acme", "units": None, "per_seconds": None, "agent_id": "r"},
    },
    {
        "name": "set_concurrency_limit",
        "client": {},
        "op": "set_concurrency_limit",
        "request": {"customer_id": "acme", "max_in_flight": 8},
    },
    {
        "name": "get_budget of an agent",
        "client": {},
        "op": "get_budget",
        "request": {"customer_id": "acme", "agent_id": "researcher"},
    },
    {"name": "get_usage", "client": {}, "op": "get_usage", "request": {"customer_id": "acme"}},
    {
        "name": "get_usage of at most 5 agents",
        "client": {},
        "op": "get_usage",
        "request": {"customer_id": "acme", "limit": 5},
    },
    {
        "name": "events since an id",
        "client": {"ledger_max_len": 5000, "reap_limit": 7},
        "op": "events",
        "request": {"customer_id": "acme", "since": "1700000000000-3", "limit": 20},
    },
    {"name": "events, all", "client": {}, "op": "events", "request": {}},
    {
        "name": "open_task",
        "client": {},
        "op": "open_task",
        "request": {"task_ref": "report-42", "ceiling": 10, "customer_id": "user_9"},
    },
    {
        "name": "get_task",
        "client": {},
        "op": "get_task",
        "request": {"task_ref": "report-42"},
    },
]

# The order in which each client method takes its arguments (Python's plan_* functions).
PLAN_ARGS = {
    "preflight": (
        "agent_id",
        "estimated_units",
        "customer_id",
        "task_ref",
        "task_ceiling",
        "idempotency_key",
        "ttl",
    ),
    "record": (
        "agent_id",
        "units",
        "customer_id",
        "reservation_id",
        "task_ref",
        "success",
        "idempotency_key",
        "metadata",
    ),
    "release": ("reservation_id", "idempotency_key", "customer_id"),
    "set_budget": ("customer_id", "limit", "period", "tz", "agent_id", "thresholds"),
    "set_rate_limit": ("customer_id", "units", "per_seconds", "burst", "agent_id"),
    "set_concurrency_limit": ("customer_id", "max_in_flight", "agent_id"),
    "get_budget": ("customer_id", "agent_id"),
    "get_usage": ("customer_id", "limit"),
    "events": ("customer_id", "since", "limit"),
    "open_task": ("task_ref", "ceiling", "customer_id"),
    "get_task": ("task_ref", "customer_id"),
}
DEFAULTS: dict[str, Any] = {"success": True, "tz": "UTC", "thresholds": ()}

IDS: list[Any] = [
    "a",
    " ",
    "x" * 256,
    "x" * 257,
    "🚀" * 256,
    "🚀" * 257,
    "",
    "a\x00b",
    "a\nb",
    "\x1f",
    "a\x7fb",
    "a\x85b",
    "a\xa0b",
    "a\u200bb",
    "\u200b",
    "\u3000",
    "\u0301",
    "e\u0301",
    "a\u2028b",
    "\u2029",
    "{}:ü",
    12,
    None,
    True,
]
UNITS: list[Any] = [0, 1, 9007199254740991, 9007199254740992, -1, 1.5, "10", True, None]
SINCE: list[Any] = [
    "0-0",
    "1700000000000-3",
    "18446744073709551615-0",
    "18446744073709551615-18446744073709551614",
    "18446744073709551615-18446744073709551615",  # the largest id: nothing can follow it
    "18446744073709551616-0",  # beyond Redis's uint64
    "99999999999999999999-0",
    "1-99999999999999999999",
    "1700000000000",
    "-1-0",
    " 1-0",
    "",
    12,
]
ZONES = [
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Asia/Kolkata",
    "Australia/Lord_Howe",
    "America/Sao_Paulo",
]
ZONE_DAY = date(2026, 3, 1)


@contextmanager
def drawn_token(token: str) -> Iterator[None]:
    with mock.patch.object(_core, "new_token", return_value=token):
        yield


def plan(case: dict[str, Any], token: str) -> _core.Plan[Any]:
    """Python's plan for a vector case, its request id ``token``."""
    policy = _core.ScriptSettings.from_settings(_core.settings_from(**case["client"]))
    values = {**DEFAULTS, **case["request"]}
    if case["op"] == "get_usage":
        values.setdefault("limit", 100)  # the clients' default
    args = [values.get(name) for name in PLAN_ARGS[case["op"]]]
    if case["op"] == "set_budget" and isinstance(args[5], list):
        args[5] = tuple(args[5])
    fn = getattr(_core, f"plan_{case['op']}")
    extra = dict(case.get("extra", {}))
    if "prefer" in extra:  # the client's book of its own reservations holds this one
        own = OwnReservations()
        group = (
            _core.customer_of(values.get("customer_id")),
            values["agent_id"],
            values.get("task_ref"),
        )
        own.add(group, extra.pop("prefer"), None)
        extra["own"] = own
    with drawn_token(token):
        if case["op"] == "preflight":
            return fn(policy, *args, BaseCheck, **extra)  # type: ignore[no-any-return]
        if case["op"] == "events":  # read in pages: the vector is the first page's call
            return next(fn(policy, *args, **extra))  # type: ignore[no-any-return]
        return fn(policy, *args, **extra)  # type: ignore[no-any-return]


def named(script: str, keys: list[str], args: list[str]) -> dict[str, Any]:
    """The call's KEYS and ARGV by their contract names, packed arguments unpacked."""
    spec = CONTRACT["scripts"][script]
    key_names = [k["name"] for k in CONTRACT["customer_keys"] + spec["keys"]]
    arg_specs = CONTRACT["common_args"] + spec["args"]
    out: dict[str, Any] = {
        "keys": dict(zip(key_names, keys, strict=False)),
        "args": {a["name"]: v for a, v in zip(arg_specs, args, strict=True)},
    }
    if "packed" in spec:
        values = out["args"].pop("fields").split(SEP)
        out["packed"] = {f["name"]: v for f, v in zip(spec["packed"], values, strict=True)}
    return out


def calls() -> list[dict[str, Any]]:
    out = []
    for i, case in enumerate(CALLS):
        token = TOKENS[i % len(TOKENS)]
        call = plan(case, token).call
        args = [str(a) for a in call.args]
        out.append(
            {
                **case,
                "token": token,
                "script": call.script,
                "keys": list(call.keys),
                "args": args,
                "named": named(call.script, list(call.keys), args),
            }
        )
    return out


def keys() -> dict[str, Any]:
    spaces = []
    names = [k["name"] for k in CONTRACT["customer_keys"]]
    for n, ns in enumerate(NAMESPACES):
        for c, customer in enumerate(CUSTOMERS):
            ck = KeySpace(ns).customer(customer)
            # Every (namespace, customer) pair for the fixed keys; the per-request keys on a
            # diagonal, which is enough to pin their rule without a file of megabytes.
            per_request = c % len(NAMESPACES) == n
            spaces.append(
                {
                    "namespace": ns,
                    "customer_id": customer,
                    "tag": ck.tag,
                    "prefix": ck.prefix,
                    "fixed": dict(zip(names, ck.fixed, strict=True)),
                    "idempotency": [
                        {"operation": op, "key": key, "name": ck.idempotency(op, key)}
                        for op in ("preflight", "record")
                        for key in IDEMPOTENCY_KEYS
                    ]
                    if per_request
                    else [],
                    "request": [{"token": t, "name": ck.request(t)} for t in TOKENS]
                    if per_request
                    else [],
                }
            )
    return {
        "tags": [{"customer_id": c, "tag": customer_tag(c)} for c in CUSTOMERS],
        "namespace_prefixes": [
            {"namespace": ns, "prefix": namespace_prefix(ns)} for ns in NAMESPACES
        ],
        "digests": [{"parts": parts, "digest": digest(*parts)} for parts in DIGEST_PARTS],
        "reservation_ids": [
            {"tag": customer_tag(c), "token": t, "id": reservation_id(customer_tag(c), t)}
            for c in CUSTOMERS[:3]
            for t in TOKENS
        ],
        "tag_of_reservation": [{"id": rid, "tag": tag_of_reservation(rid)} for rid in TAGGED],
        "fingerprints": [{"parts": p, "fingerprint": _core.fingerprint(*p)} for p in FINGERPRINTS],
        "spaces": spaces,
    }


def id_valid(value: Any) -> bool:
    try:
        validate(PreflightRequest, agent_id=value, estimated_units=1, customer_id="c")
    except InvalidRequestError as exc:
        if exc.field != "agent_id":
            raise
        return False
    return True


def units_valid(value: Any) -> bool:
    try:
        validate_units("units", value)
    except InvalidRequestError:
        return False
    return True


def since_valid(value: Any) -> bool:
    try:
        validate(EventsRequest, customer_id="c", since=value)
    except InvalidRequestError as exc:
        if exc.field != "since":
            raise
        return False
    return True


def validation() -> dict[str, Any]:
    return {
        "ids": [{"value": v, "valid": id_valid(v)} for v in IDS],
        "units": [{"value": v, "valid": units_valid(v)} for v in UNITS],
        "since": [{"value": v, "valid": since_valid(v)} for v in SINCE],
    }


def zones() -> dict[str, Any]:
    return {
        "today": ZONE_DAY.isoformat(),
        "tables": [{"tz": tz, "table": zone_table(tz, ZONE_DAY)} for tz in ZONES],
    }


URLS = [
    "redis://127.0.0.1:6380/2",
    "redis://u:p%40ss@host",
    "rediss://h:7000/0",
    "redis+cluster://10.0.0.1:7000,10.0.0.2:7001,10.0.0.3",
    "redis+cluster://u:s%2Fecret@a:7000, b:7001/0",
    "rediss+cluster://:pw@h1:7000,h2:7000",
    "REDIS+CLUSTER://Host-A:7000",
    "redis+cluster://[::1]:7000,127.0.0.1:7001",
    "redis+cluster://h:7000/?db=0",
    "redis+sentinel://s1:26379,s2:26380,s3/mymaster",
    "redis+sentinel://m:pw@s1/mymaster/3",
    "redis+sentinel://s1:26379/svc/1?sentinel_username=sen&sentinel_password=s%26p+w",
    "rediss+sentinel://s1,s2/my%20master/0?sentinel_password=x",
    "redis+sentinel://s1/svc?db=4",
    # malformed: each raises, never quoting the URL
    "redis+cluster://u:hunter2@h:7000/1",
    "redis+cluster://h:7000?db=2",
    "redis+cluster://",
    "redis+cluster://a:7000,,b:7001",
    "redis+cluster://u:hunter2@a:notaport",
    "redis+cluster://a:99999",
    "redis+sentinel://u:hunter2@s1:26379",
    "redis+sentinel://s1:26379/",
    "redis+sentinel://s1/svc?db=x",
    "http://u:hunter2@h:6379",
    # port 0 is no port: refused, never read as the default
    "redis://u:hunter2@h:0/1",
    "redis+cluster://u:hunter2@a:7000,b:0",
    "redis+sentinel://u:hunter2@s1:0/svc",
    # a cluster has database 0 only: no path but / or /0, no db but 0
    "redis+cluster://u:hunter2@h:7000/abc",
    "redis+cluster://u:hunter2@h:7000/0/extra",
    "redis+sentinel://u:hunter2@s1/svc/abc",
    # the user and password are %-escaped UTF-8
    "redis://u:hunter2%zz@h:6379",
    "redis+cluster://u:hunter2%ff@h:7000",
    "redis+sentinel://u%2:hunter2@s1/svc",
]


def url_case(url: str) -> dict[str, Any]:
    from redis.connection import SSLConnection, parse_url

    from agentbill import _topology

    try:
        topology = _topology.parse(url)
        options = topology.options if topology else parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError:
        return {"url": url, "error": True}
    if topology is None:
        nodes = [[options["host"], options.get("port", 6379)]]
    else:
        nodes = [list(n) for n in topology.nodes]
    return {
        "url": url,
        "kind": topology.kind if topology else "single",
        "nodes": nodes,
        "service": topology.service if topology else None,
        "db": options.get("db", 0),
        "username": options.get("username"),
        "password": options.get("password"),
        "tls": options.get("connection_class") is SSLConnection,
        "sentinel_username": topology.sentinel_options.get("username") if topology else None,
        "sentinel_password": topology.sentinel_options.get("password") if topology else None,
    }


def urls() -> dict[str, Any]:
    from agentbill._retry import CLUSTER_HINT

    return {"cluster_hint": CLUSTER_HINT, "cases": [url_case(url) for url in URLS]}


FILES = {
    "keys.json": keys,
    "calls.json": calls,
    "validation.json": validation,
    "zones.json": zones,
    "urls.json": urls,
}


def render(name: str) -> str:
    return json.dumps(FILES[name](), ensure_ascii=False, indent=1) + "\n"


def main() -> None:
    for name in FILES:
        (HERE / name).write_text(render(name), encoding="utf-8")
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
