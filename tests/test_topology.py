"""One URL per topology: redis+cluster:// and redis+sentinel:// for both clients, the CLI and
KeyAdmin, against a real cluster (3 primaries, a replica each) and a real Sentinel set (a
master, a replica, 3 sentinels) the suite starts; tenant keys on every node of each. Every
test runs on redis-server and on valkey-server (the server matrix)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import pytest
import redis
from redis import exceptions as rx
from redis._parsers.helpers import parse_cluster_nodes
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.retry import Retry

import agentbill
from agentbill import (
    AgentBillClient,
    AsyncAgentBillClient,
    AuthenticationError,
    InvalidRequestError,
    KeyAdmin,
    NodesUnreachableError,
    Preflight,
    StoreUnavailableError,
)
from agentbill._keys import KeySpace
from agentbill._scripts import installed
from agentbill._topology import parse
from tests._async_facade import blocking_client
from tests._cli import cli_env, invoke
from tests._servers import (
    Cluster,
    RedisServer,
    SentinelSet,
    TlsFiles,
    free_port,
    make_tls_files,
    valkey_binary,
)

pytestmark = pytest.mark.cluster

ADMIN_PASSWORD = "admin-secret-for-tests"
CUSTOMERS = [f"customer-{i}" for i in range(12)]  # spread over the three primaries


# -- parsing (no server) -------------------------------------------------------------------------


def test_cluster_and_sentinel_urls_parse_into_nodes_service_and_credentials() -> None:
    cluster = parse("redis+cluster://u:p%40ss@a:7000,b,[::1]:7002/0?socket_keepalive=true")
    assert cluster is not None
    assert cluster.kind == "cluster"
    assert cluster.nodes == (("a", 7000), ("b", 6379), ("::1", 7002))
    assert (cluster.options["username"], cluster.options["password"]) == ("u", "p@ss")
    assert not cluster.tls

    sentinel = parse(
        "rediss+sentinel://:mpw@s1:5000,s2/prod/2?sentinel_password=spw&ssl_cert_reqs=none"
    )
    assert sentinel is not None
    assert sentinel.kind == "sentinel"
    assert sentinel.nodes == (("s1", 5000), ("s2", 26379))
    assert (sentinel.service, sentinel.options["db"], sentinel.options["password"]) == (
        "prod",
        2,
        "mpw",
    )
    assert sentinel.sentinel_options == {"password": "spw"}
    assert sentinel.tls
    assert sentinel.options["ssl_cert_reqs"] == "none"

    assert parse("redis://localhost:6379/0") is None
    assert parse("unix:///tmp/redis.sock") is None


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://a:1,b:2/3",  # a cluster has database 0 only
        "redis+sentinel://s1:1,s2:2",  # no service name
        "redis+cluster://:pw@/0",  # no host
        "redis+cluster://a:notaport/0",
        "memcached://a:1",
    ],
)
def test_a_bad_topology_url_is_an_error_naming_redis_url(url: str) -> None:
    for make in (AgentBillClient, AsyncAgentBillClient):
        with pytest.raises(InvalidRequestError) as info:
            make(redis_url=url)
        assert info.value.field == "redis_url"
        assert "pw" not in str(info.value)
    with pytest.raises(InvalidRequestError) as info:
        KeyAdmin(url)
    assert info.value.field == "redis_url"


@pytest.mark.parametrize(
    ("url", "named"),
    [
        # An unknown query argument: refused at construction, named (it was a TypeError at
        # the first call on Sentinel, and dropped unseen by the async cluster client).
        ("redis+sentinel://:hunter2@s1:26379/svc?bogus=1", "bogus"),
        ("redis+cluster://:hunter2@a:7000?socket_keepalive=1&bogus=1", "bogus"),
        # Port 0 is no port (it was read as 6379 / 26379).
        ("redis+cluster://:hunter2@a:7000,b:0", "port 0"),
        ("redis+sentinel://:hunter2@s1:0/svc", "port 0"),
        ("redis://:hunter2@a:0/0", "port 0"),
        # A cluster has database 0 only (these were read as 0).
        ("redis+cluster://:hunter2@a:7000/abc", "path other than /0"),
        ("redis+cluster://:hunter2@a:7000/0/extra", "path other than /0"),
        ("redis+cluster://:hunter2@a:7000?db=2", "database other than 0"),
        ("redis+sentinel://:hunter2@s1/svc/abc", "not a number"),
        # A malformed %-escape in the credentials (Python took it as it was).
        ("redis://u:hunter2%zz@a:6379/0", "%-escape"),
        ("redis+cluster://u:hunter2%ff@a:7000", "%-escape"),
    ],
)
def test_a_refused_url_names_the_problem_at_construction(url: str, named: str) -> None:
    for make in (AgentBillClient, AsyncAgentBillClient, KeyAdmin):
        with pytest.raises(InvalidRequestError) as info:
            make(redis_url=url)
        assert info.value.field == "redis_url"
        assert named in info.value.message
        assert "hunter2" not in str(info.value)


# -- fixtures ------------------------------------------------------------------------------------


# The server matrix: the machine's redis-server, and the valkey-server agentbill-redis[local]
# installs (another server line and major version), where there is one.
SERVERS = {"redis": None, "valkey": valkey_binary()}
MATRIX = [name for name, binary in SERVERS.items() if name == "redis" or binary is not None]


@pytest.fixture(scope="module", params=MATRIX)
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    nodes = Cluster(replicas=1, binary=SERVERS[request.param])
    try:
        yield nodes.start()
    finally:
        nodes.stop()


@pytest.fixture(scope="module", params=MATRIX)
def sentinels(request: pytest.FixtureRequest) -> Iterator[SentinelSet]:
    group = SentinelSet(password=ADMIN_PASSWORD, binary=SERVERS[request.param])
    try:
        yield group.start()
    finally:
        group.stop()


@contextmanager
def url_client(
    kind: str, url: str, namespace: str, api_key: str | None = None, **options: Any
) -> Iterator[AgentBillClient]:
    """A sync client, or an async one behind the blocking facade, for ``url``."""
    if kind == "sync":
        with AgentBillClient(api_key, redis_url=url, namespace=namespace, **options) as client:
            yield client
        return
    with asyncio.Runner() as runner:
        aclient = AsyncAgentBillClient(api_key, redis_url=url, namespace=namespace, **options)
        try:
            yield cast(AgentBillClient, blocking_client(aclient, runner))
        finally:
            runner.run(aclient.close())


def exercise(client: AgentBillClient, customers: list[str]) -> None:
    """Every kind of write and read, for customers on every node."""
    for i, customer in enumerate(customers):
        limit = 20 + i
        assert client.set_budget(customer, limit).limit == limit
        check = client.preflight("agent", 4, customer)
        assert check.approved
        assert check.record(3).charged == 3
        assert client.record("agent", 1, customer).charged == 1
        assert client.get_budget(customer).spent == 4
    checks = client.preflight_many([Preflight("agent", 2, c) for c in customers])
    assert all(c.approved for c in checks)
    for check in checks:
        assert check.release().released == 2
    assert client.get_usage(customers[0]).customer.spent == 4


# -- Redis Cluster -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_cluster_url_reaches_customers_on_every_node(
    kind: str, cluster: Cluster, namespace: str
) -> None:
    with url_client(kind, cluster.url, namespace) as client:
        exercise(client, CUSTOMERS)
    owners = set()
    for node in cluster.nodes:
        with node.client() as r:
            if any(True for _ in r.scan_iter(match=KeySpace(namespace).pattern(), count=1000)):
                owners.add(node.port)
    assert len(owners) == len(cluster.nodes)


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("path", ["/", "/0", "/?db=0"])
def test_a_cluster_url_may_name_database_0(
    kind: str, path: str, cluster: Cluster, namespace: str
) -> None:
    """The form the docs show, ``.../0``: the sync client refused it before (redis-py's
    RedisCluster takes no ``db``, not even 0)."""
    with url_client(kind, cluster.url + path, namespace) as client:
        assert client.set_budget(CUSTOMERS[0], 7).limit == 7


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_plain_url_to_a_cluster_node_names_the_cluster_form(
    kind: str, cluster: Cluster, namespace: str
) -> None:
    node = cluster.nodes[0]
    errors = []
    with url_client(kind, node.url, namespace) as client:
        for customer in CUSTOMERS:
            try:
                client.preflight("agent", 1, customer)
            except InvalidRequestError as exc:
                errors.append(exc)
    # The customers on this node's slots work; each of the others raised, naming the fix.
    assert 0 < len(errors) < len(CUSTOMERS)
    assert all(e.field == "redis_url" and "redis+cluster://" in str(e) for e in errors)


def test_the_cli_takes_a_cluster_url(cluster: Cluster, namespace: str) -> None:
    env = cli_env(cluster.url, namespace)
    for customer in CUSTOMERS[:6]:
        assert invoke("budget", "set", customer, "40", env=env).code == 0
    got = invoke("budget", "get", CUSTOMERS[5], "--json", env=env)
    assert got.code == 0
    assert json.loads(got.stdout)["limit"] == 40


def raw_as(node: RedisServer, username: str, password: str) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=node.port, username=username, password=password)


def assert_confined(node: RedisServer, username: str, password: str, own: str) -> None:
    """As the tenant, on this node: another namespace's keys are refused (NOPERM) by every
    command it has, its own are not (a cluster node may still redirect them: MOVED), and no
    code of its own runs (EVAL, EVALSHA, SCRIPT, FUNCTION)."""
    get_budget = installed().function("get_budget")
    with raw_as(node, username, password) as r:
        for args in (
            ("GET", "other:{x}:budget"),
            ("SET", "other:{x}:budget", "1"),
            ("HSET", "other:{x}:h", "f", "1"),
            ("FCALL", get_budget, "1", "other:{x}:budget"),
            ("EVAL", "return 1", "0"),
            ("EVALSHA", "0" * 40, "1", f"{own}:{{x}}:budget"),
            ("SCRIPT", "LOAD", "return 1"),
            ("FUNCTION", "LOAD", "#!lua name=mine\nredis.register_function('f', tostring)"),
            ("FUNCTION", "FLUSH"),
            ("FUNCTION", "DELETE", installed().name),
            ("FLUSHALL",),
            ("KEYS", "*"),
            ("CONFIG", "GET", "*"),
            ("ACL", "WHOAMI"),
        ):
            with pytest.raises(rx.NoPermissionError):
                r.execute_command(*args)
        with contextlib.suppress(rx.MovedError):  # the key's slot may live on another node
            r.execute_command("GET", f"{own}:{{x}}:budget")


def test_tenant_keys_on_a_cluster_live_on_every_node_and_stay_confined(
    cluster: Cluster, namespace: str
) -> None:
    with KeyAdmin(cluster.url) as admin:
        issued = admin.create_key(namespace)
        assert issued.key_id in {k.key_id for k in admin.list_keys(namespace)}
    for node in cluster.all_nodes:  # loaded on each primary, copied to its replica
        wait_until(lambda node=node: has_library(node))
    api_key = issued.api_key.get_secret_value()
    secret = api_key.rsplit(".", 1)[1]
    for node in cluster.all_nodes:  # primaries and replicas
        with node.client(decode_responses=True) as r:
            rules = r.acl_getuser(issued.username)
        assert rules is not None, f"no user on node {node.port}"
        assert rules["keys"] == [f"~{namespace}:*"] or rules["keys"] == f"~{namespace}:*"
        assert_confined(node, issued.username, secret, namespace)

    for kind in ("sync", "async"):
        with url_client(kind, cluster.url, "agentbill", api_key) as client:
            exercise(client, [f"{kind}-{c}" for c in CUSTOMERS])

    with KeyAdmin(cluster.url) as admin:
        admin.revoke_key(issued.key_id)
    for node in cluster.all_nodes:
        with node.client() as r:
            assert r.acl_getuser(issued.username) is None
    for kind in ("sync", "async"):
        with (
            pytest.raises(AuthenticationError),
            url_client(kind, cluster.url, "agentbill", api_key) as client,
        ):
            client.preflight("agent", 1, CUSTOMERS[0])


def has_library(node: RedisServer) -> bool:
    with node.client() as r:
        return bool(r.function_list(library=installed().name))


def test_load_library_loads_every_cluster_primary_and_skips_replicas(
    cluster: Cluster, namespace: str
) -> None:
    """After FUNCTION FLUSH on every primary a tenant's calls raise LibraryNotLoadedError on
    every node (its key cannot load the library); load_library loads it on each primary,
    replicas copy it, and the tenant's client works again."""
    with KeyAdmin(cluster.url) as admin:
        issued = admin.create_key(namespace)
    api_key = issued.api_key.get_secret_value()
    for node in cluster.nodes:
        with node.client() as r:
            r.function_flush()
    for node in cluster.all_nodes:
        wait_until(lambda node=node: not has_library(node))
    with url_client("sync", cluster.url, "agentbill", api_key) as client:
        for customer in CUSTOMERS:  # customers on every primary
            with pytest.raises(agentbill.LibraryNotLoadedError):
                client.get_budget(customer)

        with KeyAdmin(cluster.url) as admin:
            loaded = admin.load_library()
        assert loaded.name == installed().name
        assert sorted(loaded.primaries) == sorted(f"127.0.0.1:{n.port}" for n in cluster.nodes)
        assert sorted(loaded.replicas) == sorted(f"127.0.0.1:{n.port}" for n in cluster.replicas)
        for node in cluster.all_nodes:
            wait_until(lambda node=node: has_library(node))
        exercise(client, CUSTOMERS)


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, TlsFiles]]:
    """3 primaries that take TLS clients (and talk TLS on the cluster bus) on a port of
    their own, besides the plain one the fixture sets them up through."""
    tls = make_tls_files(tmp_path_factory.mktemp("tls"))
    group = Cluster()
    for node in group.nodes:
        node.config |= {
            "tls-port": str(free_port()),
            "tls-cert-file": str(tls.cert),
            "tls-key-file": str(tls.key),
            "tls-ca-cert-file": str(tls.ca),
            "tls-auth-clients": "no",
            "tls-cluster": "yes",
            "cluster-port": str(node.port + 10000),  # free_cluster_port checked it
        }
    try:
        yield group.start(), tls
    finally:
        group.stop()


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_tls_cluster_url_reaches_every_node(
    kind: str, tls_cluster: tuple[Cluster, TlsFiles], namespace: str
) -> None:
    """rediss+cluster:// over the TLS ports (a plain client there is refused). The sync
    client could not be built before: RedisCluster took connection_class=SSLConnection for
    its nodes' Redis(), which refuses it (it takes ssl=True and the ssl_* options)."""
    group, tls = tls_cluster
    hosts = ",".join(f"127.0.0.1:{n.config['tls-port']}" for n in group.nodes)
    url = f"rediss+cluster://{hosts}?ssl_ca_certs={tls.ca}"
    with url_client(kind, url, namespace) as client:
        for customer in CUSTOMERS:
            client.set_budget(customer, 5)
        checks = client.preflight_many([Preflight("agent", 2, c) for c in CUSTOMERS])
        assert all(check.approved for check in checks)
        assert checks[0].record(1).charged == 1
    port = int(group.nodes[0].config["tls-port"])
    plain = redis.Redis(port=port, socket_timeout=1, retry=Retry(NoBackoff(), 0))  # refused once
    with plain, pytest.raises(rx.ConnectionError):
        plain.ping()


