"""The same scripts on a real 3-node Redis Cluster, through redis-py's RedisCluster.

Every key of one customer carries the customer's hash tag, so each script call touches one
slot and runs on whichever node owns it; customers spread over the nodes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import cast

import pytest
import redis
import redis.asyncio.cluster as async_cluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from agentbill import (
    AgentBillClient,
    AsyncAgentBillClient,
    LibraryNotLoadedError,
    Preflight,
    StoreBusyError,
)
from agentbill._keys import KeySpace, customer_tag
from agentbill._scripts import installed
from tests._async_facade import blocking_client
from tests._servers import Cluster
from tests.test_concurrency import Ask, check_budget_race, race, warm_up
from tests.test_topology import MATRIX, SERVERS, url_client

pytestmark = pytest.mark.cluster

Nodes = list[tuple[str, int]]


@pytest.fixture(scope="module", params=MATRIX)
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """On redis-server, then on valkey-server (the server matrix, see test_topology)."""
    nodes = Cluster(binary=SERVERS[request.param])
    try:
        yield nodes.start()
    finally:
        nodes.stop()


def cluster_redis(nodes: Nodes) -> RedisCluster:
    startup = [ClusterNode(host, port) for host, port in nodes]  # type: ignore[no-untyped-call]
    return RedisCluster(
        startup_nodes=startup,
        socket_connect_timeout=1.0,
        socket_timeout=2.0,
        # agentbill's own retry policy is the only retry layer, as for the client it builds.
        retry=Retry(NoBackoff(), 0),
    )


@contextmanager
def cluster_client(nodes: Nodes, namespace: str) -> Iterator[AgentBillClient]:
    with (
        cluster_redis(nodes) as rc,
        AgentBillClient(redis=rc, namespace=namespace) as client,
    ):
        yield client


@contextmanager
def async_cluster_client(nodes: Nodes, namespace: str) -> Iterator[AgentBillClient]:
    """AsyncAgentBillClient over redis.asyncio's RedisCluster, behind the blocking facade."""
    startup = [async_cluster.ClusterNode(host, port) for host, port in nodes]
    with asyncio.Runner() as runner:
        rc = async_cluster.RedisCluster(
            startup_nodes=startup,
            socket_connect_timeout=1.0,
            socket_timeout=2.0,
            retry=AsyncRetry(NoBackoff(), 0),
        )
        aclient = AsyncAgentBillClient(redis=rc, namespace=namespace)
        try:
            yield cast(AgentBillClient, blocking_client(aclient, runner))
        finally:
            runner.run(rc.aclose())


@pytest.fixture
def client(cluster: Cluster, namespace: str) -> Iterator[AgentBillClient]:
    with cluster_client(cluster.startup_nodes, namespace) as c:
        yield c


@pytest.fixture(params=["sync", "async"])
def both_clients(
    request: pytest.FixtureRequest, cluster: Cluster, namespace: str
) -> Iterator[AgentBillClient]:
    make = cluster_client if request.param == "sync" else async_cluster_client
    with make(cluster.startup_nodes, namespace) as c:
        yield c


CUSTOMERS = [f"customer-{i}" for i in range(50)]


def test_every_operation_works_for_customers_on_every_node(both_clients: AgentBillClient) -> None:
    client = both_clients
    for i, customer in enumerate(CUSTOMERS):
        limit, ceiling = 20 + i, 6
        assert client.set_budget(customer, limit).limit == limit
        assert client.open_task("task", ceiling, customer).ceiling == ceiling

        first = client.preflight("agent", 4, customer, task_ref="task")
        assert first.approved
        refused = client.preflight("agent", 4, customer, task_ref="task")
        assert refused.reason == "task_ceiling_exceeded"
        assert first.record(3).charged == 3

        other = client.preflight("agent", 2, customer)
        assert other.approved
        assert other.release().released == 2
        direct = client.record("other-agent", 1, customer)
        assert (direct.status, direct.charged) == ("direct", 1)

        budget = client.get_budget(customer)
        assert (budget.limit, budget.spent, budget.reserved) == (limit, 3 + 1, 0)
        assert budget.open_reservations == 0
        task = client.get_task("task", customer)
        assert (task.ceiling, task.used, task.reserved) == (ceiling, 3, 0)
        assert client.preflight("agent", limit, customer).reason == "budget_exhausted"


def test_preflight_many_spans_customers_on_every_node(
    both_clients: AgentBillClient, cluster: Cluster
) -> None:
    client = both_clients
    for customer in CUSTOMERS:
        client.set_budget(customer, 5)
    for host, port in cluster.startup_nodes:  # every node forgets the library: reload paths
        with redis.Redis(host=host, port=port) as node:
            node.function_flush()
    asks = [Preflight("agent", units, c) for c in CUSTOMERS for units in (3, 3)]
    checks = client.preflight_many(asks)
    assert [c.approved for c in checks] == [True, False] * len(CUSTOMERS)
    for customer in CUSTOMERS:
        assert client.get_budget(customer).reserved == 3


