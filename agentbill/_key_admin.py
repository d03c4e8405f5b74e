"""Tenant keys, the admin's side: :class:`KeyAdmin` creates, lists and revokes them, and loads
the Functions library their clients call.

Run with a privileged connection, it creates a Redis ACL user per key::

    ACL SETUSER agentbill:<prefix>:<key id> reset on #<sha256 of the secret>
        resetkeys ~<prefix>:* resetchannels -@all +<each command below>

(``<prefix>`` and the key's format: ``agentbill._tenants``). Only the secret's SHA-256 is sent
to Redis (``#<hash>``), which keeps nothing else; agentbill keeps nothing at all: the key is
shown once. A key may call agentbill's functions (FCALL) but load no code of its own, so the
library (``lua/library.lua``) is loaded by the admin: :meth:`KeyAdmin.create_key` loads it,
:meth:`KeyAdmin.load_library` loads it again (after FUNCTION FLUSH, on a node added later). A
function runs with the permissions of the user who calls it (Redis 7, Valkey), so a tenant's
calls can touch only that tenant's keys, with only the commands granted here. No function here
puts a secret into a repr, a message or a log line.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import unquote

import redis
from pydantic import BaseModel, ConfigDict, SecretStr, StringConstraints
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from agentbill._exceptions import (
    AgentBillError,
    InvalidRequestError,
    NodesUnreachableError,
)
from agentbill._keys import namespace_prefix
from agentbill._models import Id, validate
from agentbill._retry import translate, unreachable
from agentbill._scripts import installed
from agentbill._tenants import KEY_ID_PATTERN, USER_PREFIX, format_key, username_for
from agentbill._topology import URL_FORMS, Kind, UrlError, cluster_members, data_nodes

__all__ = [
    "ENV_ADMIN_URL",
    "IssuedKey",
    "KeyAdmin",
    "KeyInfo",
    "LoadedLibrary",
    "RevokedKey",
]

ENV_ADMIN_URL = "AGENTBILL_ADMIN_URL"
SECRET_BYTES = 32  # secrets.token_urlsafe(32): 43 characters

# What the scripts call (lua/*.lua, every ``redis.call``: the functions of lua/library.lua);
# tests/test_tenants.py checks this list against the library, so a function cannot start using
# a command its tenants lack.
SCRIPT_COMMANDS = (
    "get",
    "set",
    "hget",
    "hmget",
    "hset",
    "hsetnx",
    "hdel",
    "hexists",
    "hincrby",
    "zadd",
    "zrem",
    "zrangebyscore",
    "zrangebylex",
    "time",
    "xadd",
    "xrange",
    "xdel",
    "pexpire",
    "persist",
    "zrevrange",
)
# What a client sends besides. FCALL of agentbill's functions (FCALL_RO for those flagged
# no-writes), and never EVAL, EVALSHA, SCRIPT or FUNCTION: a key runs only code an operator
# loaded (KeyAdmin.load_library, `agentbill keys load-library`), never code of its own, so one
# tenant can neither stall Redis for every other with a long script (every call waits behind
# it until it ends or is killed) nor flush or replace the library the others call. ACL
# cannot name the functions FCALL may call, but only an operator loads any, and a
# function runs with its caller's permissions: FCALL's keys are checked against the key's
# pattern like any command's, and each ``redis.call`` inside against these grants. With the
# library missing (FUNCTION FLUSH, a node added later, a restart that lost the data) a call
# answers "Function not found"; the client's FUNCTION LOAD is then refused (NOPERM) and it
# raises LibraryNotLoadedError, naming the command that loads it. A URL naming a database
# other than 0 makes every new connection SELECT it; PING is the cheapest liveness check.
# AUTH and HELLO need no grant. On connect redis-py also sends CLIENT SETINFO (Redis 7.2+)
# and, over TCP with RESP3, CLIENT MAINT_NOTIFICATIONS (newer servers); it ignores a refusal
# of either, but each refusal is an ACL LOG entry, so they are granted where the server knows
# them. Both only describe the caller's own connection. WAIT (durability="replicated") says
# only how many replicas have this connection's writes.
CLIENT_COMMANDS = ("fcall", "fcall_ro", "select", "ping", "wait")
OPTIONAL_COMMANDS = ("client|setinfo", "client|maint_notifications")
# What a cluster client (redis-py's RedisCluster, ioredis's Cluster) sends besides: CLUSTER
# SLOTS to learn which node owns which slot (again after a MOVED), COMMAND to learn where each
# command's keys are (redis-py asks once per client), ASKING before a command it sends to the
# node a slot is migrating to, and CLIENT SETNAME (ioredis names the connection that refreshes
# the slots; refused, every refresh was an ACL LOG entry). Each reads no data or describes only
# the caller's own connection, and none reaches another namespace's keys. READONLY is left
# out: agentbill reads from primaries only. Sentinel clients need nothing on the data nodes
# (they ask the sentinels, which have users of their own).
CLUSTER_COMMANDS = ("cluster|slots", "command", "asking", "client|setname")

Persisted = Literal["aclfile", "config"]


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """A tenant key as the admin sees it: never its secret."""

    key_id: str
    namespace: str
    username: str


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A key just created. ``api_key.get_secret_value()`` is the ``agb_...`` string to hand to
    the tenant: it is not stored anywhere and cannot be shown again.

    ``persisted``: ``"aclfile"`` (saved with ACL SAVE), ``"config"`` (CONFIG REWRITE), or None:
    the user lives in the server's memory only and is lost when Redis restarts.
    """

    key_id: str
    namespace: str
    username: str
    api_key: SecretStr
    persisted: Persisted | None


