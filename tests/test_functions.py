"""How the clients load and call agentbill's Functions library (lua/library.lua).

Every operation is an FCALL of the library's function. Redis answers "Function not found"
when it lacks the library (never loaded there, FUNCTION FLUSH or FUNCTION DELETE, a server
restarted without its data): the client loads it (FUNCTION LOAD REPLACE) and sends the same
requests once more. A server without Functions (Redis before 7.0) gets a StoreError naming the
version floor; a user that may call the functions but not load them (a tenant key) gets
LibraryNotLoadedError. Each function's flags let reads answer from a Redis over maxmemory.
"""

from __future__ import annotations

import asyncio
import pickle
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from agentbill import (
    AgentBillClient,
    AsyncAgentBillClient,
    LibraryNotLoadedError,
    Preflight,
    StoreBusyError,
    StoreError,
    StoreUnavailableError,
    _core,
)
from agentbill._models import RecordRequest
from agentbill._retry import translate
from agentbill._scripts import build, installed, no_functions, source
from tests._clock import movable_clock, shift_clock
from tests._processes import CTX
from tests._servers import RedisServer, running
from tests.conftest import namespace_keys
from tests.test_concurrency import run_processes
from tests.test_topology import url_client

KINDS = ["sync", "async"]


def loads(r: redis.Redis) -> int:
    """FUNCTION LOAD calls the server ran so far."""
    stats = r.info("commandstats").get("cmdstat_function|load", {"calls": 0})
    return int(stats["calls"])


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def libraries(r: redis.Redis) -> set[str]:
    """The names of the libraries the server has."""
    out = set()
    for lib in r.function_list():
        fields = {_text(k): v for k, v in zip(lib[::2], lib[1::2], strict=True)}
        out.add(_text(fields["library_name"]))
    return out


# -- "Function not found": load, and the same requests once more ----------------------------------


@pytest.mark.parametrize("forget", ["flush", "delete"])
def test_a_single_call_loads_the_library_again_once_and_lands_once(
    both_clients: AgentBillClient, raw: redis.Redis, forget: str
) -> None:
    client = both_clients
    client.set_budget("c", 100)
    check = client.preflight("agent", 10, "c", idempotency_key="job-1")
    if forget == "flush":
        raw.function_flush()
    else:
        raw.function_delete(installed().name)
    raw.config_resetstat()

    settled = check.record(4)  # answered "Function not found": loaded, sent again
    assert (settled.charged, settled.replayed) == (4, False)
    assert loads(raw) == 1
    assert libraries(raw) == {installed().name}
    assert raw.info("commandstats")["cmdstat_fcall"]["calls"] == 2  # the first ran nothing

    raw.function_flush()
    again = client.preflight("agent", 10, "c", idempotency_key="job-1")
    assert again.replayed
    assert again.reservation_id == check.reservation_id
    budget = client.get_budget("c")
    assert (budget.spent, budget.reserved, budget.open_reservations) == (4, 0, 0)
    assert loads(raw) == 2


def test_calls_send_no_function_load_while_the_library_is_there(
    client: AgentBillClient, raw: redis.Redis
) -> None:
    client.get_budget("c")
    raw.config_resetstat()
    for _ in range(5):
        client.preflight("agent", 1, "c").release()
    stats = raw.info("commandstats")
    assert stats["cmdstat_fcall"]["calls"] == 10
    assert not [name for name in stats if "function" in name or "script" in name]


def test_another_agentbill_versions_library_does_not_disturb_this_one(
    client: AgentBillClient, raw: redis.Redis
) -> None:
    """Each version's library has its own name (and so its own function names): both live
    in one Redis, the client's reload replaces only its own, and deleting the other (what an
    operator does to an old version's) changes nothing for this one."""

    def read(name: str) -> str:
        return source(name) + ("\n-- another version\n" if name == "estimates" else "")

    other = build(read)
    assert other.name != installed().name
    raw.function_flush()
    assert raw.function_load(other.text) == other.name
    client.set_budget("c", 10)  # loads this version's library beside the other
    assert libraries(raw) == {installed().name, other.name}
    raw.function_delete(installed().name)
    assert client.preflight("agent", 3, "c").approved  # loaded again; the other untouched
    assert libraries(raw) == {installed().name, other.name}
    raw.function_delete(other.name)
    assert client.get_budget("c").reserved == 3
    assert libraries(raw) == {installed().name}


