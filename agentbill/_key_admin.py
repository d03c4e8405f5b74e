"""Tenant keys, the admin's side: :class:`KeyAdmin` creates, lists and revokes them.

Run with a privileged connection, it creates a Redis ACL user per key::

    ACL SETUSER agentbill:<prefix>:<key id> reset on #<sha256 of the secret>
        resetkeys ~<prefix>:* resetchannels -@all +<each command below>

(``<prefix>`` and the key's format: ``agentbill._tenants``). Only the secret's SHA-256 is sent
to Redis (``#<hash>``), which keeps nothing else; agentbill keeps nothing at all: the key is
shown once. A script runs with the permissions of the user who calls it (Redis 7, Valkey), so
the scripts of a tenant's client can touch only that tenant's keys, with only the commands
granted here. No function here puts a secret into a repr, a message or a log line.
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

from agentbill._exceptions import InvalidRequestError
from agentbill._keys import namespace_prefix
from agentbill._models import Id, validate
from agentbill._retry import translate
from agentbill._tenants import KEY_ID_PATTERN, USER_PREFIX, format_key, username_for
from agentbill._topology import URL_FORMS, Kind, data_nodes

__all__ = ["ENV_ADMIN_URL", "IssuedKey", "KeyAdmin", "KeyInfo", "RevokedKey"]

ENV_ADMIN_URL = "AGENTBILL_ADMIN_URL"
SECRET_BYTES = 32  # secrets.token_urlsafe(32): 43 characters

# What the scripts call (lua/*.lua, every ``redis.call``); tests/test_tenants.py checks this
# list against the files, so a script cannot start using a command its tenants lack.
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
# What redis-py sends for a client: Script runs EVALSHA and, when the server answers NOSCRIPT
# (after a restart, a failover or SCRIPT FLUSH), SCRIPT LOAD; a URL naming a database other
# than 0 makes every new connection SELECT it; PING is the cheapest liveness check. AUTH and
# HELLO need no grant. On connect redis-py also sends CLIENT SETINFO (Redis 7.2+) and, over
# TCP with RESP3, CLIENT MAINT_NOTIFICATIONS (newer servers); it ignores a refusal of either,
# but each refusal is an ACL LOG entry, so they are granted where the server knows them.
# Both only describe the caller's own connection. WAIT (durability="replicated") says only how
# many replicas have this connection's writes.
CLIENT_COMMANDS = ("evalsha", "script|load", "select", "ping", "wait")
OPTIONAL_COMMANDS = ("client|setinfo", "client|maint_notifications")
# What a cluster client (redis-py's RedisCluster, ioredis's Cluster) sends besides: CLUSTER
# SLOTS to learn which node owns which slot (again after a MOVED), COMMAND to learn where each
# command's keys are (redis-py asks once per client), ASKING before a command it sends to the
# node a slot is migrating to. Each reads no data, and none reaches another namespace's keys.
# READONLY is left out: agentbill reads from primaries only. Sentinel clients need nothing on
# the data nodes (they ask the sentinels, which have users of their own).
CLUSTER_COMMANDS = ("cluster|slots", "command", "asking")

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


class KeyAdmin:
    """Creates, lists and revokes tenant keys, over a privileged Redis connection.

    Connects to ``redis`` (a ready ``redis.Redis`` or ``RedisCluster``) if given, else
    ``redis_url``, else the ``AGENTBILL_ADMIN_URL`` environment variable; never to the embedded
    local server. The connection needs the ``@admin`` ACL commands (``ACL``, ``CONFIG GET``,
    ``COMMAND``). Redis does not replicate ACL users, so on a Redis Cluster
    (``redis+cluster://``) and a Sentinel set (``redis+sentinel://``) every change is made on
    every data node, primaries and replicas alike (the sentinels need none), and cluster keys
    get the few commands cluster clients send (:data:`CLUSTER_COMMANDS`). A node added later
    has none of the users: run ``keys create`` again for it, or copy an aclfile.

    ``rewrite_config``: when the server has no ``aclfile``, run CONFIG REWRITE after each change
    so users survive a restart (the server must have been started with a config file).

    Errors: InvalidRequestError (bad argument, unknown key id, no URL), AuthenticationError
    (the admin credentials were refused), StoreError / StoreUnavailableError.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        redis: redis.Redis | RedisCluster | None = None,
        rewrite_config: bool = False,
        timeout: float = 5.0,
    ) -> None:
        self._owns = redis is None
        self._cluster = False
        if redis is None:
            url = redis_url or os.environ.get(ENV_ADMIN_URL)
            if not url:
                raise InvalidRequestError(
                    "redis_url", f"give the admin connection's URL, or set {ENV_ADMIN_URL}"
                )
            kind, nodes = _open(url, timeout)
            self._cluster = kind == "cluster"
        elif isinstance(redis, RedisCluster):
            nodes = [node.redis_connection for node in redis.get_nodes()]  # type: ignore[no-untyped-call]
            self._cluster = True
        else:
            nodes = [redis]
        self._nodes: list[Any] = nodes
        self._rewrite_config = rewrite_config

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rewrite_config={self._rewrite_config!r})"

    def _call(self, *args: Any, node: Any = None) -> Any:
        """One command on ``node`` (the first node by default)."""
        try:
            return (node or self._nodes[0]).execute_command(*args)
        except (redis.RedisError, OSError) as exc:
            raise translate(exc) from exc

    def _call_all(self, *args: Any) -> list[Any]:
        """One command on every node, in order."""
        return [self._call(*args, node=node) for node in self._nodes]

    def create_key(self, namespace: str) -> IssuedKey:
        """Create a key for ``namespace``: a new ACL user; other keys of it are untouched."""
        ns = validate(_Namespace, namespace=namespace).namespace
        commands = SCRIPT_COMMANDS + CLIENT_COMMANDS + self._optional_commands()
        if self._cluster:
            commands += CLUSTER_COMMANDS
        while True:
            key_id = secrets.token_hex(8)
            username = username_for(ns, key_id)
            # 64 random bits per namespace: a clash is a formality, but never overwrite a user.
            if all(user is None for user in self._call_all("ACL", "GETUSER", username)):
                break
        secret = secrets.token_urlsafe(SECRET_BYTES)
        try:
            self._call_all("ACL", "SETUSER", username, *tenant_acl_rules(ns, secret, commands))
            persisted = self._persist()
        except BaseException:
            # A key nobody was shown must not stay usable, on any node.
            for node in self._nodes:
                with contextlib.suppress(Exception):
                    node.execute_command("ACL", "DELUSER", username)
            raise
        return IssuedKey(
            key_id=key_id,
            namespace=ns,
            username=username,
            api_key=SecretStr(format_key(ns, key_id, secret)),
            persisted=persisted,
        )

    def list_keys(self, namespace: str | None = None) -> list[KeyInfo]:
        """Every agentbill key on the server (of ``namespace`` if given), by namespace, id."""
        found = set()
        for names in self._call_all("ACL", "USERS"):  # a node may lack some: all of them
            for name in names:
                info = _key_info(_text(name))
                if info is not None and namespace in (None, info.namespace):
                    found.add(info)
        return sorted(found, key=lambda k: (k.namespace, k.key_id))

    def revoke_key(self, key_id: str) -> RevokedKey:
        """Delete the key's ACL user. Redis disconnects every client authenticated with it, so
        its next call is refused at once; new connections are refused too.

        Raises InvalidRequestError naming ``key_id`` when no key has this id.
        """
        kid = validate(_KeyId, key_id=key_id).key_id
        for info in self.list_keys():
            if info.key_id == kid:
                self._call_all("ACL", "DELUSER", info.username)
                persisted = self._persist()
                return RevokedKey(info.key_id, info.namespace, info.username, persisted)
        raise InvalidRequestError("key_id", "no agentbill key has this id on this server")

    def close(self) -> None:
        """Close the connection this admin opened (not a ``redis=`` client you passed in)."""
        if self._owns:
            for node in self._nodes:
                node.close()

    def __enter__(self) -> KeyAdmin:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _optional_commands(self) -> tuple[str, ...]:
        known: set[str] = set()
        for info in self._call("COMMAND", "INFO", "client").values():
            known.update(_text(sub[0]).lower() for sub in info.get("subcommands") or ())
        return tuple(command for command in OPTIONAL_COMMANDS if command in known)

    def _persist(self) -> Persisted | None:
        """Persist the users on every node; what all of them did (None if one could not)."""
        done = {self._persist_node(node) for node in self._nodes}
        return done.pop() if len(done) == 1 else None

    def _persist_node(self, node: Any) -> Persisted | None:
        # CONFIG GET answers {name: value}; an empty value is "no aclfile".
        if any(_text(v) for v in self._call("CONFIG", "GET", "aclfile", node=node).values()):
            self._call("ACL", "SAVE", node=node)
            return "aclfile"
        if self._rewrite_config:
            self._call("CONFIG", "REWRITE", node=node)
            return "config"
        return None


def _open(url: str, timeout: float) -> tuple[Kind | None, list[redis.Redis]]:
    options = {
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        "decode_responses": True,
    }
    try:
        return data_nodes(url, options)
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
