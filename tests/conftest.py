"""Fixtures: a real redis-server started by the suite, and clients isolated by namespace."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Iterator
from typing import cast

import pytest
import redis

from agentbill import AgentBillClient, AsyncAgentBillClient
from tests._async_facade import blocking_client
from tests._servers import RedisServer

# A suite started in the background by a shell without job control (`make test &` in a script,
# nohup) inherits SIGINT ignored, and so would every process it starts: the tests that interrupt
# a worker or the CLI with SIGINT need it to arrive. Python's own handler is what a terminal
# gives, and a process the suite starts then gets the default disposition.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the session; tests stay apart by namespace, never by flushing."""
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def namespace() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def client(redis_server: RedisServer, namespace: str) -> Iterator[AgentBillClient]:
    with AgentBillClient(redis_url=redis_server.url, namespace=namespace) as c:
        yield c


@pytest.fixture(params=["sync", "async"])
def both_clients(
    request: pytest.FixtureRequest, redis_server: RedisServer, namespace: str
) -> Iterator[AgentBillClient]:
    """AgentBillClient, then AsyncAgentBillClient behind a blocking facade: one test body,
    both clients, the same real server."""
    if request.param == "sync":
        with AgentBillClient(redis_url=redis_server.url, namespace=namespace) as c:
            yield c
        return
    with asyncio.Runner() as runner:
        aclient = AsyncAgentBillClient(redis_url=redis_server.url, namespace=namespace)
        yield cast(AgentBillClient, blocking_client(aclient, runner))
        runner.run(aclient.close())


@pytest.fixture
def raw(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A plain redis-py connection to the same server, for looking behind the client's back."""
    with redis_server.client(decode_responses=True) as r:
        yield r


def namespace_keys(raw: redis.Redis, namespace: str, ledger: bool = False) -> dict[str, object]:
    """Every key of a namespace with its value, to prove that nothing was written. The ledger
    streams, where refusals are recorded too, are left out unless ``ledger``."""
    out: dict[str, object] = {}
    for key in raw.scan_iter(match=f"{namespace}:*", count=1000):
        kind = raw.type(key)
        if kind == "stream":
            if ledger:
                out[key] = raw.xrange(key)
        elif kind == "hash":
            out[key] = raw.hgetall(key)
        elif kind == "zset":
            out[key] = raw.zrange(key, 0, -1, withscores=True)
        else:
            out[key] = raw.get(key)
    return out