@dataclass(frozen=True, slots=True)
class RevokedKey:
    """A key just revoked; ``persisted`` as for :class:`IssuedKey` (None: a restart of Redis
    would bring the deleted user back from where it was persisted before, if anywhere)."""

    key_id: str
    namespace: str
    username: str
    persisted: Persisted | None


@dataclass(frozen=True, slots=True)
class LoadedLibrary:
    """What :meth:`KeyAdmin.load_library` did: the library's ``name`` (``agentbill_<digest>``),
    the ``primaries`` it was loaded on and the ``replicas`` it skipped (``host:port`` each): a
    replica copies its primary's functions."""

    name: str
    primaries: tuple[str, ...]
    replicas: tuple[str, ...]


def tenant_acl_rules(namespace: str, secret: str, commands: tuple[str, ...]) -> list[str]:
    """The ACL SETUSER rules of one key: its secret's hash, its namespace's keys, ``commands``."""
    digest = hashlib.sha256(secret.encode()).hexdigest()
    # `reset` first: a rule set that says everything the user may do, whatever it had before.
    rules = ["reset", "on", f"#{digest}", "resetkeys", f"~{namespace_prefix(namespace)}:*"]
    rules += ["resetchannels", "-@all"]
    return rules + [f"+{command}" for command in commands]


class _KeyId(BaseModel):
    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")
    key_id: Annotated[str, StringConstraints(pattern=rf"^{KEY_ID_PATTERN}$")]


class _Namespace(BaseModel):
    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")
    namespace: Id


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


Node = tuple[str, Any]
"""A data node's ``host:port`` and a connection to it."""


