"""Node and Python workers on one Redis: one budget, one reservation id, one ledger.

The Node side is the built TypeScript package (clients/typescript/dist), driven one step at a
time by clients/typescript/test/interop/worker.mjs. ``make test`` builds it before pytest; run
alone, this module builds it (it needs ``npm ci`` done in clients/typescript: ``make ts-setup``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from agentbill import AgentBillClient, KeyAdmin
from agentbill._keys import KeySpace
from tests._servers import AclRedisServer, Cluster, RedisServer

ROOT = Path(__file__).resolve().parent.parent
TS = ROOT / "clients" / "typescript"
WORKER = TS / "test" / "interop" / "worker.mjs"


@pytest.fixture(scope="module", autouse=True)
def built_package() -> None:
    """The TypeScript package, built from this checkout (a stale build is rebuilt)."""
    assert shutil.which("node"), "node is needed: the interop tests run Node workers"
    assert (TS / "node_modules").is_dir(), "run `make ts-setup` (npm ci in clients/typescript)"
    sources = [*TS.glob("src/*.ts"), *(ROOT / "lua").iterdir()]
    built = TS / "dist" / "index.js"
    if not built.exists() or max(p.stat().st_mtime for p in sources) > built.stat().st_mtime:
        subprocess.run(["npm", "run", "build"], cwd=TS, check=True, capture_output=True)


def _run_node(step: dict[str, Any], env: dict[str, str] | None) -> dict[str, Any]:
    """One step in a fresh Node process: its JSON reply ({"ok": ...} or {"error": ...})."""
    out = subprocess.run(
        ["node", str(WORKER), json.dumps(step)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )
    assert out.returncode == 0, out.stderr
    reply: dict[str, Any] = json.loads(out.stdout)
    return reply


def node(step: dict[str, Any], env: dict[str, str] | None = None) -> Any:
    """Run one step in a fresh Node process; its result (or raise with its error)."""
    reply = _run_node(step, env)
    if "error" in reply:
        raise AssertionError(f"node: {reply}")
    return reply["ok"]


def node_error(step: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    reply = _run_node(step, env)
    assert "error" in reply, reply
    return reply


@pytest.fixture
def py(redis_server: RedisServer, namespace: str) -> Iterator[AgentBillClient]:
    with AgentBillClient(redis_url=redis_server.url, namespace=namespace) as c:
        yield c


@pytest.fixture
def js(redis_server: RedisServer, namespace: str) -> dict[str, Any]:
    """The Node client's options: the same Redis and namespace as ``py``."""
    return {"redisUrl": redis_server.url, "namespace": namespace}


def test_a_node_reservation_is_recorded_from_python_and_back(
    py: AgentBillClient, js: dict[str, Any]
) -> None:
    py.set_budget("acme", 100)
    made_in_node = node(
        {
            "client": js,
            "op": "preflight",
            "args": {"agentId": "n", "estimatedUnits": 10, "customerId": "acme"},
        }
    )
    assert made_in_node["approved"]
    settled = py.record("n", 7, "acme", reservation_id=made_in_node["reservationId"])
    assert (settled.status, settled.charged, settled.released) == ("recorded", 7, 10)

    made_in_python = py.preflight("p", 20, "acme")
    back = node(
        {
            "client": js,
            "op": "record",
            "args": {"agentId": "p", "units": 15, "reservationId": made_in_python.reservation_id},
        }
    )
    assert (back["status"], back["charged"], back["released"]) == ("recorded", 15, 20)
    again = py.record("p", 15, "acme", reservation_id=made_in_python.reservation_id)
    assert again.replayed  # one close, whichever language closes first
    budget = py.get_budget("acme")
    assert (budget.spent, budget.reserved, budget.open_reservations) == (22, 0, 0)


def test_node_releases_by_the_idempotency_key_of_a_python_preflight(
    py: AgentBillClient, js: dict[str, Any]
) -> None:
    check = py.preflight("summariser", 12, "acme", idempotency_key="job-7 {ü}")
    assert py.get_budget("acme").reserved == 12
    released = node(
        {
            "client": js,
            "op": "release",
            "args": {"idempotencyKey": "job-7 {ü}", "customerId": "acme"},
        }
    )
    assert (released["status"], released["reservationId"]) == ("released", check.reservation_id)
    assert released["released"] == 12
    assert py.get_budget("acme").reserved == 0
    # and the same key from Node replays the Python preflight only while it holds something
    assert py.preflight("summariser", 12, "acme", idempotency_key="job-7 {ü}").reservation_id != (
        check.reservation_id
    )


