"""Real redis-server processes for the suite: started on free ports, killed, restarted, clustered.

The binary is the machine's redis-server (or valkey-server) if there is one, else the one the
``agentbill-redis[local]`` extra installs, so the suite runs on a laptop with no Redis installed.
The shared server on port 6379 is never touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
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