class KeyAdmin:
    """Creates, lists and revokes tenant keys, and loads the Functions library their clients
    call, over a privileged Redis connection.

    Connects to ``redis`` (a ready ``redis.Redis`` or ``RedisCluster``) if given, else
    ``redis_url``, else the ``AGENTBILL_ADMIN_URL`` environment variable; never to the embedded
    local server. The connection needs the ``@admin`` ACL commands (``ACL``, ``CONFIG GET``,
    ``COMMAND``, ``ROLE``, and ``CLUSTER NODES`` on a cluster) and ``FUNCTION LOAD``. Redis
    does not replicate ACL users, so on a Redis Cluster (``redis+cluster://``) and a Sentinel
    set (``redis+sentinel://``) every change is made on every data node, primaries and
    replicas alike (the sentinels need none), failed ones included: the nodes are those
    ``CLUSTER NODES`` or the sentinels list, not only the healthy ones. A change that cannot
    be made on some node raises :class:`NodesUnreachableError` naming them (a revoke still
    revokes on every node it reaches; a create then creates nothing). Cluster keys get the few
    commands cluster clients send (:data:`CLUSTER_COMMANDS`). A node added later has none of
    the users: run ``keys create`` again for it, or copy an aclfile. Functions do replicate,
    so the library is loaded on every primary, and a replica is skipped
    (:meth:`load_library`); a primary added later needs ``load_library`` too.

    ``rewrite_config``: when the server has no ``aclfile``, run CONFIG REWRITE after each change
    so users survive a restart (the server must have been started with a config file).

    Errors: InvalidRequestError (bad argument, unknown key id, no URL), AuthenticationError
    (the admin credentials were refused), NodesUnreachableError (some nodes not reached),
    StoreError / StoreUnavailableError.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        redis: redis.Redis | RedisCluster | None = None,
        rewrite_config: bool = False,
        timeout: float = 5.0,
    ) -> None:
        self._cluster = False
        self._opened: list[Any] = []  # the connections this admin opened, to close
        if redis is None:
            url = redis_url or os.environ.get(ENV_ADMIN_URL)
            if not url:
                raise InvalidRequestError(
                    "redis_url", f"give the admin connection's URL, or set {ENV_ADMIN_URL}"
                )
            kind, connections = _open(url, timeout)
            self._cluster = kind == "cluster"
            self._opened = list(connections)
            nodes = [(_name(c), c) for c in connections]
        elif isinstance(redis, RedisCluster):
            nodes, self._opened = _cluster_client_nodes(redis, timeout)
            self._cluster = True
        else:
            nodes = [(_name(redis), redis)]
        self._nodes: list[Node] = nodes
        self._rewrite_config = rewrite_config

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rewrite_config={self._rewrite_config!r})"

    def _call(self, node: Any, *args: Any) -> Any:
        """One command on ``node``."""
        try:
            return node.execute_command(*args)
        except (redis.RedisError, OSError) as exc:
            raise translate(exc) from exc

    def _each(
        self, *args: Any, nodes: list[Node] | None = None
    ) -> tuple[list[tuple[Node, Any]], dict[str, AgentBillError]]:
        """One command on every node (of ``nodes``, all by default): the replies of the nodes
        that answered, and why each other one did not. No node answering raises the first
        node's error as it is (an unreachable server, refused admin credentials)."""
        answered: list[tuple[Node, Any]] = []
        failed: dict[str, AgentBillError] = {}
        targets = self._nodes if nodes is None else nodes
        for node in targets:
            try:
                answered.append((node, self._call(node[1], *args)))
            except AgentBillError as exc:
                failed[node[0]] = exc
        if targets and not answered:
            raise next(iter(failed.values()))
        return answered, failed

    def create_key(self, namespace: str) -> IssuedKey:
        """Create a key for ``namespace``: a new ACL user on every data node; other keys of it
        are untouched. Loads the library first, as :meth:`load_library` does: the key cannot.
        Raises NodesUnreachableError, having created nothing, when some node could not take
        it: a key that some nodes lack would be refused by them (after a failover, by the new
        primary)."""
        ns = validate(_Namespace, namespace=namespace).namespace
        commands = SCRIPT_COMMANDS + CLIENT_COMMANDS + self._optional_commands()
        if self._cluster:
            commands += CLUSTER_COMMANDS
        while True:
            key_id = secrets.token_hex(8)
            username = username_for(ns, key_id)
            # 64 random bits per namespace: a clash is a formality, but never overwrite a user.
            users, failed = self._each("ACL", "GETUSER", username)
            if failed:
                raise _unreached(failed, "no key was created", None)
            if all(user is None for _, user in users):
                break
        _, failed = self._load_library()
        if failed:
            raise _unreached(failed, "no key was created", None)
        secret = secrets.token_urlsafe(SECRET_BYTES)
        try:
            _, failed = self._each(
                "ACL", "SETUSER", username, *tenant_acl_rules(ns, secret, commands)
            )
            if failed:
                raise _unreached(failed, "no key was created", None)
            persisted = self._persist(self._nodes)
        except BaseException:
            # A key nobody was shown must not stay usable, on any node, nor come back with
            # a restart from an aclfile it was saved to.
            for _, node in self._nodes:
                with contextlib.suppress(Exception):
                    node.execute_command("ACL", "DELUSER", username)
                    self._persist_node(node)
            raise
        return IssuedKey(
            key_id=key_id,
            namespace=ns,
            username=username,
            api_key=SecretStr(format_key(ns, key_id, secret)),
            persisted=persisted,
        )

    def list_keys(self, namespace: str | None = None) -> list[KeyInfo]:
        """Every agentbill key on the data nodes (of ``namespace`` if given), by namespace, id.
        Raises NodesUnreachableError when some node could not be asked: a list without its
        keys could hide one that still works there."""
        found, failed = self._find(namespace)
        if failed:
            raise _unreached(failed, "the keys could not be listed", None)
        return found

    def _find(self, namespace: str | None) -> tuple[list[KeyInfo], dict[str, AgentBillError]]:
        """The keys on the nodes that answered (a node may lack some: all of them), and why
        each other node did not."""
        found = set()
        answered, failed = self._each("ACL", "USERS")
        for _, names in answered:
            for name in names:
                info = _key_info(_text(name))
                if info is not None and namespace in (None, info.namespace):
                    found.add(info)
        return sorted(found, key=lambda k: (k.namespace, k.key_id)), failed

    def revoke_key(self, key_id: str) -> RevokedKey:
        """Delete the key's ACL user on every data node. Redis disconnects every client
        authenticated with it, so its next call is refused at once; new connections are
        refused too.

        Raises InvalidRequestError naming ``key_id`` when no node has a key with this id, and
        NodesUnreachableError when some node could not be reached (or refused): the key is
        then deleted on every other node, and still works on those (run it again once they
        are back).
        """
        kid = validate(_KeyId, key_id=key_id).key_id
        keys, failed = self._find(None)
        info = next((k for k in keys if k.key_id == kid), None)
        if info is None:
            if failed:  # a node we could not ask may still have it
                raise _unreached(failed, "no node reached has this key", kid)
            raise InvalidRequestError("key_id", "no agentbill key has this id on this server")
        reached = [node for node in self._nodes if node[0] not in failed]
        deleted, refused = self._each("ACL", "DELUSER", info.username, nodes=reached)
        failed |= refused
        persisted = self._persist([node for node, _ in deleted])
        if failed:
            done = f"key {kid} was revoked on {len(deleted)} of {len(self._nodes)} nodes"
            raise _unreached(failed, done, kid)
        return RevokedKey(info.key_id, info.namespace, info.username, persisted)

    def load_library(self) -> LoadedLibrary:
        """Load agentbill's Functions library (``FUNCTION LOAD REPLACE`` of the text this
        package ships) on every primary; a replica is skipped, as it copies its primary's
        functions. Doing it again changes nothing. A tenant key cannot load it itself (its
        client raises LibraryNotLoadedError instead): run this after a FUNCTION FLUSH, for a
        node added later, or after a restart that lost the data. :meth:`create_key` runs it.

        Raises NodesUnreachableError naming the nodes that could not be reached (or refused),
        having loaded the library on every primary that was: run it again once they are back.
        """
        loaded, failed = self._load_library()
        if failed:
            done = f"the library {loaded.name} was loaded on {len(loaded.primaries)} primaries"
            raise _unreached(failed, done, None)
        return loaded

    def _load_library(self) -> tuple[LoadedLibrary, dict[str, AgentBillError]]:
        """Load the library on every primary that answers; and why each other node did not.
        ``ROLE`` tells a primary from a replica: a replica refuses FUNCTION LOAD (READONLY),
        and one whose role is not known yet (down) is reported, not assumed."""
        library = installed()
        roles, failed = self._each("ROLE")
        primaries = [node for node, role in roles if _text(role[0]) == "master"]
        replicas = tuple(node[0] for node, role in roles if _text(role[0]) != "master")
        loaded, refused = self._each("FUNCTION", "LOAD", "REPLACE", library.text, nodes=primaries)
        done = LoadedLibrary(library.name, tuple(node[0] for node, _ in loaded), replicas)
        return done, failed | refused

    def close(self) -> None:
        """Close the connections this admin opened (not a ``redis=`` client you passed in)."""
        for node in self._opened:
            node.close()

    def __enter__(self) -> KeyAdmin:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _optional_commands(self) -> tuple[str, ...]:
        """Of :data:`OPTIONAL_COMMANDS`, those the servers know (as the first node that
        answers says)."""
        answered, _ = self._each("COMMAND", "INFO", "client")
        known: set[str] = set()
        for info in answered[0][1].values():
            known.update(_text(sub[0]).lower() for sub in info.get("subcommands") or ())
        return tuple(command for command in OPTIONAL_COMMANDS if command in known)

    def _persist(self, nodes: list[Node]) -> Persisted | None:
        """Persist the users on ``nodes``; what all of them did (None if one could not)."""
        done = {self._persist_node(node) for _, node in nodes}
        return done.pop() if len(done) == 1 else None

    def _persist_node(self, node: Any) -> Persisted | None:
        # CONFIG GET answers {name: value}; an empty value is "no aclfile".
        if any(_text(v) for v in self._call(node, "CONFIG", "GET", "aclfile").values()):
            self._call(node, "ACL", "SAVE")
            return "aclfile"
        if self._rewrite_config:
            self._call(node, "CONFIG", "REWRITE")
            return "config"
        return None