def test_a_record_without_an_id_closes_its_own_languages_reservation_not_an_older_one(
    py: AgentBillClient, js: dict[str, Any]
) -> None:
    """Each client closes the reservation it made itself first, whichever language made the
    group's oldest: a Node record without an id leaves an older Python reservation open for its
    owner, and a Python one leaves an older Node reservation."""
    older_in_python = py.preflight("agent", 7, "acme")
    made, closed = node(
        {
            "client": js,
            "op": "steps",
            "args": [
                {
                    "op": "preflight",
                    "args": {"agentId": "agent", "estimatedUnits": 5, "customerId": "acme"},
                },
                {"op": "record", "args": {"agentId": "agent", "units": 4, "customerId": "acme"}},
            ],
        }
    )
    assert (closed["status"], closed["reservationId"], closed["charged"]) == (
        "recorded",
        made["reservationId"],
        4,
    )
    mine = older_in_python.record(7)  # still open for its owner: not closed late
    assert (mine.status, mine.late, mine.charged) == ("recorded", False, 7)

    older_in_node = node(
        {
            "client": js,
            "op": "preflight",
            "args": {"agentId": "agent", "estimatedUnits": 3, "customerId": "acme"},
        }
    )
    own = py.preflight("agent", 2, "acme")
    closed_in_python = py.record("agent", 2, "acme")
    assert (closed_in_python.status, closed_in_python.reservation_id) == (
        "recorded",
        own.reservation_id,
    )
    theirs = py.record("agent", 3, reservation_id=older_in_node["reservationId"])
    assert (theirs.status, theirs.late) == ("recorded", False)
    budget = py.get_budget("acme")
    assert (budget.spent, budget.reserved, budget.open_reservations) == (4 + 7 + 2 + 3, 0, 0)


def test_the_ledger_node_writes_reads_back_in_python_with_the_same_fields(
    py: AgentBillClient, js: dict[str, Any]
) -> None:
    py.set_budget("acme", 30, thresholds=(50,))
    first = node(
        {
            "client": js,
            "op": "preflight",
            "args": {"agentId": "n", "estimatedUnits": 20, "customerId": "acme", "taskRef": "t-1"},
        }
    )
    node(
        {
            "client": js,
            "op": "preflight",
            "args": {"agentId": "n", "estimatedUnits": 20, "customerId": "acme"},
        }
    )
    node(
        {
            "client": js,
            "op": "record",
            "args": {"agentId": "n", "units": 18, "reservationId": first["reservationId"]},
        }
    )
    node({"client": js, "op": "record", "args": {"agentId": "d", "units": 1, "customerId": "acme"}})
    in_node = node({"client": js, "op": "events", "args": {"customerId": "acme"}})
    in_python = py.events("acme")
    assert [e.type for e in in_python] == [
        "approved",
        "threshold",
        "refused",
        "recorded",
        "recorded",
    ]
    as_python = [
        {
            "id": e.id,
            "type": e.type,
            "time": round(e.time.timestamp() * 1000),
            "customerId": e.customer_id,
            "agentId": e.agent_id,
            "taskRef": e.task_ref,
            "units": e.units,
            "released": e.released,
            "reservationId": e.reservation_id,
            "reason": e.reason,
            "scope": e.scope,
            "period": e.period,
        }
        for e in in_python
    ]
    for event in in_node:  # a Date arrives as its ISO string
        event["time"] = round(datetime.fromisoformat(event["time"]).timestamp() * 1000)
    assert in_node == as_python


def _python_racer(url: str, namespace: str, customer: str, go: str) -> subprocess.Popen[str]:
    code = f"""
import os, time
from agentbill import AgentBillClient
client = AgentBillClient(redis_url={url!r}, namespace={namespace!r})
client.get_budget({customer!r})  # connected, scripts loaded: ready to race
print("ready", flush=True)
while not os.path.exists({go!r}):
    time.sleep(0.002)
approved = 0
while True:
    check = client.preflight("py", 1, {customer!r})
    if not check.approved:
        break
    approved += 1
    check.record(1)
print(approved)
"""
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )


