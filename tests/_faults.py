"""Faults a test can put between a client and Redis, and the helpers the outage tests share.

A server that is unreachable, paused or silent; a proxy that loses script replies on the way
back (the write ran, the caller never heard); a script that keeps Redis BUSY; both clients
behind one ``connect`` fixture, so each outage test body runs on the sync and the async client.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any, cast

import pytest
import redis

from agentbill import AgentBillClient, AsyncAgentBillClient
from tests._async_facade import blocking_client
from tests._servers import RedisServer

AGENT = "agent"
CUSTOMER = "acme"
SCRIPT_COMMANDS = (b"FCALL", b"FCALL_RO")
FUNCTION_MISSING = b"-ERR Function not found"
UNREACHABLE_BOUND = 2.0


Connect = Callable[..., AbstractContextManager[AgentBillClient]]
"""Builds a client from AgentBillClient's keyword arguments."""


@contextlib.contextmanager
def sync_client(**kwargs: Any) -> Iterator[AgentBillClient]:
    with AgentBillClient(**kwargs) as client:
        yield client


@contextlib.contextmanager
def async_client(**kwargs: Any) -> Iterator[AgentBillClient]:
    """An AsyncAgentBillClient behind the suite's blocking facade."""
    with asyncio.Runner() as runner:
        aclient = AsyncAgentBillClient(**kwargs)
        try:
            yield cast(AgentBillClient, blocking_client(aclient, runner))
        finally:
            runner.run(aclient.close())


@pytest.fixture(params=["sync", "async"])
def connect(request: pytest.FixtureRequest) -> Connect:
    return sync_client if request.param == "sync" else async_client


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` if it never does."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.02)


def close_socket(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def other_clients(raw: redis.Redis) -> list[object]:
    """Connections to the server other than ``raw``'s own."""
    me = raw.client_id()
    return [c for c in raw.client_list() if int(c["id"]) != me]


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A port that accepts TCP connections and never sends a byte."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept_forever() -> None:
        with contextlib.suppress(OSError):
            while True:
                accepted.append(listener.accept()[0])

    thread = threading.Thread(target=accept_forever, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    close_socket(listener)
    thread.join(timeout=5)
    for sock in accepted:
        close_socket(sock)


def take_commands(buffer: bytearray) -> list[tuple[bytes, bytes]]:
    """Remove the complete RESP commands at the front of ``buffer``: (NAME, raw bytes) each."""
    out: list[tuple[bytes, bytes]] = []
    while (end := command_end(buffer)) is not None:
        raw = bytes(buffer[:end])
        del buffer[:end]
        name = raw.split(b"\r\n")[2] if raw.startswith(b"*") else raw.split()[0]
        out.append((name.upper(), raw))
    return out


def command_end(buffer: bytearray) -> int | None:
    """Where the first complete command in ``buffer`` ends, or None if it is not all there."""
    line_end = buffer.find(b"\r\n")
    if line_end < 0:
        return None
    if not buffer.startswith(b"*"):  # an inline command: one line
        return line_end + 2
    pos = line_end + 2
    for _ in range(int(buffer[1:line_end])):
        line_end = buffer.find(b"\r\n", pos)
        if line_end < 0:
            return None
        pos = line_end + 2 + int(buffer[pos + 1 : line_end]) + 2
        if pos > len(buffer):
            return None
    return pos


class Link:
    """One client connection through the proxy and its connection to the server."""

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client = client
        self.server = server
        self.doomed = False
        """The script call just forwarded is to lose its reply."""

    def close(self) -> None:
        close_socket(self.client)
        close_socket(self.server)


class ReplyLosingProxy:
    """A TCP proxy in front of one Redis server that loses script replies on purpose.

    ``lose_next_replies(n)``: the next n function calls (FCALL) are forwarded and run, but
    their replies are thrown away and the client's connection closed, as when the network
    fails on the way back. A "Function not found" reply passes through: that call did not run.
    ``refuse_scripts``: function calls are not forwarded at all; the connection is closed.
    Everything else (handshakes, FUNCTION LOAD) passes through untouched.
    """

    def __init__(self, server_port: int) -> None:
        self.server_port = server_port
        self.refuse_scripts = False
        self.script_calls = 0
        self.lost = 0
        self._to_lose = 0
        self._lock = threading.Lock()
        self._links: list[Link] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._spawn(self._accept)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def lose_next_replies(self, n: int) -> None:
        with self._lock:
            self._to_lose = n

    def close(self) -> None:
        close_socket(self._listener)
        self._threads[0].join(timeout=5)  # the accepting thread: no new links after this
        with self._lock:
            links, threads = list(self._links), list(self._threads)
        for link in links:
            link.close()
        for thread in threads:
            thread.join(timeout=5)

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            link = Link(client, socket.create_connection(("127.0.0.1", self.server_port)))
            with self._lock:
                self._links.append(link)
            self._spawn(self._requests, link)
            self._spawn(self._replies, link)

    def _requests(self, link: Link) -> None:
        buffer = bytearray()
        with contextlib.suppress(OSError):
            while chunk := link.client.recv(65536):
                buffer += chunk
                for name, raw in take_commands(buffer):
                    if not self._forward(link, name, raw):
                        link.close()
                        return
        link.close()

    def _forward(self, link: Link, name: bytes, raw: bytes) -> bool:
        """Send one command on to the server; False when the connection is to be cut instead."""
        if name in SCRIPT_COMMANDS:
            with self._lock:
                self.script_calls += 1
                if self.refuse_scripts:
                    return False
                link.doomed = self._to_lose > 0
        link.server.sendall(raw)
        return True

    def _replies(self, link: Link) -> None:
        with contextlib.suppress(OSError):
            while chunk := link.server.recv(65536):
                with self._lock:
                    lose = link.doomed and not chunk.startswith(FUNCTION_MISSING)
                    link.doomed = False
                    if lose:
                        self._to_lose -= 1
                        self.lost += 1
                if lose:
                    break
                link.client.sendall(chunk)
        link.close()


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[ReplyLosingProxy]:
    lossy = ReplyLosingProxy(redis_server.port)
    yield lossy
    lossy.close()


def _answers_busy(probe: redis.Redis) -> bool:
    try:
        probe.get("probe")
    except redis.ResponseError as exc:
        return str(exc).startswith("BUSY")
    return False


@contextlib.contextmanager
def busy(server: RedisServer) -> Iterator[None]:
    """Another client's script runs until killed: past ``lua-time-limit`` Redis answers every
    other command with BUSY. SCRIPT KILL on exit."""
    runner = server.client()
    done = threading.Event()

    def run() -> None:
        with contextlib.suppress(redis.ResponseError):
            runner.eval("while true do end", 0)
        done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    with server.client() as probe:
        wait_until(lambda: _answers_busy(probe), "Redis to answer BUSY")
        try:
            yield
        finally:
            while not done.is_set():
                with contextlib.suppress(redis.ResponseError):
                    probe.script_kill()
                done.wait(0.05)
            thread.join(timeout=10)
            runner.close()