@pytest.mark.parametrize("kind", KINDS)
def test_the_library_survives_a_restart_with_its_data_no_reload(kind: str, namespace: str) -> None:
    """Functions are data: a server killed and restarted from its append-only file has the
    library, so the first call after it loads nothing."""
    with (
        running(extra={"appendonly": "yes", "appendfsync": "always"}) as server,
        url_client(kind, server.url, namespace) as client,
    ):
        client.set_budget("c", 10)
        server.kill()
        server.restart()
        with server.client() as r:
            assert libraries(r) == {installed().name}
            r.config_resetstat()
            assert client.preflight("agent", 4, "c").approved
            assert loads(r) == 0
        assert client.get_budget("c").reserved == 4


# -- the version floor ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def no_functions_server() -> Iterator[RedisServer]:
    """A server that answers FCALL and FUNCTION as Redis 6 does: unknown commands (renamed
    away; `rename-command` takes one command per line, so the config file gets three)."""
    server = RedisServer()
    conf = server.dir / "no-functions.conf"
    conf.write_text(
        'rename-command FCALL ""\nrename-command FCALL_RO ""\nrename-command FUNCTION ""\n'
    )
    original = server.args

    def args() -> list[str]:
        binary, *rest = original()
        return [binary, str(conf), *rest]

    server.args = args  # type: ignore[method-assign]
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("kind", KINDS)
def test_a_server_without_functions_is_a_store_error_naming_the_floor_never_retried(
    kind: str, no_functions_server: RedisServer, namespace: str
) -> None:
    with no_functions_server.client() as r:
        with pytest.raises(redis.ResponseError, match="unknown command"):
            r.execute_command("FCALL", "f", "0")
        with url_client(kind, no_functions_server.url, namespace) as client:
            with pytest.raises(StoreError) as caught:
                client.preflight("agent", 1, "c")
            assert type(caught.value) is StoreError  # not "unavailable": no outage policy
            assert str(caught.value).startswith(
                "agentbill needs Redis 7.0+ or Valkey (any version): this server has no"
                " Functions (FCALL, FUNCTION LOAD); it answered: unknown command 'FCALL'"
            )
            r.config_resetstat()  # (a connection's handshake on 7.0 has refused steps too)
            with pytest.raises(StoreError, match=r"Redis 7\.0\+"):
                client.preflight("agent", 1, "c")
            with pytest.raises(StoreError, match=r"Redis 7\.0\+"):
                client.preflight_many([Preflight("agent", 1, "c")])
            errors = r.info("errorstats")
    # One refused FCALL per call: no retry, no attempt to load.
    assert errors["errorstat_ERR"]["count"] == 2


@pytest.mark.parametrize(
    "answer",
    [
        "unknown command `FCALL`, with args beginning with: `agentbill_x_preflight`, `11`, ",
        "unknown command 'FCALL', with args beginning with: 'agentbill_x_preflight' '11' ",
        "unknown command `FUNCTION`, with args beginning with: `LOAD`, `REPLACE`, ",
    ],
)
def test_redis_6_answers_translate_to_the_floor(answer: str) -> None:
    """What redis-server 6.0.9 answers FCALL and FUNCTION (backticks; 7.x quotes with ')."""
    exc = redis.ResponseError(answer)
    assert no_functions(exc)
    error = translate(exc)
    assert type(error) is StoreError
    assert str(error).startswith("agentbill needs Redis 7.0+ or Valkey (any version)")
    assert not no_functions(redis.ResponseError("unknown command 'NOPE', with args"))
    assert not no_functions(redis.ResponseError("Function not found"))


# -- a user that may call the functions but not load them --------------------------------------


@pytest.fixture(scope="module")
def acl_server() -> Iterator[RedisServer]:
    with running() as server:
        with server.client() as r:
            # FCALL and everything else, but not FUNCTION (LOAD): a tenant key's position.
            r.acl_setuser(
                "caller", enabled=True, passwords=["+secret"], keys=["*"], commands=["+@all",
                "-function"]
            )  # fmt: skip
        yield server