# -- Sentinel ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_sentinel_url_reaches_the_master(
    kind: str, sentinels: SentinelSet, namespace: str
) -> None:
    url = sentinels.admin_url  # the data nodes want the password; the sentinels do not
    with url_client(kind, url, namespace) as client:
        exercise(client, CUSTOMERS[:4])
    with sentinels.node_client(sentinels.master, decode_responses=True) as r:
        assert any(True for _ in r.scan_iter(match=KeySpace(namespace).pattern()))


def test_tenant_keys_on_a_sentinel_set_live_on_master_and_replicas(
    sentinels: SentinelSet, namespace: str
) -> None:
    with KeyAdmin(sentinels.admin_url) as admin:
        issued = admin.create_key(namespace)
    api_key = issued.api_key.get_secret_value()
    secret = api_key.rsplit(".", 1)[1]
    for node in sentinels.data_nodes:
        with sentinels.node_client(node, decode_responses=True) as r:
            assert r.acl_getuser(issued.username) is not None, f"no user on {node.port}"
            # Loaded on the master, copied to the replicas.
            wait_until(lambda r=r: bool(r.function_list(library=installed().name)))
        assert_confined(node, issued.username, secret, namespace)
    for sentinel in sentinels.sentinels:  # the sentinels get none
        with sentinel.client(decode_responses=True) as r:
            assert issued.username not in r.acl_users()

    for kind in ("sync", "async"):  # replicated: the key may WAIT
        with url_client(
            kind, sentinels.url, "agentbill", api_key, durability="replicated"
        ) as client:
            exercise(client, [f"{kind}-{c}" for c in CUSTOMERS[:3]])

    env = cli_env(None, None) | {"AGENTBILL_ADMIN_URL": sentinels.admin_url}
    listed = invoke("keys", "list", "--json", env=env)
    assert listed.code == 0
    assert issued.key_id in listed.stdout
    assert invoke("keys", "revoke", issued.key_id, env=env).code == 0
    for node in sentinels.data_nodes:
        with sentinels.node_client(node) as r:
            assert r.acl_getuser(issued.username) is None