def test_each_customer_lives_in_one_slot_and_customers_spread_over_nodes(
    cluster: Cluster, client: AgentBillClient, namespace: str
) -> None:
    for customer in CUSTOMERS:
        client.preflight("agent", 1, customer)  # writes the budget, reservation and index keys

    nodes_of: dict[str, set[int]] = {}
    slots_of: dict[str, set[int]] = {}
    for node in cluster.nodes:
        with node.client(decode_responses=True) as r:
            for key in r.scan_iter(match=KeySpace(namespace).pattern(), count=1000):
                tag = key.split("{", 1)[1].split("}", 1)[0]
                nodes_of.setdefault(tag, set()).add(node.port)
                slot = int(r.execute_command("CLUSTER", "KEYSLOT", key))
                slots_of.setdefault(tag, set()).add(slot)

    assert set(nodes_of) == {customer_tag(c) for c in CUSTOMERS}
    assert all(len(nodes) == 1 for nodes in nodes_of.values())
    assert all(len(slots) == 1 for slots in slots_of.values())
    assert len(set().union(*nodes_of.values())) >= 2


@pytest.mark.parametrize("forget", ["flush", "delete"])
def test_the_library_is_loaded_again_on_every_primary_after_it_was_removed(
    cluster: Cluster, both_clients: AgentBillClient, forget: str
) -> None:
    """FUNCTION FLUSH (or DELETE) on every node: the first call a node answers "Function not
    found" loads the library on every primary, and the call is sent once more."""
    client = both_clients
    customers = CUSTOMERS[:10]
    for customer in customers:
        client.set_budget(customer, 10)
    assert all(loaded(cluster)), "every primary has the library before it is removed"
    for node in cluster.nodes:
        with node.client() as r:
            if forget == "flush":
                r.function_flush()
            else:
                r.function_delete(installed().name)
    assert not any(loaded(cluster))

    for customer in customers:
        check = client.preflight("agent", 4, customer)
        assert check.approved
        assert check.record(4).charged == 4
        assert client.get_budget(customer).spent == 4
    assert all(loaded(cluster))


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_user_who_may_not_load_the_library_gets_library_not_loaded_naming_the_node(
    cluster: Cluster, namespace: str, kind: str
) -> None:
    """A user with FCALL but not FUNCTION (a tenant key's position), the library gone from
    every primary: LibraryNotLoadedError naming a primary; once an operator loaded it on every
    primary, the same client works."""
    for node in cluster.nodes:
        with node.client() as r:
            r.acl_setuser(
                "caller", enabled=True, passwords=["+secret"], keys=["*"], commands=["+@all",
                "-function"]
            )  # fmt: skip
            r.function_flush()
    url = cluster.url.replace("redis+cluster://", "redis+cluster://caller:secret@")
    primaries = {f"127.0.0.1:{node.port}" for node in cluster.nodes}
    with url_client(kind, url, namespace) as client:
        with pytest.raises(LibraryNotLoadedError) as caught:
            client.preflight("agent", 1, CUSTOMERS[0])
        assert (caught.value.library, caught.value.node in primaries) == (installed().name, True)
        assert "`agentbill keys load-library`" in str(caught.value)
        with pytest.raises(LibraryNotLoadedError):
            client.preflight_many([Preflight("agent", 1, c) for c in CUSTOMERS[:10]])
        assert not any(loaded(cluster))
        for node in cluster.nodes:
            with node.client() as r:
                r.function_load(installed().text)
        assert client.preflight("agent", 1, CUSTOMERS[0]).approved


def loaded(cluster: Cluster) -> list[bool]:
    """Whether each primary has agentbill's library."""
    out = []
    for node in cluster.nodes:
        with node.client() as r:
            out.append(bool(r.function_list(library=installed().name)))
    return out


def test_racing_preflights_never_approve_more_than_the_budget(
    cluster: Cluster, client: AgentBillClient, namespace: str
) -> None:
    racers, limit = 10, 8
    asks = [Ask(f"race-{units}-{i}", units) for i in range(3) for units in (limit, 1)]
    for ask in asks:
        client.set_budget(ask.customer, limit)
    warm_up(client)

    by_ask = race(partial(cluster_client, cluster.startup_nodes), namespace, racers, asks)

    check_budget_race(client, by_ask, racers, limit)


def test_a_call_redirected_until_redis_py_gives_up_is_busy_and_lands_later(
    cluster: Cluster, both_clients: AgentBillClient, namespace: str
) -> None:
    """A slot left MIGRATING on its owner with no node importing it: the owner answers ASK,
    the target MOVED back, until redis-py's cluster client gives up ("TTL exhausted"). Every
    hop was a redirection, so the call ran nowhere: the retry policy tries again, then
    StoreBusyError (it was a bare StoreError, never retried). Once the slot is stable the
    same calls land."""
    client = both_clients
    customer = "migrating"
    key = KeySpace(namespace).customer(customer).budget
    with cluster.nodes[0].client() as r:
        slot = int(r.execute_command("CLUSTER", "KEYSLOT", key))
        ranges = r.execute_command("CLUSTER", "SLOTS")
    owner_port = next(int(rng[2][1]) for rng in ranges if int(rng[0]) <= slot <= int(rng[1]))
    owner = next(n for n in cluster.nodes if n.port == owner_port)
    target = next(n for n in cluster.nodes if n is not owner)
    with owner.client() as r:
        r.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", cluster.node_id(target))
    try:
        with pytest.raises(StoreBusyError) as info:
            client.set_budget(customer, 10)
        assert info.value.code == "TRYAGAIN"
        assert "TTL exhausted" in str(info.value)
    finally:
        with owner.client() as r:
            r.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
    assert client.set_budget(customer, 10).limit == 10
    assert client.preflight("agent", 4, customer).approved