def _node_racer(js: dict[str, Any], customer: str, go: str) -> subprocess.Popen[str]:
    step = {
        "client": js,
        "op": "race",
        "args": {"agentId": "js", "customerId": customer, "units": 1, "go": go},
    }
    return subprocess.Popen(
        ["node", str(WORKER), json.dumps(step)], stdout=subprocess.PIPE, text=True
    )


@pytest.mark.slow
def test_three_node_and_three_python_processes_racing_get_exactly_the_budget(
    py: AgentBillClient,
    js: dict[str, Any],
    redis_server: RedisServer,
    namespace: str,
    tmp_path: Path,
) -> None:
    budget = 150
    py.set_budget("hot", budget)
    go = str(tmp_path / "go")
    procs = [_python_racer(redis_server.url, namespace, "hot", go) for _ in range(3)]
    procs += [_node_racer(js, "hot", go) for _ in range(3)]
    for p in procs:  # every process connected and waiting at the line
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready"
    Path(go).touch()
    outputs = [p.communicate(timeout=120)[0].strip().splitlines()[-1] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    python_got = [int(out) for out in outputs[:3]]
    node_got = [json.loads(out)["ok"]["approved"] for out in outputs[3:]]
    assert sum(python_got) + sum(node_got) == budget
    assert all(json.loads(out)["ok"]["reason"] == "budget_exhausted" for out in outputs[3:])
    b = py.get_budget("hot")
    assert (b.spent, b.reserved, b.remaining) == (budget, 0, 0)
    # both languages took part (with 150 one-unit asks each side gets some)
    assert sum(python_got) > 0
    assert sum(node_got) > 0


def test_node_connects_to_the_local_server_python_started(namespace: str) -> None:
    from agentbill._local import ensure_local_server, stop_local_server

    home = tempfile.mkdtemp(prefix="abl-", dir="/tmp")  # short: a unix socket path is <= 107 B
    env = {"AGENTBILL_HOME": home}
    saved = {k: os.environ.get(k) for k in ("AGENTBILL_HOME", "AGENTBILL_REDIS_URL")}
    os.environ["AGENTBILL_HOME"] = home
    os.environ.pop("AGENTBILL_REDIS_URL", None)
    try:
        url = ensure_local_server()
        assert url.startswith("unix://")
        step = {
            "client": {"namespace": namespace},
            "op": "preflight",
            "args": {"agentId": "n", "estimatedUnits": 6, "customerId": "local"},
        }
        made = node(step, env={**env, "AGENTBILL_REDIS_URL": ""})
        assert made["approved"]
        with AgentBillClient(namespace=namespace) as c:  # no URL: the same local server
            assert c.get_budget("local").reserved == 6
            assert c.record("n", 6, reservation_id=made["reservationId"]).status == "recorded"
    finally:
        stop_local_server()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(home, ignore_errors=True)
    # With no server answering, Node says how to get one. (Still pointed at the stopped
    # server's home: the user's default one may be running on this machine.)
    gone = node_error({**step, "client": {"namespace": namespace}}, env={"AGENTBILL_HOME": home})
    assert gone["error"] == "StoreUnavailableError"
    assert "AGENTBILL_REDIS_URL" in gone["message"]


def test_a_tenant_key_from_python_authenticates_node_as_its_acl_user() -> None:
    server = AclRedisServer(admin_password="admin-pw").start()
    try:
        with KeyAdmin(redis_url=server.admin_url) as admin:
            issued = admin.create_key("acme corp")
        key = issued.api_key.get_secret_value()
        js = {"apiKey": key, "redisUrl": server.url}
        made = node(
            {
                "client": js,
                "op": "preflight",
                "args": {"agentId": "n", "estimatedUnits": 4, "customerId": "u"},
            }
        )
        assert made["approved"]
        with AgentBillClient(api_key=key, redis_url=server.url) as c:
            assert c.namespace == "acme corp"
            assert c.get_budget("u").reserved == 4
        wrong = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
        refused = node_error({"client": {**js, "apiKey": wrong}, "op": "getBudget", "args": {}})
        assert refused["error"] == "AuthenticationError"
        assert wrong.rsplit(".", 1)[1] not in refused["message"]
        other = node_error({"client": {**js, "namespace": "other"}, "op": "getBudget", "args": {}})
        assert (other["error"], other["field"]) == ("InvalidRequestError", "namespace")
        with KeyAdmin(redis_url=server.admin_url) as admin:
            admin.revoke_key(issued.key_id)
        revoked = node_error({"client": js, "op": "getBudget", "args": {"customerId": "u"}})
        assert revoked["error"] == "AuthenticationError"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    group = Cluster()
    try:
        yield group.start()
    finally:
        group.stop()


@pytest.mark.cluster
def test_a_tenant_key_works_for_node_over_a_cluster_url(cluster: Cluster) -> None:
    """A key from KeyAdmin on a Redis Cluster, used by the TypeScript client over
    redis+cluster:// (ioredis's Cluster): preflight, record and preflightMany for customers
    on every primary, within the commands the key's ACL user has on every node."""
    group = cluster
    with KeyAdmin(group.url) as admin:
        key = admin.create_key("acme").api_key.get_secret_value()
    customers = [f"customer-{i}" for i in range(9)]
    with AgentBillClient(api_key=key, redis_url=group.url) as c:
        for customer in customers:
            c.set_budget(customer, 10)
    asks: list[dict[str, Any]] = [
        {"agentId": "n", "estimatedUnits": 4, "customerId": c} for c in customers
    ]
    steps: list[dict[str, Any]] = [{"op": "preflight", "args": ask} for ask in asks]
    steps += [
        {"op": "record", "args": {"agentId": "n", "units": 3, "customerId": c}} for c in customers
    ]
    steps += [{"op": "preflightMany", "args": [{**ask, "estimatedUnits": 2} for ask in asks]}]
    results = node({"client": {"apiKey": key, "redisUrl": group.url}, "op": "steps", "args": steps})
    assert [r["approved"] for r in results[: len(customers)]] == [True] * len(customers)
    assert [r["charged"] for r in results[len(customers) : -1]] == [3] * len(customers)
    assert [r["approved"] for r in results[-1]] == [True] * len(customers)
    with AgentBillClient(api_key=key, redis_url=group.url) as c:
        for customer in customers:
            budget = c.get_budget(customer)
            assert (budget.spent, budget.reserved) == (3, 2), customer
    owners = 0
    for server in group.nodes:
        with server.client(decode_responses=True) as r:
            owners += r.dbsize() > 0
            assert r.acl_log() == [], "a command the key lacks was sent (and refused)"
    assert owners == len(group.nodes)


@pytest.mark.cluster
def test_node_reads_redirections_that_run_out_as_busy_as_python_does(
    cluster: Cluster, namespace: str
) -> None:
    """A slot left MIGRATING with no node importing it: ASK, MOVED back, until ioredis gives
    up ("Too many Cluster redirections"). The call ran nowhere: StoreBusyError, retried
    within the deadline, as Python's client reads redis-py's "TTL exhausted" (it was a plain
    StoreError, never retried)."""
    customer = "migrating"
    key = KeySpace(namespace).customer(customer).budget
    with cluster.nodes[0].client() as r:
        slot = int(r.execute_command("CLUSTER", "KEYSLOT", key))
    owner = next(n for i, n in enumerate(cluster.nodes) if i == min(slot // (16384 // 3), 2))
    target = next(n for n in cluster.nodes if n is not owner)
    with owner.client() as r:
        r.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", cluster.node_id(target))
    step = {
        "client": {"redisUrl": cluster.url, "namespace": namespace},
        "op": "setBudget",
        "args": {"customerId": customer, "limit": 5},
    }
    try:
        refused = node_error(step)
    finally:
        with owner.client() as r:
            r.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
    assert refused["error"] == "StoreBusyError", refused
    assert "TRYAGAIN" in refused["message"]
    assert node(step)["limit"] == 5


def test_node_takes_the_same_redis_answers_for_not_now_as_python() -> None:
    """Both clients read BUSY_CODES from lua/contract.json: a code only one of them retried
    would be a StoreBusyError in one language and a plain StoreError (never retried) in the
    other."""
    from agentbill._retry import BUSY_CODES

    script = f"import({json.dumps((TS / 'dist' / 'client.js').as_uri())})" + (
        ".then((m) => console.log(JSON.stringify(m.BUSY_CODES)))"
    )
    out = subprocess.run(
        ["node", "--input-type=module", "-e", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(out.stdout) == list(BUSY_CODES)