def test_a_tenant_key_refuses_credentials_in_a_topology_url(cluster: Cluster) -> None:
    key = "agb_acme.0123456789abcdef." + "s" * 43
    with pytest.raises(InvalidRequestError) as info:
        AgentBillClient(key, redis_url=cluster.url.replace("://", "://u:p@", 1))
    assert info.value.field == "redis_url"
    assert os.environ.get("AGENTBILL_API_KEY") is None


def test_key_admin_takes_a_ready_cluster_client(cluster: Cluster, namespace: str) -> None:
    startup = [ClusterNode(host, port) for host, port in cluster.startup_nodes]  # type: ignore[no-untyped-call]
    with RedisCluster(startup_nodes=startup) as rc, KeyAdmin(redis=rc) as admin:
        issued = admin.create_key(namespace)
        for node in cluster.all_nodes:
            with node.client() as r:
                assert r.acl_getuser(issued.username) is not None, node.port
        admin.revoke_key(issued.key_id)
        for node in cluster.all_nodes:
            with node.client() as r:
                assert r.acl_getuser(issued.username) is None, node.port


def test_a_queued_record_sent_to_the_wrong_cluster_node_waits_and_is_never_dropped(
    cluster: Cluster, namespace: str
) -> None:
    node = cluster.nodes[0]
    with AgentBillClient(redis_url=cluster.url, namespace=namespace) as right:
        checks = {c: right.preflight("agent", 5, c) for c in CUSTOMERS}
    with AgentBillClient(redis_url=node.url, namespace=namespace, background_settle=True) as wrong:
        wrong._flusher.stop()  # deliver by hand, below
        for check in checks.values():
            wrong.record("agent", 3, check.customer_id, reservation_id=check.reservation_id)
        left = wrong.flush()
        stats = wrong.outage_stats
        assert 0 < left < len(CUSTOMERS)  # this node's customers delivered, the others wait
        assert stats.dropped == 0
        # Forget the rest, or close() would try them until its last-delivery deadline.
        wrong._outage.finish(wrong._outage.take(), [], [], wrong._release_plan)
    with AgentBillClient(redis_url=cluster.url, namespace=namespace) as right:
        spent = [right.get_budget(c).spent for c in CUSTOMERS]
    assert sorted(set(spent)) == [0, 3]


