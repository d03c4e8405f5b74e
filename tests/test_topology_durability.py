"""durability="replicated": a write returns once a replica has it, on a real primary and
replica the suite starts (redis-server, and valkey-server where installed); a replica that
cannot confirm makes the call fail in doubt, and the retry with the same request id charges
once."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from agentbill import AgentBillClient, InvalidRequestError, Preflight, StoreUnavailableError
from agentbill._keys import KeySpace
from tests._servers import Cluster, RedisServer, free_port
from tests.test_topology import FAST_SYNC, MATRIX, SERVERS, url_client, wait_until


@pytest.fixture(scope="module", params=MATRIX)
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[RedisServer, RedisServer]]:
    """A primary and its replica (of the machine's redis-server, then valkey-server)."""
    binary: Path | None = SERVERS[request.param]
    primary = RedisServer(binary=binary).start()
    replica = RedisServer(binary=binary, extra={"replicaof": f"127.0.0.1 {primary.port}"}).start()
    try:
        with replica.client() as r:
            while r.info("replication")["master_link_status"] != "up":
                time.sleep(0.02)
        yield primary, replica
    finally:
        replica.stop()
        primary.stop()


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_replicated_write_is_on_the_replica_when_the_call_returns(
    kind: str, pair: tuple[RedisServer, RedisServer], namespace: str
) -> None:
    primary, replica = pair
    with url_client(kind, primary.url, namespace, durability="replicated") as client:
        client.set_budget("acme", 100)
        check = client.preflight("agent", 10, "acme")
        assert check.approved
        assert check.record(7).charged == 7
        checks = client.preflight_many([Preflight("agent", 1, "acme")] * 3)
        assert all(c.approved for c in checks)
        assert client.get_budget("acme").spent == 7
    with primary.client(decode_responses=True) as p, replica.client(decode_responses=True) as r:
        keys = sorted(p.scan_iter(match=KeySpace(namespace).pattern()))
        assert keys
        assert sorted(r.scan_iter(match=KeySpace(namespace).pattern())) == keys


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_stopped_replica_fails_the_write_in_doubt_and_the_retry_charges_once(
    kind: str, pair: tuple[RedisServer, RedisServer], namespace: str
) -> None:
    primary, replica = pair
    with url_client(
        kind, primary.url, namespace, durability="replicated", retry_deadline=0.5
    ) as client:
        client.set_budget("acme", 100)
        check = client.preflight("agent", 10, "acme", idempotency_key="job-1")
        replica.pause()
        try:
            with pytest.raises(StoreUnavailableError, match="replica"):
                check.record(6)
            with pytest.raises(StoreUnavailableError, match="replica"):
                client.preflight("agent", 20, "acme", idempotency_key="job-2")
            with pytest.raises(StoreUnavailableError, match="replica"):
                client.preflight_many([Preflight("agent", 1, "acme", idempotency_key="job-3")])
            assert client.get_budget("acme").spent in (0, 6)  # reads do not wait: in doubt
        finally:
            replica.resume()
        # The same calls again, with the same ids: each lands once.
        assert check.record(6).charged == 6
        again = client.preflight("agent", 20, "acme", idempotency_key="job-2")
        assert again.approved
        client.preflight_many([Preflight("agent", 1, "acme", idempotency_key="job-3")])
        budget = client.get_budget("acme")
        assert (budget.spent, budget.reserved) == (6, 21)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_an_extension_waits_for_the_replica_like_every_other_write(
    kind: str, pair: tuple[RedisServer, RedisServer], namespace: str
) -> None:
    """extend reserves more on an open reservation: a write, so it waits for the replica too
    (it returned at once, unconfirmed, so a failover could lose units already approved)."""
    primary, replica = pair
    with url_client(
        kind, primary.url, namespace, durability="replicated", retry_deadline=0.5
    ) as client:
        client.set_budget("acme", 100)
        check = client.preflight("agent", 10, "acme")
        replica.pause()
        try:
            with pytest.raises(StoreUnavailableError, match="replica"):
                check.extend(50)
        finally:
            replica.resume()
        assert client.get_budget("acme").reserved in (10, 60)  # in doubt, as a lost reply
        assert check.record(7).charged == 7
        assert (client.get_budget("acme").spent, client.get_budget("acme").reserved) == (7, 0)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_write_whose_primary_is_demoted_under_its_wait_is_in_doubt_and_charged_once(
    kind: str, namespace: str
) -> None:
    """A failover demotes the old primary while a write waits for its replica: Redis unblocks
    the WAIT with an error reply (UNBLOCKED), after the write ran. In doubt, like a lost reply:
    StoreUnavailableError, and the retry with the same request id charges once. It was a plain
    StoreError ("Redis refused the command"), which reads as a refusal and is not retried."""
    primary = RedisServer(extra=FAST_SYNC).start()
    replica = RedisServer(extra={**FAST_SYNC, "replicaof": f"127.0.0.1 {primary.port}"}).start()
    try:
        with replica.client() as r:
            while r.info("replication")["master_link_status"] != "up":
                time.sleep(0.02)
        with url_client(
            kind,
            primary.url,
            namespace,
            durability="replicated",
            socket_timeout=2.0,  # WAIT blocks up to 1 s: the demotion comes first
            retry_deadline=0.5,
        ) as client:
            client.set_budget("acme", 100)
            check = client.preflight("agent", 10, "acme")
            replica.pause()

            def demote() -> None:
                while True:  # once the record's WAIT is blocked on the primary
                    with primary.client() as p:
                        if p.info("clients")["blocked_clients"]:
                            p.execute_command("REPLICAOF", "127.0.0.1", free_port())
                            return
                    time.sleep(0.01)

            demoter = threading.Thread(target=demote)
            demoter.start()
            try:
                with pytest.raises(StoreUnavailableError):  # valkey may drop the connection
                    check.record(6)
            finally:
                demoter.join()
                with primary.client() as p:
                    p.execute_command("REPLICAOF", "NO", "ONE")
                replica.resume()
            assert check.record(6).charged == 6
            assert client.get_budget("acme").spent == 6
    finally:
        replica.stop()
        primary.stop()


def test_without_replicated_durability_a_stopped_replica_changes_nothing(
    pair: tuple[RedisServer, RedisServer], namespace: str
) -> None:
    primary, replica = pair
    with AgentBillClient(redis_url=primary.url, namespace=namespace) as client:
        replica.pause()
        try:
            assert client.preflight("agent", 1, "acme").approved
        finally:
            replica.resume()


# The steps Sentinel takes in a failover that leaves the old primary up (SENTINEL FAILOVER, a
# partition), done by hand so that no timing decides the outcome (report-attack12b, a6).
FAILOVER_SYNC = {**FAST_SYNC, "repl-diskless-sync-delay": "0"}


def follows(node: RedisServer, primary: RedisServer) -> bool:
    with node.client(decode_responses=True) as r:
        info = r.info("replication")
    return bool(info.get("master_port") == primary.port and info.get("master_link_status") == "up")


def serves(primary: RedisServer, replicas: int) -> bool:
    """A write on the primary reaches ``replicas`` replicas. (A replica that just synced is
    "online" before the primary streams to it: that waits for the replica's first ACK, up to a
    second later.)"""
    with primary.client() as r:
        r.set("waitall-probe", 1)
        return bool(r.wait(replicas, 100) == replicas)


@contextmanager
def two_replicas() -> Iterator[tuple[RedisServer, RedisServer, RedisServer]]:
    """A primary and its replicas A and B, in sync."""
    with ExitStack() as servers:
        primary = RedisServer(extra=FAILOVER_SYNC).start()
        servers.callback(primary.stop)
        pair = []
        for _ in range(2):
            node = RedisServer(extra={**FAILOVER_SYNC, "replicaof": f"127.0.0.1 {primary.port}"})
            servers.callback(node.start().stop)
            pair.append(node)
        a, b = pair
        wait_until(lambda: follows(a, primary) and follows(b, primary) and serves(primary, 2))
        yield primary, a, b


def promote(node: RedisServer, primary: RedisServer) -> None:
    """``node`` becomes a primary once it has everything ``primary`` wrote (as Sentinel would
    pick it); ``primary`` stays up, still a primary."""

    def offset(server: RedisServer, field: str) -> int:
        with server.client(decode_responses=True) as r:
            return int(r.info("replication")[field])

    wait_until(lambda: offset(node, "slave_repl_offset") == offset(primary, "master_repl_offset"))
    with node.client() as r:
        r.execute_command("REPLICAOF", "NO", "ONE")


def reconfigure(nodes: list[RedisServer], primary: RedisServer) -> None:
    """What Sentinel does last: the old primary and the other replica follow the new one (a
    full resync: what they held past the promotion is dropped)."""
    for node in nodes:
        with node.client() as r:
            r.execute_command("REPLICAOF", "127.0.0.1", primary.port)
    wait_until(lambda: all(follows(n, primary) for n in nodes) and serves(primary, len(nodes)))


def test_with_two_replicas_waiting_for_one_loses_what_the_old_primary_acknowledged(
    namespace: str,
) -> None:
    """Why durability_replicas exists: with two replicas, WAIT 1 counts replica B while A is
    already promoted, so the old primary acknowledges a record that the failover then drops.
    The record was charged as far as the caller knows; the budget holds it as still reserved."""
    with two_replicas() as (old, a, b):
        with AgentBillClient(
            redis_url=old.url, namespace=namespace, durability="replicated"
        ) as client:
            client.set_budget("acme", 100)
            check = client.preflight("agent", 10, "acme")
            promote(a, old)
            assert check.record(10).charged == 10  # acknowledged: B confirmed it
        reconfigure([old, b], a)
        with AgentBillClient(redis_url=a.url, namespace=namespace) as client:
            budget = client.get_budget("acme")
        assert (budget.spent, budget.reserved) == (0, 10)  # the acknowledged record is lost
        key = KeySpace(namespace).customer("acme").budget
        with a.client() as on_a, b.client() as on_b:
            assert on_b.dump(key) == on_a.dump(key)  # B dropped it too


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_with_two_replicas_waiting_for_both_leaves_the_old_primarys_write_in_doubt(
    kind: str, namespace: str
) -> None:
    """durability_replicas=2: the old primary cannot get its record confirmed by two replicas
    once A is promoted, so the call fails in doubt (StoreUnavailableError) instead of being
    acknowledged; sent again to the new primary with the same reservation id, it charges once.
    """
    options: dict[str, Any] = {
        "durability": "replicated",
        "durability_replicas": 2,
        "retry_deadline": 0.5,
    }
    with two_replicas() as (old, a, b):
        with url_client(kind, old.url, namespace, **options) as client:
            client.set_budget("acme", 100)
            check = client.preflight("agent", 10, "acme")
            promote(a, old)
            with pytest.raises(StoreUnavailableError, match="durability_replicas=2"):
                check.record(10)
        reconfigure([old, b], a)
        with url_client(kind, a.url, namespace, **options) as client:
            assert client.get_budget("acme").reserved == 10  # the preflight survived
            first = client.record("agent", 10, "acme", reservation_id=check.reservation_id)
            again = client.record("agent", 10, "acme", reservation_id=check.reservation_id)
            budget = client.get_budget("acme")
        assert (first.charged, first.replayed, again.replayed) == (10, False, True)
        assert (budget.spent, budget.reserved) == (10, 0)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    nodes = Cluster(replicas=1)
    try:
        yield nodes.start()
    finally:
        nodes.stop()


def replica_of(cluster: Cluster, customer: str, namespace: str) -> RedisServer:
    """The replica of the primary that owns ``customer``'s slot."""
    key = KeySpace(namespace).customer(customer).budget
    with cluster.nodes[0].client() as c:
        slot = int(c.execute_command("CLUSTER", "KEYSLOT", key))
        for start, end, _primary, replica, *_ in c.execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return next(n for n in cluster.replicas if n.port == int(replica[1]))
    raise AssertionError("no replica")


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_replicated_durability_on_a_cluster_waits_on_each_customers_node(
    kind: str, cluster: Cluster, namespace: str
) -> None:
    customers = [f"c-{i}" for i in range(9)]
    with url_client(
        kind, cluster.url, namespace, durability="replicated", retry_deadline=0.5
    ) as client:
        for customer in customers:
            client.set_budget(customer, 100)
            assert client.preflight("agent", 2, customer).record(2).charged == 2
        checks = client.preflight_many([Preflight("agent", 1, c) for c in customers])
        assert all(c.approved for c in checks)

        check = client.preflight("agent", 10, customers[0], idempotency_key="job-1")
        replica = replica_of(cluster, customers[0], namespace)
        replica.pause()
        try:
            with pytest.raises(StoreUnavailableError, match="replica"):
                check.record(6)
            # A customer on another node is not held up by this one's replica.
            other = next(c for c in customers if replica_of(cluster, c, namespace) is not replica)
            assert client.preflight("agent", 1, other).approved
        finally:
            replica.resume()
        assert check.record(6).charged == 6
        assert client.get_budget(customers[0]).spent == 2 + 6


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"durability": "sync"}, "durability"),
        *(
            ({"durability": "replicated", "durability_replicas": bad}, "durability_replicas")
            for bad in (0, -1, True, 2.0, "2", None, 101)
        ),
        # Nothing waits under durability="primary": a count there would promise nothing.
        ({"durability_replicas": 2}, "durability_replicas"),
    ],
    ids=repr,
)
def test_durability_is_validated(options: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        AgentBillClient(redis_url="redis://127.0.0.1:1/0", **options)  # type: ignore[arg-type]
    assert info.value.field == field