def _unreached(
    failed: dict[str, AgentBillError], done: str, key_id: str | None
) -> NodesUnreachableError:
    """The error for a change that some nodes did not take: what was done, which nodes did
    not take it and why, what to do."""
    why = "; ".join(f"{name} ({exc})" for name, exc in failed.items())
    advice = (
        "those nodes still accept the key: run the revoke again once they are back (a node "
        "restarted from its aclfile has the key again), or remove them from the cluster "
        "(CLUSTER FORGET) or the Sentinel set (SENTINEL RESET)"
        if key_id is not None
        else "bring those nodes back, or remove them from the cluster (CLUSTER FORGET) or the "
        "Sentinel set (SENTINEL RESET), and run it again"
    )
    return NodesUnreachableError(
        f"{done}: {len(failed)} node(s) not reached: {why}. {advice}", tuple(failed), key_id
    )


def _name(node: Any) -> str:
    """``host:port`` (or the socket path) of a redis-py connection."""
    kwargs = node.connection_pool.connection_kwargs
    if "path" in kwargs:
        return str(kwargs["path"])
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


def _cluster_client_nodes(
    cluster: RedisCluster, timeout: float
) -> tuple[list[Node], list[redis.Redis]]:
    """Every node of a ready cluster client's cluster, failed ones included (``CLUSTER
    NODES``, asked of the nodes the client knows until one answers): the client's own
    connections where it has one, new ones (returned second, to close) for the nodes it
    left out (a failed replica): the client's options, with ``timeout`` and no redis-py
    retries (a node that is down is reported at once, not after redis-py's backoff)."""
    known = cluster.get_nodes()  # type: ignore[no-untyped-call]
    last: Exception | None = None
    for node in known:
        try:
            reply = node.redis_connection.execute_command("CLUSTER", "NODES")
            addresses = cluster_members(reply, (node.host, node.port))
            break
        except (redis.RedisError, OSError) as exc:
            if not unreachable(exc):
                raise translate(exc) from exc
            last = exc
    else:
        assert last is not None
        raise translate(last) from last
    nodes: list[Node] = []
    opened: list[redis.Redis] = []
    kwargs = {
        **cluster.get_connection_kwargs(),  # type: ignore[no-untyped-call]
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    for host, port in addresses:
        own = cluster.get_node(host=host, port=port)  # type: ignore[no-untyped-call]
        if own is not None and own.redis_connection is not None:
            nodes.append((f"{host}:{port}", own.redis_connection))
        else:
            extra = redis.Redis(host=host, port=port, **kwargs)
            opened.append(extra)
            nodes.append((f"{host}:{port}", extra))
    return nodes, opened


def _open(url: str, timeout: float) -> tuple[Kind | None, list[redis.Redis]]:
    options = {
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        "decode_responses": True,
    }
    try:
        return data_nodes(url, options)
    except UrlError as exc:
        raise InvalidRequestError("redis_url", str(exc)) from None
    except ValueError:
        raise InvalidRequestError(
            "redis_url", f"is not a Redis URL agentbill can use ({URL_FORMS})"
        ) from None


def _key_info(username: str) -> KeyInfo | None:
    parts = username.split(":")
    if len(parts) != 3 or f"{parts[0]}:" != USER_PREFIX:
        return None
    prefix, key_id = parts[1], parts[2]
    if re.fullmatch(KEY_ID_PATTERN, key_id) is None:
        return None
    try:
        namespace = unquote(prefix, errors="strict")
    except UnicodeDecodeError:
        return None
    return KeyInfo(key_id=key_id, namespace=namespace, username=username)