@pytest.mark.parametrize("kind", KINDS)
def test_a_user_who_may_not_load_the_library_gets_library_not_loaded(
    kind: str, acl_server: RedisServer, namespace: str
) -> None:
    url = f"redis://caller:secret@127.0.0.1:{acl_server.port}/0"
    library, node = installed().name, f"127.0.0.1:{acl_server.port}"
    with acl_server.client() as admin:
        admin.function_flush()
        with url_client(kind, url, namespace) as client:
            for call in (
                lambda: client.preflight("agent", 1, "c"),
                lambda: client.preflight_many([Preflight("agent", 1, "c")]),
                lambda: client.get_budget("c"),
            ):
                with pytest.raises(LibraryNotLoadedError) as caught:
                    call()
                error = caught.value
                assert isinstance(error, StoreError)
                assert not isinstance(error, StoreUnavailableError)
                assert (error.library, error.node) == (library, node)
                # Between the parentheses, what the server said (Redis and Valkey differ).
                head, said = str(error).split(" (", 1)
                assert head == (
                    f"Redis at {node} does not have agentbill's Functions library {library}"
                    " and this client may not load it"
                )
                assert said.endswith(
                    "no permissions to run the 'function|load' command): an operator loads it"
                    " with `agentbill keys load-library` or KeyAdmin.load_library()"
                )
                assert isinstance(error.__cause__, redis.exceptions.NoPermissionError)
                copy = pickle.loads(pickle.dumps(error))
                assert (type(copy), str(copy), copy.node) == (type(error), str(error), node)
            assert not admin.function_list()
            admin.function_load(installed().text)  # what `agentbill keys load-library` does
            assert client.preflight("agent", 1, "c").approved
            assert client.get_budget("c").reserved == 1


def test_queued_settlements_wait_for_the_library_not_dropped(
    acl_server: RedisServer, namespace: str
) -> None:
    """background_settle: records queued while the library is missing and this client may not
    load it stay queued (nothing ran), and land once an operator loaded it."""
    url = f"redis://caller:secret@127.0.0.1:{acl_server.port}/0"
    with (
        acl_server.client() as admin,
        AgentBillClient(redis_url=url, namespace=namespace, background_settle=True) as client,
    ):
        admin.function_load(installed().text, replace=True)
        checks = [client.preflight("agent", 5, "c") for _ in range(3)]
        admin.function_flush()
        for check in checks:
            assert check.record(2).status == "queued"
        assert client.flush() == 3
        assert client.outage_stats.dropped == 0
        admin.function_load(installed().text)
        assert client.flush() == 0
        budget = client.get_budget("c")
        assert (budget.spent, budget.reserved) == (6, 0)


def test_a_gated_record_that_finds_the_library_missing_is_queued_not_lost(
    acl_server: RedisServer, namespace: str
) -> None:
    """A gated run (its record no caller can make again) whose body ends after a FUNCTION
    FLUSH, on a connection that may not load the library (a tenant key): the record ran
    nothing, so it is queued, not raised after the body (its units were never charged, its
    estimate held until the TTL); it lands once an operator loads the library."""
    url = f"redis://caller:secret@127.0.0.1:{acl_server.port}/0"
    with (
        acl_server.client() as admin,
        AgentBillClient(redis_url=url, namespace=namespace) as client,
    ):
        admin.function_load(installed().text, replace=True)
        client.set_budget("c", 1000)

        @client.gate("a", 50, customer_id="c", units=42)
        def body() -> str:
            admin.function_flush()
            return "done"

        assert body() == "done"
        assert client.flush() == 1
        admin.function_load(installed().text)  # what `agentbill keys load-library` does
        assert client.flush() == 0
        budget = client.get_budget("c")
        assert (budget.spent, budget.reserved) == (42, 0)


def test_an_async_gated_record_that_finds_the_library_missing_is_queued_not_lost(
    acl_server: RedisServer, namespace: str
) -> None:
    """The same with AsyncAgentBillClient."""
    url = f"redis://caller:secret@127.0.0.1:{acl_server.port}/0"

    async def main(admin: redis.Redis) -> tuple[int, int]:
        async with AsyncAgentBillClient(redis_url=url, namespace=namespace) as client:
            await client.set_budget("c", 1000)

            @client.gate("a", 50, customer_id="c", units=42)
            async def body() -> str:
                admin.function_flush()
                return "done"

            assert await body() == "done"
            assert await client.flush() == 1
            admin.function_load(installed().text)
            assert await client.flush() == 0
            budget = await client.get_budget("c")
            return budget.spent, budget.reserved

    with acl_server.client() as admin:
        admin.function_load(installed().text, replace=True)
        assert asyncio.run(main(admin)) == (42, 0)


