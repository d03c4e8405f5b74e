"""Tenant keys: each key is a Redis ACL user confined to its namespace.

Every test runs against a real redis-server that requires credentials (its default user is the
admin), so a client is only as strong as the key it holds. Raw redis-py connections
authenticated as one tenant show what the key allows beyond what agentbill's client sends.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import secrets
import subprocess
import sys
import threading
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import given
from redis import exceptions as rx
from redis.backoff import NoBackoff
from redis.retry import Retry

import agentbill
from agentbill import (
    AgentBillClient,
    AsyncAgentBillClient,
    AuthenticationError,
    InvalidRequestError,
    IssuedKey,
    KeyAdmin,
    LoadedLibrary,
    StoreError,
    StoreUnavailableError,
    _core,
)
from agentbill._key_admin import CLIENT_COMMANDS, CLUSTER_COMMANDS, SCRIPT_COMMANDS
from agentbill._keys import KeySpace, namespace_prefix
from agentbill._scripts import installed
from agentbill._tenants import TenantKey, format_key, parse_api_key
from tests._async_facade import blocking_client
from tests._ids import valid_ids
from tests._servers import AclRedisServer, free_port, make_tls_files

KEY_ID = "0123456789abcdef"


@dataclass
class Tenant:
    issued: IssuedKey

    @property
    def namespace(self) -> str:
        return self.issued.namespace

    @property
    def key(self) -> str:
        return self.issued.api_key.get_secret_value()

    @property
    def parsed(self) -> TenantKey:
        parsed = parse_api_key(self.key)
        assert parsed is not None
        return parsed

    @property
    def secret(self) -> str:
        return self.parsed.secret.get_secret_value()


@pytest.fixture(scope="module")
def server() -> Iterator[AclRedisServer]:
    srv = AclRedisServer(admin_password=secrets.token_urlsafe(16)).start()
    yield srv
    srv.stop()


@pytest.fixture
def admin(server: AclRedisServer) -> Iterator[KeyAdmin]:
    with KeyAdmin(server.admin_url) as a:
        yield a


def _tenant(admin: KeyAdmin, label: str) -> Tenant:
    # Dots, colons, braces and glob characters: the namespace is quoted in key names, in ACL
    # key patterns and in the key itself.
    return Tenant(admin.create_key(f"tenant {label}.{uuid.uuid4().hex[:8]}:{{x}}*?"))


@pytest.fixture
def tenant_a(admin: KeyAdmin) -> Tenant:
    return _tenant(admin, "a")


@pytest.fixture
def tenant_b(admin: KeyAdmin) -> Tenant:
    return _tenant(admin, "b")


def raw_as(server: AclRedisServer, tenant: Tenant) -> redis.Redis:
    """A plain redis-py connection authenticated with the tenant's key: no agentbill in between."""
    return server.client(
        username=tenant.parsed.username,
        password=tenant.secret,
        decode_responses=True,
        retry=Retry(NoBackoff(), 0),
    )


Make = Callable[..., AgentBillClient]


@pytest.fixture(params=["sync", "async"])
def make_client(request: pytest.FixtureRequest) -> Iterator[Make]:
    """Builds AgentBillClient, or AsyncAgentBillClient behind a blocking facade; closes them."""
    runner = asyncio.Runner()
    closers: list[Callable[[], object]] = []

    def make(**kwargs: Any) -> AgentBillClient:
        if request.param == "sync":
            client = AgentBillClient(**kwargs)
            closers.append(client.close)
            return client
        aclient = AsyncAgentBillClient(**kwargs)
        closers.append(lambda: runner.run(aclient.close()))
        return blocking_client(aclient, runner)  # type: ignore[no-any-return]

    yield make
    for close in closers:
        close()
    runner.close()


# -- the rules and the key format ----------------------------------------------------------------


def test_tenants_are_granted_exactly_the_commands_the_functions_call() -> None:
    text = installed().text  # what Redis runs (test_library: it is built from lua/*.lua)
    # Every command is a literal, so this list is complete.
    assert not re.search(r"redis\.p?call\(\s*[^'\"\s]", text)
    called = {name.lower() for name in re.findall(r"redis\.p?call\(\s*['\"](\w+)", text)}
    assert called == set(SCRIPT_COMMANDS)
    # What runs code: only FCALL of loaded functions, never code the caller brings.
    granted = {c.split("|")[0] for c in SCRIPT_COMMANDS + CLIENT_COMMANDS + CLUSTER_COMMANDS}
    assert granted & {"fcall", "fcall_ro"} == {"fcall", "fcall_ro"}
    assert not granted & {"eval", "eval_ro", "evalsha", "evalsha_ro", "script", "function"}


