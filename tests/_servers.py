"""Real redis-server processes for the suite: started on free ports, killed, restarted, clustered.

The binary is the machine's redis-server (or valkey-server) if there is one, else the one the
``agentbill[local]`` extra installs, so the suite runs on a laptop with no Redis installed. The
shared server on port 6379 is never touched.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from agentbill._local import find_server_binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """One redis-server process on 127.0.0.1 and a free port, in its own temporary directory."""

    def __init__(self, *, extra: dict[str, str] | None = None, port: int | None = None) -> None:
        self.binary = find_server_binary()
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="ab-redis-"))
        self.config = {
            "bind": "127.0.0.1",
            "port": str(self.port),
            "dir": str(self.dir),
            "save": '""',
            "appendonly": "no",
            "logfile": str(self.dir / "server.log"),
            **(extra or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)  # type: ignore[arg-type]

    def start(self, timeout: float = 10.0) -> RedisServer:
        args = [str(self.binary)]
        for key, value in self.config.items():
            args += [f"--{key}", *value.split(" ")] if key != "save" else ["--save", ""]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"redis-server exited: {err}{self.log_tail()}")
            with contextlib.suppress(redis.RedisError), self.client(socket_timeout=0.5) as c:
                if c.ping():
                    return self
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on {self.port}: {self.log_tail()}")

    def log_tail(self) -> str:
        log = self.dir / "server.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Stop the process abruptly (SIGKILL by default): no shutdown save, no goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections (kernel backlog) but nothing answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def restart(self) -> RedisServer:
        self.kill()
        return self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def running(**kwargs: object) -> Iterator[RedisServer]:
    server = RedisServer(**kwargs).start()  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()


# A cluster node also listens on port + 10000 (the cluster bus), so its port is at most 55535.
MAX_CLUSTER_PORT = 65535 - 10000


def free_cluster_port() -> int:
    """A free port at most 55535 whose bus port (port + 10000) is free as well."""
    while True:
        port = free_port()
        if port > MAX_CLUSTER_PORT:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


class Cluster:
    """A 3-master Redis Cluster on free ports, slots split evenly, no replicas."""

    def __init__(self, size: int = 3) -> None:
        self.nodes = [
            RedisServer(
                extra={"cluster-enabled": "yes", "cluster-node-timeout": "2000"},
                port=free_cluster_port(),
            )
            for _ in range(size)
        ]
        for node in self.nodes:
            node.config["cluster-config-file"] = str(node.dir / "nodes.conf")

    def start(self, timeout: float = 20.0) -> Cluster:
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()  # never leave the nodes that did start running
            raise

    def _start(self, timeout: float) -> Cluster:
        for node in self.nodes:
            node.start()
        per = 16384 // len(self.nodes)
        for i, node in enumerate(self.nodes):
            last = 16383 if i == len(self.nodes) - 1 else (i + 1) * per - 1
            with node.client() as c:
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", i * per, last)
        first = self.nodes[0]
        with first.client() as c:
            for node in self.nodes[1:]:
                c.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = []
            for node in self.nodes:
                with node.client(decode_responses=True) as c:
                    info = c.execute_command("CLUSTER", "INFO")
                    text = info if isinstance(info, str) else str(info)
                    states.append("cluster_state:ok" in text and "cluster_known_nodes:3" in text)
            if all(states):
                return self
            time.sleep(0.1)
        raise RuntimeError("cluster did not converge")

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", n.port) for n in self.nodes]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