def test_a_primary_down_leaves_the_other_primaries_working(namespace: str) -> None:
    """`cluster-require-full-coverage no`, and the primary of slot 0 (redis-py's default
    node) killed with no replica to promote: new clients are built, and calls for the
    customers on the other primaries work, the library loaded again included (every node
    forgot it); calls on the dead primary's slots raise StoreUnavailableError. Before, the sync
    client could not be built (COMMAND went to the dead node alone) and every async call
    failed (COMMAND, then SCRIPT LOAD sent to every primary); redis-py's own FUNCTION LOAD
    goes to every primary too, and its FCALL asks the default node for the call's keys."""
    group = Cluster(extra={"cluster-require-full-coverage": "no"}).start()
    try:
        with AgentBillClient(redis_url=group.url, namespace=namespace) as client:
            for customer in CUSTOMERS:
                client.set_budget(customer, 10)
        dead = group.nodes[0]  # slots 0 to 5460
        slots = {c: key_slot(KeySpace(namespace).customer(c).budget.encode()) for c in CUSTOMERS}
        lost = {c for c, slot in slots.items() if slot < 16384 // 3}
        assert 0 < len(lost) < len(CUSTOMERS)
        dead.kill()
        for node in group.nodes[1:]:
            with node.client() as r:
                r.function_flush()
        for kind in ("sync", "async"):
            with url_client(kind, group.url, namespace) as client:
                for customer in CUSTOMERS:
                    if customer in lost:
                        with pytest.raises(StoreUnavailableError):
                            client.preflight("agent", 1, customer)
                    else:
                        assert client.preflight("agent", 1, customer).approved
                alive = [Preflight("agent", 1, c) for c in CUSTOMERS if c not in lost]
                assert all(check.approved for check in client.preflight_many(alive))
    finally:
        group.stop()


# -- a data node down while keys change ----------------------------------------------------------


# A replica's first sync starts at once (the default waits 5 s for more replicas), and CLUSTER
# SLOTS lists it within a second (only once its offset moved: the master's pings every 10 s).
FAST_SYNC = {"repl-ping-replica-period": "1"}


def wait_until(condition: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def users_on(node: RedisServer) -> set[str]:
    with node.client(decode_responses=True) as r:
        return {name for name in r.acl_users() if name.startswith("agentbill:")}


def marked_failed(cluster: Cluster, node: RedisServer) -> bool:
    """Whether the cluster's first primary flags ``node`` as failed (CLUSTER SLOTS, and so
    redis-py's node list, then leave it out)."""
    with cluster.nodes[0].client(decode_responses=True) as r:
        text = r.execute_command("CLUSTER", "NODES")
    nodes = text if isinstance(text, dict) else parse_cluster_nodes(text)  # type: ignore[no-untyped-call]
    return "fail" in nodes[f"127.0.0.1:{node.port}"]["flags"].split(",")


def test_a_key_change_with_a_replica_down_reaches_every_other_node_and_names_it(
    namespace: str,
) -> None:
    """A replica just killed (still listed as healthy), then flagged failed (CLUSTER SLOTS
    leaves it out): revoke deletes the key on every node it reaches and raises naming the
    replica, create creates nothing anywhere; once the replica is back (its aclfile still
    holds the keys) a second revoke finishes the job. Before: the just-killed replica made
    revoke raise having revoked nothing, and the failed one was skipped with a success."""
    # Two primaries: a node is flagged failed once a majority of primaries report it.
    group = Cluster(size=2, replicas=1, aclfile=True, node_timeout=500, extra=FAST_SYNC).start()
    try:
        replica = group.replicas[0]
        with KeyAdmin(group.url) as admin:
            first, second = admin.create_key(namespace), admin.create_key(namespace)
        assert users_on(replica) == {first.username, second.username}
        replica.kill()
        down = f"127.0.0.1:{replica.port}"
        up = [n for n in group.all_nodes if n is not replica]

        with KeyAdmin(group.url) as admin, pytest.raises(NodesUnreachableError) as info:
            admin.revoke_key(first.key_id)
        assert (info.value.nodes, info.value.key_id) == ((down,), first.key_id)
        assert down in str(info.value)
        assert "run the revoke again" in str(info.value)
        assert all(users_on(n) == {second.username} for n in up)

        wait_until(lambda: marked_failed(group, replica))
        startup = [ClusterNode(h, p) for h, p in group.startup_nodes]  # type: ignore[no-untyped-call]
        with RedisCluster(startup_nodes=startup, retry=Retry(NoBackoff(), 0)) as rc:
            assert down not in {n.name for n in rc.get_nodes()}  # what KeyAdmin used to ask
            for admin in (KeyAdmin(group.url), KeyAdmin(redis=rc)):
                with admin, pytest.raises(NodesUnreachableError) as info:
                    admin.create_key(namespace)
                assert info.value.nodes == (down,)
                assert "no key was created" in str(info.value)
                with pytest.raises(NodesUnreachableError):
                    admin.list_keys()
                with pytest.raises(NodesUnreachableError) as info:  # loaded on both primaries
                    admin.load_library()
                assert info.value.nodes == (down,)
                assert "was loaded on 2 primaries" in str(info.value)
        assert all(users_on(n) == {second.username} for n in up)
        with KeyAdmin(group.url) as admin, pytest.raises(NodesUnreachableError) as info:
            admin.revoke_key(second.key_id)
        assert info.value.nodes == (down,)
        assert all(users_on(n) == set() for n in up)

        replica.start()  # it loads its aclfile: both keys work there again
        assert users_on(replica) == {first.username, second.username}
        with KeyAdmin(group.url) as admin:
            assert {k.key_id for k in admin.list_keys()} == {first.key_id, second.key_id}
            admin.revoke_key(first.key_id)
            admin.revoke_key(second.key_id)
        assert all(users_on(n) == set() for n in group.all_nodes)
    finally:
        group.stop()


def test_a_key_revoke_with_a_sentinel_replica_down_names_it(namespace: str) -> None:
    """A replica the sentinels flag down (s_down) is one redis-py's discover_slaves leaves
    out: revoke skipped it and reported success before. Now it is listed (SENTINEL REPLICAS),
    and the revoke, done on the master, raises naming it."""
    group = SentinelSet(password=ADMIN_PASSWORD, sentinels=1, down_after_ms=300)
    for node in group.data_nodes:
        node.config |= FAST_SYNC
    group.start()
    try:
        with KeyAdmin(group.admin_url) as admin:
            issued = admin.create_key(namespace)
        replica = group.replicas[0]
        replica.kill()
        with group.sentinels[0].client(decode_responses=True) as sentinel:
            wait_until(lambda: "s_down" in sentinel.sentinel_slaves(group.service)[0]["flags"])
        with KeyAdmin(group.admin_url) as admin, pytest.raises(NodesUnreachableError) as info:
            admin.revoke_key(issued.key_id)
        assert info.value.nodes == (f"127.0.0.1:{replica.port}",)
        with group.node_client(group.master, decode_responses=True) as r:
            assert r.acl_getuser(issued.username) is None
    finally:
        group.stop()