@given(
    namespace=valid_ids(),
)
def test_any_namespace_round_trips_through_a_key(namespace: str) -> None:
    secret = secrets.token_urlsafe(32)
    parsed = parse_api_key(format_key(namespace, KEY_ID, secret))
    assert parsed is not None
    assert (parsed.namespace, parsed.key_id) == (namespace, KEY_ID)
    assert parsed.secret.get_secret_value() == secret
    assert parsed.username == f"agentbill:{namespace_prefix(namespace)}:{KEY_ID}"


@pytest.mark.parametrize("label", ["agb_your_key", "agb_demo", "agb_top-secret-value", "sk-1"])
def test_a_string_without_the_key_shape_is_a_label(label: str) -> None:
    assert parse_api_key(label) is None


def _malformed(good: str, secret: str) -> list[str]:
    body = good.removeprefix("agb_")
    return [
        good[:-1],  # truncated
        good + "x",
        good + "\n",  # copied with its line break
        " " + good,
        good.replace(KEY_ID, "0123456789ABCDEF"),  # key ids are lower-case hex
        good.replace(secret, secret[:20]),
        "agb_%zz." + body.split(".", 1)[1],  # not a percent-escape
        "agb_%FF." + body.split(".", 1)[1],  # not UTF-8
        "agb_%61cme." + body.split(".", 1)[1],  # "acme", not as agentbill writes it
        "agb_a%0Ab." + body.split(".", 1)[1],  # a control character in the namespace
    ]


def test_a_malformed_key_is_refused_without_echoing_it(server: AclRedisServer) -> None:
    secret = secrets.token_urlsafe(32)
    good = format_key("acme", KEY_ID, secret)
    assert parse_api_key(good) is not None
    for bad in _malformed(good, secret):
        with pytest.raises(InvalidRequestError) as info:
            AgentBillClient(api_key=bad, redis_url=server.url)
        assert info.value.field == "api_key", repr(bad)
        for text in (str(info.value), repr(info.value)):
            assert secret[:20] not in text
            assert bad.strip() not in text


def test_a_key_is_an_acl_user_with_exactly_these_rules(
    server: AclRedisServer, admin: KeyAdmin, tenant_a: Tenant
) -> None:
    with server.client(decode_responses=True) as root:
        user = root.acl_getuser(tenant_a.parsed.username)
    assert "on" in user["flags"]
    assert user["passwords"] == [hashlib.sha256(tenant_a.secret.encode()).hexdigest()]
    assert user["keys"] == [f"~{namespace_prefix(tenant_a.namespace)}:*"]
    assert (user["channels"], user["selectors"]) == ([], [])
    assert user["categories"] == ["-@all"]
    expected = SCRIPT_COMMANDS + CLIENT_COMMANDS + admin._optional_commands()
    assert sorted(user["commands"]) == sorted(f"+{command}" for command in expected)


def test_a_key_sets_the_namespace(server: AclRedisServer, tenant_a: Tenant) -> None:
    ns = tenant_a.namespace
    assert AgentBillClient(api_key=tenant_a.key, redis_url=server.url).namespace == ns
    same = AgentBillClient(api_key=tenant_a.key, redis_url=server.url, namespace=ns)
    assert same.namespace == ns
    for cls in (AgentBillClient, AsyncAgentBillClient):
        with pytest.raises(InvalidRequestError) as info:
            cls(api_key=tenant_a.key, redis_url=server.url, namespace="someone-else")
        assert info.value.field == "namespace"