# -- function flags: reads answer from a Redis over maxmemory ------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_reads_answer_from_a_redis_over_maxmemory_and_writes_are_busy(
    kind: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """get_budget, get_usage, get_task (allow-oom: their only writes return expired
    reservations), events and estimates (no-writes) answer; preflight is refused as before
    (StoreBusyError, OOM). A function without flags is refused up front over maxmemory."""
    movable_clock(monkeypatch)
    with (
        running(extra={"maxmemory-policy": "noeviction"}) as server,
        url_client(kind, server.url, namespace, retry_deadline=0.2) as client,
        server.client() as r,
    ):
        client.set_budget("c", 1000)
        client.open_task("t", 100, "c")
        client.preflight("agent", 5, "c", task_ref="t").record(3)
        client.preflight("agent", 7, "c", ttl=1)  # expires: reaped by a read over maxmemory
        shift_clock(r, namespace, "c", 2000)
        r.config_set("maxmemory", r.info("memory")["used_memory"] // 2)  # well over it now
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            r.set("one-more", "x")

        budget = client.get_budget("c")
        assert (budget.spent, budget.reserved, budget.open_reservations) == (3, 0, 0)
        assert client.get_usage("c").customer.spent == 3
        assert client.get_task("t", "c").used == 3
        assert [e.type for e in client.events("c")][:3] == ["approved", "recorded", "approved"]
        assert client.estimates("agent", "c") is not None
        with pytest.raises(StoreBusyError) as caught:
            client.preflight("agent", 1, "c")
        assert caught.value.code == "OOM"
        r.config_set("maxmemory", 0)
        assert client.preflight("agent", 1, "c").approved


# -- what a caller other than agentbill's client may ask of a function --------------------------


def _outcomes_past_retention(
    raw: redis.Redis, client: AgentBillClient, customer: str, n: int
) -> str:
    """``n`` closed outcomes of ``customer`` that may be forgotten now; their zset's key."""
    keys = client._script_settings.keys.customer(customer)
    pipe = raw.pipeline(transaction=False)
    for start in range(0, n, 5000):
        ids = [f"r{i}" for i in range(start, min(start + 5000, n))]
        pipe.hset(keys.closed, mapping=dict.fromkeys(ids, "x"))
        pipe.zadd(keys.closedx, dict.fromkeys(ids, 1))
    pipe.execute()
    return keys.closedx


def test_the_largest_reap_limit_forgets_that_many_outcomes_in_one_call(
    redis_server: RedisServer, raw: redis.Redis, namespace: str
) -> None:
    """reap_limit=10,000 (the most the clients accept) with 9,000 outcomes past their retention:
    one call forgets them all. (Lua's unpack() stops near 8,000 values: handed the whole list
    at once, every call of this customer failed.)"""
    with AgentBillClient(
        redis_url=redis_server.url, namespace=namespace, reap_limit=10_000
    ) as client:
        client.set_budget("c", 100)
        closedx = _outcomes_past_retention(raw, client, "c", 9_000)
        assert client.get_budget("c").remaining == 100
        assert raw.zcard(closedx) == 0


def test_a_reap_limit_beyond_the_clients_bound_reaps_no_more_than_it(
    client: AgentBillClient, raw: redis.Redis
) -> None:
    """A tenant key may FCALL the functions with arguments of its own: asked to reap a billion
    entries, one call still forgets at most 10,000 (the clients' bound), so no caller can make
    one call hold Redis for its whole backlog."""
    client.set_budget("c", 100)
    closedx = _outcomes_past_retention(raw, client, "c", 25_000)
    call = _core.get_budget_call(client._script_settings, "c", None)
    args = ("1000000000", *call.args[1:])
    raw.fcall(installed().function("get_budget"), len(call.keys), *call.keys, *args)
    assert raw.zcard(closedx) == 15_000


@pytest.mark.parametrize("reap_limit", ["-1", "-5", "nan", "inf", "0x10", " 5", "5.0", "1e3", ""])
def test_a_setting_not_written_as_the_clients_write_it_is_refused_before_any_write(
    client: AgentBillClient, raw: redis.Redis, namespace: str, reap_limit: str
) -> None:
    """A tenant key's own FCALL with a reap limit Lua reads as a number but Redis does not take
    as one ('nan', '0x10': a record was charged, then the call failed in its reaping), or one
    ZRANGEBYSCORE takes for "no limit" ('-1': every outcome past its retention forgotten in one
    call, 12,000 here, past the 10,000 bound): refused, and nothing written."""
    client.set_budget("c", 100)
    check = client.preflight("a", 10, customer_id="c")
    closedx = _outcomes_past_retention(raw, client, "c", 12_000)
    before = namespace_keys(raw, namespace, ledger=True)
    p = client._script_settings
    request = RecordRequest(
        agent_id="a", units=7, customer_id="c", reservation_id=check.reservation_id
    )
    calls = [
        _core.record_call(p, request, _core.new_token()),
        _core.get_budget_call(p, "c", None),
    ]
    for call in calls:
        args = (reap_limit, *call.args[1:])
        with pytest.raises(redis.ResponseError, match="AGENTBILL bad_setting reap_limit"):
            raw.fcall(installed().function(call.script), len(call.keys), *call.keys, *args)
    assert namespace_keys(raw, namespace, ledger=True) == before
    assert raw.zcard(closedx) == 12_000
    status = client.get_budget("c")
    assert (status.spent, status.reserved) == (0, 10)


@pytest.mark.parametrize("position", [1, 2, 3, 4])
def test_every_setting_is_checked_before_any_write(
    client: AgentBillClient, raw: redis.Redis, namespace: str, position: int
) -> None:
    """The retentions and the ledger cap, 'nan' or '-1': refused before the record's writes
    (PEXPIRE and XADD MAXLEN refused them after)."""
    client.set_budget("c", 100)
    check = client.preflight("a", 10, customer_id="c")
    before = namespace_keys(raw, namespace, ledger=True)
    request = RecordRequest(
        agent_id="a", units=7, customer_id="c", reservation_id=check.reservation_id
    )
    call = _core.record_call(client._script_settings, request, _core.new_token())
    for bad in ("nan", "-1"):
        args = list(call.args)
        args[position] = bad
        with pytest.raises(redis.ResponseError, match="AGENTBILL bad_setting"):
            raw.fcall(installed().function("settle"), len(call.keys), *call.keys, *args)
    assert namespace_keys(raw, namespace, ledger=True) == before


def _agents(raw: redis.Redis, client: AgentBillClient, customer: str, n: int) -> None:
    """``n`` agents of ``customer``, remembered (named in the budget hash, listed in its zset),
    as a tenant key's raw writes can make them."""
    keys = client._script_settings.keys.customer(customer)
    pipe = raw.pipeline(transaction=False)
    for start in range(0, n, 5000):
        ids = range(start, min(start + 5000, n))
        pipe.zadd(keys.agents, {f"d{i}": 10**13 for i in ids})
        pipe.hset(keys.budget, mapping={f"a:d{i}:name": f"agent{i}" for i in ids})
    pipe.execute()


@pytest.mark.parametrize("agent_limit", ["0", "-1", "1000000000", "nan"])
def test_get_usage_lists_no_more_agents_than_the_clients_bound_whoever_asks(
    client: AgentBillClient, raw: redis.Redis, agent_limit: str
) -> None:
    """A tenant key's own FCALL of get_usage asking for '0' or '-1' agents (ZREVRANGE 0 -1:
    every one; 100,000 held Redis past its BUSY threshold) or a billion: refused, or at most
    10,000 listed (the clients' bound)."""
    client.set_budget("c", 100)
    _agents(raw, client, "c", 12_000)
    call = _core.get_usage_call(client._script_settings, "c", 10)
    args = (*call.args[:-1], agent_limit)
    fn = installed().function("get_usage")
    if agent_limit == "1000000000":
        reply = raw.fcall(fn, len(call.keys), *call.keys, *args)
        assert len(reply[1]) == 2 * 10_000
    else:
        with pytest.raises(redis.ResponseError, match="AGENTBILL bad_setting agent_limit"):
            raw.fcall(fn, len(call.keys), *call.keys, *args)


@pytest.mark.parametrize("count", ["0", "-1", "1000000000", "nan"])
def test_events_returns_no_more_entries_than_the_clients_bound_whoever_asks(
    client: AgentBillClient, raw: redis.Redis, count: str
) -> None:
    """A tenant key's own FCALL_RO of events with a count of a billion copied its whole ledger
    (which its raw XADD makes as long as it likes) into one script: 300,000 entries held Redis
    0.8 s, 500,000 past the clients' socket timeout, for every tenant. Refused, or at most
    10,000 entries (the clients ask for EVENTS_PAGE at a time)."""
    client.set_budget("c", 100)
    ledger = client._script_settings.keys.customer("c").ledger
    pipe = raw.pipeline(transaction=False)
    for _ in range(12_000):
        pipe.xadd(ledger, {"t": "x"})
    pipe.execute()
    call = _core.events_call(client._script_settings, "c", None, 10)
    args = (*call.args[:-1], count)
    fn = installed().function("events")
    if count == "1000000000":
        assert len(raw.fcall_ro(fn, len(call.keys), *call.keys, *args)) == 10_000
    else:
        with pytest.raises(redis.ResponseError, match="AGENTBILL bad_setting count"):
            raw.fcall_ro(fn, len(call.keys), *call.keys, *args)


# -- racing processes: gated runs under a key that may not load the library --------------------

GATED_WORKERS = 4
GATED_RUNS = 60


def gated_worker(
    url: str, namespace: str, seed: int, finished: Any, loaded: Any
) -> tuple[int, int, int]:
    """``GATED_RUNS`` gated runs on one customer through a user that may not load the library,
    while the test flushes and reloads it. Returns (units its finished bodies reported,
    preflights refused for the missing library, settlements dropped)."""
    rng = random.Random(seed)
    reported = refused = 0
    with AgentBillClient(redis_url=url, namespace=namespace) as client:
        for _ in range(GATED_RUNS):
            units = rng.randint(1, 20)

            @client.gate("agent", 20, customer_id="c", units=units)
            def body() -> None:
                time.sleep(rng.random() / 200)

            try:
                body()
            except LibraryNotLoadedError:
                refused += 1  # at the preflight: the body did not run, nothing reserved
                continue
            reported += units
        finished.release()
        assert loaded.wait(60)
        while client.flush():
            time.sleep(0.05)
        return reported, refused, client.outage_stats.dropped


def test_racing_gated_runs_lose_no_record_while_the_library_comes_and_goes(
    acl_server: RedisServer, namespace: str
) -> None:
    """Four processes run gated runs through a key that may not load the library (a tenant's
    position) while an operator flushes it and loads it back over and over. A run whose record
    met the missing library is queued; once the library is back for good, every reported unit
    is charged exactly once and nothing stays reserved."""
    url = f"redis://caller:secret@127.0.0.1:{acl_server.port}/0"
    finished, loaded = CTX.Semaphore(0), CTX.Event()
    with acl_server.client() as admin:
        admin.function_load(installed().text, replace=True)
        with AgentBillClient(redis_url=url, namespace=namespace) as client:
            client.set_budget("c", 10**9)
        flushes = 0

        def operator() -> None:
            nonlocal flushes
            done = 0
            while done < GATED_WORKERS:
                admin.function_flush()
                flushes += 1
                time.sleep(0.02)
                admin.function_load(installed().text, replace=True)
                time.sleep(0.03)
                while finished.acquire(block=False):
                    done += 1
            loaded.set()

        thread = threading.Thread(target=operator)
        thread.start()
        try:
            results = run_processes(
                gated_worker,
                [(url, namespace, s, finished, loaded) for s in range(GATED_WORKERS)],
            )
        finally:
            loaded.set()
            thread.join()
        with AgentBillClient(redis_url=url, namespace=namespace) as client:
            budget = client.get_budget("c")
    assert flushes > 5
    assert sum(r[1] for r in results) > 0  # the flushes did reach the workers
    assert [r[2] for r in results] == [0] * GATED_WORKERS
    assert (budget.reserved, budget.open_reservations) == (0, 0)
    assert budget.spent == sum(r[0] for r in results)
