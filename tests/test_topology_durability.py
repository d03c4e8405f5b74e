"""durability="replicated": a write returns once a replica has it, on a real primary and
replica the suite starts (redis-server, and valkey-server where installed); a replica that
cannot confirm makes the call fail in doubt, and the retry with the same request id charges
once."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentbill import AgentBillClient, InvalidRequestError, Preflight, StoreUnavailableError
from agentbill._keys import KeySpace
from tests._servers import Cluster, RedisServer, free_port
from tests.test_topology import FAST_SYNC, MATRIX, SERVERS, url_client


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


def test_durability_is_validated() -> None:
    with pytest.raises(InvalidRequestError) as info:
        AgentBillClient(redis_url="redis://127.0.0.1:1/0", durability="sync")  # type: ignore[arg-type]
    assert info.value.field == "durability"