def test_a_key_needs_a_shared_server(
    tenant_a: Tenant, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("AGENTBILL_REDIS_URL", raising=False)
    monkeypatch.setenv("AGENTBILL_HOME", str(tmp_path))

    def never(*args: object) -> str:
        raise AssertionError("the embedded server was started for a tenant key")

    monkeypatch.setattr("agentbill._local.ensure_local_server", never)
    for cls in (AgentBillClient, AsyncAgentBillClient):
        with pytest.raises(InvalidRequestError) as info:
            cls(api_key=tenant_a.key)
        assert info.value.field == "api_key"
        assert tenant_a.secret not in str(info.value)


def test_a_key_refuses_a_url_with_credentials_of_its_own(
    tenant_a: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    password = secrets.token_urlsafe(12)
    urls = [
        f"redis://someone:{password}@127.0.0.1:1/0",
        f"redis://:{password}@127.0.0.1:1/0",
        f"redis://127.0.0.1:1/0?password={password}",
    ]
    for url in urls:
        with pytest.raises(InvalidRequestError) as info:
            AgentBillClient(api_key=tenant_a.key, redis_url=url)
        assert info.value.field == "redis_url"
        assert password not in str(info.value)
        monkeypatch.setenv("AGENTBILL_REDIS_URL", url)
        with pytest.raises(InvalidRequestError):
            AsyncAgentBillClient(api_key=tenant_a.key)


def test_a_label_sends_no_credentials(server: AclRedisServer) -> None:
    # The README's placeholder works only where Redis asks for no credentials (test_seed);
    # on a server that does, it is refused like no key at all.
    client = AgentBillClient(api_key="agb_your_key", redis_url=server.url)
    with pytest.raises(AuthenticationError):
        client.get_budget("user_123")


# -- a tenant's client ---------------------------------------------------------------------------


def test_a_tenant_runs_end_to_end(
    make_client: Make, server: AclRedisServer, tenant_a: Tenant
) -> None:
    client = make_client(api_key=tenant_a.key, redis_url=server.url)
    assert client.set_budget("cust", 100).limit == 100
    check = client.preflight("agent", 30, "cust", task_ref="t1", task_ceiling=50)
    assert check.approved
    assert check.record(20).charged == 20
    other = client.preflight("agent", 10, "cust")
    assert client.release(other.reservation_id).status == "released"
    client.open_task("t2", 5, "cust")
    assert client.get_task("t2", "cust").ceiling == 5
    budget = client.get_budget("cust")
    assert (budget.limit, budget.spent, budget.reserved) == (100, 20, 0)
    refused = client.preflight("agent", 81, "cust")
    assert refused.reason == "budget_exhausted"

    with server.client(decode_responses=True) as root:
        budget_key = KeySpace(tenant_a.namespace).customer("cust").budget
        assert root.hget(budget_key, "spent") == "20"
        written = list(root.scan_iter(match="*cust*", count=1000))
        assert all(k.startswith(f"{namespace_prefix(tenant_a.namespace)}:") for k in written)

    # A URL naming another database works too (SELECT is granted; keys stay confined).
    db1 = make_client(api_key=tenant_a.key, redis_url=server.url.replace("/0", "/1"))
    assert db1.preflight("agent", 1, "cust").approved


def policy(tenant: Tenant) -> _core.ScriptSettings:
    return _core.ScriptSettings.from_settings(_core.settings_from(namespace=tenant.namespace))


def fcall(raw: redis.Redis, call: _core.Call, command: str = "FCALL") -> Any:
    """agentbill's function for ``call``, sent by hand as the clients send it."""
    function = installed().function(call.script)
    args = (command, function, len(call.keys), *call.keys, *call.args)
    return raw.execute_command(*args)  # type: ignore[no-untyped-call]


def _refused(call: Callable[[], object]) -> str:
    with pytest.raises(redis.ResponseError) as info:
        call()
    message = str(info.value)
    assert "permission" in message or "can't access" in message or "can't run" in message
    return message


def test_a_tenant_key_cannot_touch_another_tenant_or_the_server(
    server: AclRedisServer, tenant_a: Tenant, tenant_b: Tenant
) -> None:
    with AgentBillClient(api_key=tenant_b.key, redis_url=server.url) as b:
        b.set_budget("cust", 100)
        assert b.preflight("agent", 10, "cust").approved
    b_keys = KeySpace(tenant_b.namespace).customer("cust")
    a_keys = KeySpace(tenant_a.namespace).customer("cust")
    with server.client(decode_responses=True) as root:
        before = {key: root.dump(key) for key in b_keys.fixed}

    raw_a = raw_as(server, tenant_a)
    assert raw_a.ping()
    prefix_a = namespace_prefix(tenant_a.namespace)
    # B's keys, keys outside any namespace, and keys that merely start like A's prefix.
    for key in (b_keys.budget, b_keys.res, "outside", "agentbill:x", f"{prefix_a}x:budget"):
        for call in (
            partial(raw_a.get, key),
            partial(raw_a.hgetall, key),
            partial(raw_a.hget, key, "limit"),
            partial(raw_a.hset, key, "limit", 10**9),
            partial(raw_a.hincrby, key, "spent", -10),
            partial(raw_a.set, key, "x"),
            partial(raw_a.zadd, key, {"x": 1}),
            partial(raw_a.delete, key),
            partial(raw_a.exists, key),
        ):
            _refused(call)
    _refused(lambda: raw_a.eval("return 1", 0))

    # agentbill's own set_budget function, with B's keys: refused before it runs.
    b_call = _core.plan_set_budget(policy(tenant_b), "cust", 10**9, None, "UTC", None, ()).call
    _refused(lambda: fcall(raw_a, b_call))

    server_wide: list[tuple[object, ...]] = [
        ("SCAN", 0),
        ("KEYS", "*"),
        ("RANDOMKEY",),
        ("DBSIZE",),
        ("FLUSHALL",),
        ("FLUSHDB",),
        ("SWAPDB", 0, 1),
        ("MOVE", a_keys.budget, 1),
        ("CONFIG", "GET", "*"),
        ("CONFIG", "SET", "maxmemory", "1"),
        ("ACL", "WHOAMI"),
        ("ACL", "LIST"),
        ("ACL", "SETUSER", tenant_a.parsed.username, "allkeys", "+@all"),
        ("ACL", "DELUSER", tenant_b.parsed.username),
        ("CLIENT", "LIST"),
        ("CLIENT", "KILL", "USER", tenant_b.parsed.username),
        ("INFO",),
        ("SCRIPT", "FLUSH"),
        ("FUNCTION", "FLUSH"),
        ("PUBLISH", "channel", "message"),
        ("SAVE",),
        ("BGREWRITEAOF",),
        ("REPLICAOF", "NO", "ONE"),
        ("SHUTDOWN",),
    ]
    for command in server_wide:
        _refused(partial(raw_a.execute_command, *command))
    with raw_a.pubsub() as pubsub:  # type: ignore[no-untyped-call]
        pubsub.subscribe("channel")  # the reply is read with the next message
        _refused(lambda: pubsub.get_message(timeout=2.0))
    raw_a.close()

    with server.client(decode_responses=True) as root:
        assert {key: root.dump(key) for key in b_keys.fixed} == before
    with AgentBillClient(api_key=tenant_b.key, redis_url=server.url) as b:
        budget = b.get_budget("cust")
        assert (budget.limit, budget.reserved) == (100, 10)


# -- what a key may run: agentbill's functions, never code of its own (issue 13) -----------------

BUSY = "local n = 0 for i = 1, 100000000 do n = n + 1 end return n"  # a second or so of Lua


def test_a_key_calls_agentbills_functions_on_its_own_keys_only(
    server: AclRedisServer, tenant_a: Tenant, tenant_b: Tenant
) -> None:
    a, b = policy(tenant_a), policy(tenant_b)
    with raw_as(server, tenant_a) as raw_a:
        set_budget = _core.plan_set_budget(a, "cust", 100, None, "UTC", None, ())
        assert set_budget.decode(fcall(raw_a, set_budget.call)).limit == 100
        record = _core.plan_record(a, "agent", 7, "cust", None, None, True, None, None)
        assert record.decode(fcall(raw_a, record.call)).charged == 7
        get = _core.plan_get_budget(a, "cust", None)
        assert get.decode(fcall(raw_a, get.call)).spent == 7
        events = next(_core.plan_events(a, "cust", None, 10))  # flagged no-writes: FCALL_RO
        assert [e.units for e in events.decode(fcall(raw_a, events.call, "FCALL_RO"))] == [7]

        # B's keys, through the same functions: refused before they run.
        for call in (
            _core.plan_set_budget(b, "cust", 10**9, None, "UTC", None, ()).call,
            _core.plan_record(b, "agent", 7, "cust", None, None, True, None, None).call,
            _core.plan_get_budget(b, "cust", None).call,
        ):
            with pytest.raises(rx.NoPermissionError):
                fcall(raw_a, call)
        with pytest.raises(rx.NoPermissionError):
            fcall(raw_a, next(_core.plan_events(b, "cust", None, 10)).call, "FCALL_RO")
        # One of B's keys among A's own: every key FCALL names is checked.
        b_budget = KeySpace(tenant_b.namespace).customer("cust").budget
        mixed = record.call._replace(keys=(b_budget, *record.call.keys[1:]))
        with pytest.raises(rx.NoPermissionError):
            fcall(raw_a, mixed)
    with server.client() as root:
        assert root.exists(b_budget) == 0


def test_a_key_runs_no_code_of_its_own(server: AclRedisServer, tenant_a: Tenant) -> None:
    """No EVAL, EVALSHA, SCRIPT or FUNCTION: a tenant can neither run a script (not even one
    someone else cached) nor load, replace, flush or delete functions."""
    library = installed()
    own = f"#!lua name=mine\nredis.register_function('mine', function() {BUSY} end)"
    with server.client() as root:
        sha = root.script_load(BUSY)
        dump = root.function_dump()
    budget = KeySpace(tenant_a.namespace).customer("cust").budget
    with raw_as(server, tenant_a) as raw_a:
        for command in (
            ("EVAL", BUSY, 0),
            ("EVAL", "return redis.call('HGET', KEYS[1], 'limit')", 1, budget),  # its own key
            ("EVAL_RO", "return 1", 0),
            ("EVALSHA", sha, 0),
            ("EVALSHA_RO", sha, 0),
            ("SCRIPT", "LOAD", BUSY),
            ("SCRIPT", "EXISTS", sha),
            ("SCRIPT", "FLUSH"),
            ("SCRIPT", "KILL"),
            ("FUNCTION", "LOAD", own),
            ("FUNCTION", "LOAD", "REPLACE", library.text),
            ("FUNCTION", "FLUSH"),
            ("FUNCTION", "DELETE", library.name),
            ("FUNCTION", "RESTORE", dump, "REPLACE"),
            ("FUNCTION", "KILL"),
            ("FUNCTION", "LIST"),
        ):
            with pytest.raises(rx.NoPermissionError):
                raw_a.execute_command(*command)
        # redis-py's Script sends EVALSHA, then SCRIPT LOAD on NOSCRIPT: refused at the first.
        with pytest.raises(rx.NoPermissionError):
            raw_a.register_script(BUSY)()
    with server.client(decode_responses=True) as root:
        assert root.function_list(library="mine") == []
        assert root.function_list(library=library.name) != []


def test_one_tenant_cannot_stall_redis_for_another(
    make_client: Make, server: AclRedisServer, tenant_a: Tenant, tenant_b: Tenant
) -> None:
    """Issue 13: a tenant's own long script held Redis for every tenant (each call waiting on
    it, then BUSY), and another tenant's queued records were lost during such a stall. Now
    each way of running it is refused at once, and B's records land meanwhile."""
    b = make_client(api_key=tenant_b.key, redis_url=server.url)
    b.set_budget("cust", 10**6)
    own = f"#!lua name=busy\nredis.register_function('busy', function() {BUSY} end)"
    attempts = [
        ("EVAL", BUSY, 0),
        ("SCRIPT", "LOAD", BUSY),
        ("EVALSHA", hashlib.sha1(BUSY.encode()).hexdigest(), 0),
        ("FUNCTION", "LOAD", own),
        ("FCALL", "busy", 0),
    ]
    refused: list[str] = []

    def attack() -> None:
        with raw_as(server, tenant_a) as raw_a:
            for attempt in attempts:
                try:
                    raw_a.execute_command(*attempt)
                except rx.NoPermissionError:
                    refused.append(str(attempt[0]))
                except redis.ResponseError:  # FCALL of a function nobody loaded
                    pass

    attacker = threading.Thread(target=attack)
    attacker.start()
    charged = [b.record("agent", 1, "cust").charged for _ in range(50)]
    attacker.join()
    assert refused == ["EVAL", "SCRIPT", "EVALSHA", "FUNCTION"]
    assert charged == [1] * 50
    assert b.get_budget("cust").spent == 50


@pytest.mark.parametrize("reload", ["KeyAdmin.load_library", "agentbill keys load-library"])
def test_after_function_flush_a_tenant_is_told_until_the_library_is_loaded_again(
    reload: str, make_client: Make, server: AclRedisServer, admin: KeyAdmin, tenant_a: Tenant
) -> None:
    """Only an operator loads the library: a tenant's call without it raises
    LibraryNotLoadedError (naming the command), and works again once it is loaded, its
    reservation still open and charged once."""
    client = make_client(api_key=tenant_a.key, redis_url=server.url)
    client.set_budget("cust", 100)
    check = client.preflight("agent", 10, "cust")
    with server.client() as root:
        root.function_flush()
    with pytest.raises(agentbill.LibraryNotLoadedError) as info:
        check.record(8)
    assert "agentbill keys load-library" in str(info.value)
    with pytest.raises(agentbill.LibraryNotLoadedError):
        client.get_budget("cust")

    if reload == "KeyAdmin.load_library":
        loaded = admin.load_library()
        assert loaded == LoadedLibrary(installed().name, (f"127.0.0.1:{server.port}",), ())
    else:
        run = _cli("load-library", admin_url=server.admin_url)
        assert run.returncode == 0, run.stderr
        assert run.stdout == f"loaded {installed().name} on 1 primaries\n"
    assert check.record(8).charged == 8
    budget = client.get_budget("cust")
    assert (budget.spent, budget.reserved) == (8, 0)


def test_creating_a_key_loads_the_library_and_loading_again_changes_nothing(
    server: AclRedisServer, admin: KeyAdmin
) -> None:
    library = installed()
    with server.client(decode_responses=True) as root:
        root.function_flush()
        _tenant(admin, "loads")
        assert root.function_list(library=library.name) != []
        code = root.function_list(library=library.name, withcode=True)
        assert admin.load_library() == admin.load_library()
        assert root.function_list(library=library.name, withcode=True) == code
        assert len(root.function_list()) == 1


def test_limit_a_tenant_can_edit_its_own_counters_with_raw_commands(
    server: AclRedisServer, tenant_a: Tenant
) -> None:
    # The scripts run with the caller's permissions, so whoever holds a key may also write its
    # namespace's hashes directly: a key isolates tenants from each other, not from themselves.
    with AgentBillClient(api_key=tenant_a.key, redis_url=server.url) as a:
        a.set_budget("cust", 10)
        raw_a = raw_as(server, tenant_a)
        raw_a.hset(KeySpace(tenant_a.namespace).customer("cust").budget, "limit", 10**9)
        raw_a.close()
        assert a.get_budget("cust").limit == 10**9


# -- revocation ----------------------------------------------------------------------------------


def test_a_revoked_key_is_refused_at_once(
    make_client: Make, server: AclRedisServer, admin: KeyAdmin, tenant_a: Tenant, tenant_b: Tenant
) -> None:
    a = make_client(api_key=tenant_a.key, redis_url=server.url)
    # An outage policy must not mistake a refused key for an outage and approve offline.
    a_open = make_client(api_key=tenant_a.key, redis_url=server.url, on_outage="fail_open")
    b = make_client(api_key=tenant_b.key, redis_url=server.url)
    for client in (a, a_open, b):
        assert client.preflight("agent", 1, "cust").approved
    raw_a = raw_as(server, tenant_a)
    assert raw_a.ping()

    revoked = admin.revoke_key(tenant_a.issued.key_id)
    assert (revoked.key_id, revoked.namespace) == (tenant_a.issued.key_id, tenant_a.namespace)

    with pytest.raises(AuthenticationError):  # its connection was closed by Redis
        a.get_budget("cust")
    with pytest.raises(AuthenticationError):
        a_open.preflight("agent", 1, "cust")
    assert a_open.outage_stats.offline_runs == 0
    with pytest.raises(redis.ConnectionError):  # live raw connection: closed, then refused
        raw_a.ping()
    with pytest.raises(redis.AuthenticationError):
        raw_a.ping()
    raw_a.close()
    fresh = make_client(api_key=tenant_a.key, redis_url=server.url)
    with pytest.raises(AuthenticationError):
        fresh.preflight("agent", 1, "cust")

    assert b.preflight("agent", 1, "cust").approved
    assert tenant_a.issued.key_id not in {k.key_id for k in admin.list_keys()}
    with pytest.raises(InvalidRequestError) as info:
        admin.revoke_key(tenant_a.issued.key_id)
    assert info.value.field == "key_id"


def test_keys_of_one_namespace_are_revoked_one_by_one(
    server: AclRedisServer, admin: KeyAdmin, tenant_a: Tenant
) -> None:
    second = Tenant(admin.create_key(tenant_a.namespace))
    assert {k.key_id for k in admin.list_keys(tenant_a.namespace)} == {
        tenant_a.issued.key_id,
        second.issued.key_id,
    }
    admin.revoke_key(tenant_a.issued.key_id)
    with AgentBillClient(api_key=second.key, redis_url=server.url) as client:
        assert client.preflight("agent", 1, "cust").approved
    admin.revoke_key(second.issued.key_id)
    assert admin.list_keys(tenant_a.namespace) == []


# -- secrets stay secret -------------------------------------------------------------------------


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def test_a_key_never_appears_in_a_repr_a_log_line_or_an_error(
    server: AclRedisServer, admin: KeyAdmin, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="agentbill")
    caplog.set_level(logging.DEBUG, logger="redis")
    tenant = _tenant(admin, "secretive")
    wrong_secret = secrets.token_urlsafe(32)
    wrong = format_key(tenant.namespace, tenant.issued.key_id, wrong_secret)
    texts = [repr(tenant.issued), str(tenant.issued), repr(admin), repr(tenant.parsed)]
    errors: list[BaseException] = []

    def expect(error: type[Exception], call: Callable[[], object]) -> None:
        with pytest.raises(error) as info:
            call()
        errors.append(info.value)

    with AgentBillClient(api_key=tenant.key, redis_url=server.url) as client:
        assert client.preflight("agent", 1, "cust").approved
        pool = client._redis.connection_pool
        texts += [repr(client), str(client), repr(client._settings), repr(client._redis)]
        texts += [repr(pool), repr(pool.get_connection())]
    aclient = AsyncAgentBillClient(api_key=tenant.key, redis_url=server.url)
    texts += [repr(aclient), repr(aclient._settings), repr(aclient._redis)]
    asyncio.run(aclient.close())

    expect(
        AuthenticationError,
        lambda: AgentBillClient(api_key=wrong, redis_url=server.url).get_budget(),
    )
    wrong_async = AsyncAgentBillClient(api_key=wrong, redis_url=server.url)
    expect(AuthenticationError, lambda: asyncio.run(wrong_async.get_budget()))
    expect(
        InvalidRequestError, lambda: AgentBillClient(api_key=tenant.key[:-1], redis_url=server.url)
    )
    expect(InvalidRequestError, lambda: AgentBillClient(api_key=tenant.key, ceiling=-1))
    expect(InvalidRequestError, lambda: AgentBillClient(api_key=tenant.key, namespace="x"))
    live = AgentBillClient(api_key=tenant.key, redis_url=server.url)
    live.get_budget()
    admin.revoke_key(tenant.issued.key_id)
    expect(AuthenticationError, live.get_budget)
    expect(
        AuthenticationError,
        lambda: AgentBillClient(api_key=tenant.key, redis_url=server.url).get_budget(),
    )
    expect(redis.AuthenticationError, lambda: raw_as(server, tenant).ping())
    live.close()

    for error in errors:
        for exc in _chain(error):
            texts += [str(exc), repr(exc), *map(str, exc.args)]
        texts.append("".join(traceback.format_exception(error)))
    texts += [caplog.text, *(record.getMessage() for record in caplog.records)]
    for text in texts:
        for secret in (tenant.secret, wrong_secret):
            assert secret not in text
            assert secret[:16] not in text


# -- persistence ---------------------------------------------------------------------------------


def test_without_an_aclfile_keys_live_in_memory(server: AclRedisServer, admin: KeyAdmin) -> None:
    assert Tenant(admin.create_key("in-memory")).issued.persisted is None
    # CONFIG REWRITE needs a config file; this server runs from command-line arguments. The key
    # that could not be persisted is deleted again: nobody was shown it.
    users_before = set(admin.list_keys())
    rewriting = KeyAdmin(server.admin_url, rewrite_config=True)
    with rewriting, pytest.raises(StoreError, match="config file"):
        rewriting.create_key("in-memory")
    assert set(admin.list_keys()) == users_before


def test_with_an_aclfile_keys_survive_a_restart_and_so_does_a_revocation() -> None:
    srv = AclRedisServer(admin_password=secrets.token_urlsafe(16), aclfile=True).start()
    try:
        with KeyAdmin(srv.admin_url) as admin:
            tenant = Tenant(admin.create_key("durable"))
            assert tenant.issued.persisted == "aclfile"
        srv.restart()  # with its data lost (no RDB or AOF here): the library too
        with AgentBillClient(api_key=tenant.key, redis_url=srv.url) as client:
            with pytest.raises(agentbill.LibraryNotLoadedError):
                client.preflight("agent", 1, "cust")
            with KeyAdmin(srv.admin_url) as admin:
                admin.load_library()
            assert client.preflight("agent", 1, "cust").approved
        with KeyAdmin(srv.admin_url) as admin:
            assert admin.revoke_key(tenant.issued.key_id).persisted == "aclfile"
        srv.restart()
        refused = AgentBillClient(api_key=tenant.key, redis_url=srv.url)
        with refused, pytest.raises(AuthenticationError):
            refused.get_budget()
    finally:
        srv.stop()


# -- the command line ----------------------------------------------------------------------------


def _cli(*args: str, admin_url: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "AGENTBILL_ADMIN_URL"}
    if admin_url is not None:
        env["AGENTBILL_ADMIN_URL"] = admin_url
    return subprocess.run(
        [sys.executable, "-m", "agentbill", "keys", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def test_cli_creates_lists_and_revokes_keys(server: AclRedisServer) -> None:
    ns = f"cli-{uuid.uuid4().hex[:8]}"
    created = _cli("create", ns, admin_url=server.admin_url)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert created.stdout == key + "\n"
    parsed = parse_api_key(key)
    assert parsed is not None
    assert parsed.namespace == ns
    assert f"created key {parsed.key_id}" in created.stderr
    assert "no aclfile" in created.stderr

    listed = _cli("list", "--namespace", ns, "--redis-url", server.admin_url, admin_url=None)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[1:] == [f"{parsed.key_id:<18}{ns}"]

    with AgentBillClient(api_key=key, redis_url=server.url) as client:
        assert client.preflight("agent", 1, "cust").approved
        revoked = _cli("revoke", parsed.key_id, admin_url=server.admin_url)
        assert revoked.returncode == 0, revoked.stderr
        assert f"revoked key {parsed.key_id}" in revoked.stdout
        with pytest.raises(AuthenticationError):
            client.get_budget("cust")

    again = _cli("revoke", parsed.key_id, admin_url=server.admin_url)
    assert again.returncode == 1
    assert "no agentbill key has this id" in again.stderr
    assert _cli("list", "--namespace", ns, admin_url=server.admin_url).stdout == ""

    no_admin = _cli("list", admin_url=None)
    assert no_admin.returncode == 1
    assert "AGENTBILL_ADMIN_URL" in no_admin.stderr

    secret = parsed.secret.get_secret_value()
    for run in (listed, revoked, again, no_admin):
        assert secret not in run.stdout + run.stderr
    for run in (created, listed, revoked, again):
        assert server.admin_password not in run.stdout + run.stderr


def test_cli_loads_the_library(server: AclRedisServer) -> None:
    library = installed()
    with server.client(decode_responses=True) as root:
        root.function_flush()
        for _ in range(2):  # loading it again changes nothing
            run = _cli("load-library", "--json", admin_url=server.admin_url)
            assert run.returncode == 0, run.stderr
            assert json.loads(run.stdout) == {
                "name": library.name,
                "primaries": [f"127.0.0.1:{server.port}"],
                "replicas": [],
            }
            assert root.function_list(library=library.name) != []
    no_admin = _cli("load-library", admin_url=None)
    assert no_admin.returncode == 1
    assert "AGENTBILL_ADMIN_URL" in no_admin.stderr
    down = _cli("load-library", "--redis-url", f"redis://127.0.0.1:{free_port()}/0", admin_url=None)
    assert down.returncode == 3
    for ran in (run, no_admin, down):
        assert server.admin_password not in ran.stdout + ran.stderr


def test_cli_reports_refused_admin_credentials(server: AclRedisServer) -> None:
    bad = server.url.replace("://", "://default:not-the-password@", 1)
    run = _cli("list", admin_url=bad)
    assert run.returncode == 1
    assert "refused the credentials" in run.stderr
    assert "not-the-password" not in run.stderr


# -- TLS -----------------------------------------------------------------------------------------


TLS_MISSING = ("TLS support", "connection type tls", "TLS is not", "not built with TLS")


def test_rediss_urls_work(make_client: Make, tmp_path: Path) -> None:
    srv = AclRedisServer(admin_password=secrets.token_urlsafe(16), tls=make_tls_files(tmp_path))
    try:
        srv.start()
    except RuntimeError as exc:
        srv.stop()
        if any(marker.lower() in str(exc).lower() for marker in TLS_MISSING):
            pytest.skip(f"{srv.binary} was built without TLS")
        raise
    try:
        assert srv.url.startswith("rediss://")
        with KeyAdmin(srv.admin_url) as admin:
            tenant = Tenant(admin.create_key("tls-tenant"))
        client = make_client(api_key=tenant.key, redis_url=srv.url)
        check = client.preflight("agent", 5, "cust")
        assert check.approved
        check.record(3)
        assert client.get_budget("cust").spent == 3
        # The port speaks TLS only: the same request over plain TCP gets no answer.
        plain = make_client(
            api_key=tenant.key,
            redis_url=f"redis://127.0.0.1:{srv.port}/0",
            socket_timeout=0.5,
            retry_attempts=1,
        )
        with pytest.raises(StoreUnavailableError):
            plain.get_budget("cust")
    finally:
        srv.stop()


def test_the_readmes_key_commands_run(server: AclRedisServer) -> None:
    """The README's shell block of key commands, as written: its export line pointed at this
    server, and the revoke at the key its own create printed."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = next(
        b for b in re.findall(r"```bash\n(.*?)```", readme, flags=re.S) if "keys create" in b
    )
    lines = [line.split("#")[0].strip() for line in block.splitlines()]
    assert lines[0].startswith("export AGENTBILL_ADMIN_URL=")
    commands = [line.removeprefix("agentbill keys ").split() for line in lines[1:] if line]
    assert [c[0] for c in commands] == ["create", "list", "revoke", "load-library"]
    ns = f"readme-{uuid.uuid4().hex[:8]}"
    created = _cli("create", ns, admin_url=server.admin_url)  # the README's `create acme`
    assert created.returncode == 0, created.stderr
    parsed = parse_api_key(created.stdout.strip())
    assert parsed is not None
    key_id = parsed.key_id
    for command in commands[1:]:
        args = [key_id if a == "3f9a0c1d2e4b5a69" else a for a in command]
        ran = _cli(*args, admin_url=server.admin_url)
        assert ran.returncode == 0, (command, ran.stderr)
