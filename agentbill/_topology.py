"""Redis URLs for every topology, and the redis-py client each one gets.

    redis://[user:password@]host[:port][/db]          one server (also rediss://, unix://)
    redis+cluster://[user:password@]host:port[,host:port...][/0]
    redis+sentinel://[user:password@]host:port[,host:port...]/service_name[/db]
        [?sentinel_username=...&sentinel_password=...]

``rediss+cluster://`` and ``rediss+sentinel://`` are the same over TLS (the ``ssl_*`` query
arguments redis-py takes for ``rediss://`` apply to every node, sentinels included). A
cluster's hosts are startup nodes: the client learns the others (and every later change) from
the cluster itself. A Sentinel URL's hosts are the sentinels; the user and password in it are
the master's (a tenant key's replace them), the ``sentinel_*`` query arguments the sentinels'.

Parsing is redis-py's own (``parse_url``) for everything but the host list and the service
name, and the clients are redis-py's ``RedisCluster`` and ``Sentinel.master_for``: they follow
MOVED/ASK redirections and failovers themselves. A URL that is not a Redis URL raises
ValueError here; the callers turn that into an InvalidRequestError naming their field.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

import redis
import redis.asyncio as aioredis
from redis._parsers.commands import AsyncCommandsParser
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster
from redis.connection import Connection, ConnectionPool, SSLConnection, parse_url
from redis.exceptions import RedisClusterException

from agentbill._exceptions import LibraryNotLoadedError, StoreUnavailableError
from agentbill._retry import translate
from agentbill._scripts import Library

Kind = Literal["cluster", "sentinel"]

SCHEMES: dict[str, tuple[Kind, str]] = {
    "redis+cluster": ("cluster", "redis"),
    "rediss+cluster": ("cluster", "rediss"),
    "redis+sentinel": ("sentinel", "redis"),
    "rediss+sentinel": ("sentinel", "rediss"),
}
DEFAULT_PORTS: dict[Kind, int] = {"cluster": 6379, "sentinel": 26379}
SENTINEL_QUERY = ("sentinel_username", "sentinel_password")

URL_FORMS = (
    "redis://, rediss://, unix://, redis+cluster://host:port[,host:port...], "
    "redis+sentinel://host:port[,host:port...]/service_name (or rediss+...)"
)


@dataclass(frozen=True)
class Topology:
    """A parsed cluster or Sentinel URL: its nodes (startup nodes, or the sentinels), the
    Sentinel service name, redis-py's connection options for the data nodes (``parse_url``'s:
    credentials, db, TLS) and, for Sentinel, the sentinels' own credentials."""

    kind: Kind
    nodes: tuple[tuple[str, int], ...]
    options: dict[str, Any]
    service: str | None = None
    sentinel_options: dict[str, Any] = field(default_factory=dict)

    @property
    def tls(self) -> bool:
        return self.options.get("connection_class") is SSLConnection


class UrlError(ValueError):
    """A Redis URL agentbill refuses; the message names the problem (it reads after
    ``redis_url``), never quoting the URL (it may hold a password)."""


def parse(url: str) -> Topology | None:
    """The topology of a ``redis+cluster://`` or ``redis+sentinel://`` URL (and their
    ``rediss+`` forms); None for any other URL (redis-py takes those as they are, once the
    rules every URL follows are checked: no port 0, well-formed %-escapes in the credentials).

    Raises ValueError for a malformed one (UrlError where the message names the problem; never
    quoting it: it may hold a password).
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return None
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    netloc, tail = rest[:cut], rest[cut:].removeprefix("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    _check_userinfo(userinfo)
    if scheme.lower() not in SCHEMES:
        port = None
        with contextlib.suppress(ValueError):  # redis-py reports a bad port itself
            port = urlsplit(url).port
        if port == 0:
            raise UrlError(PORT_0)
        return None
    kind, base = SCHEMES[scheme.lower()]
    path, _, query = tail.partition("?")
    nodes = tuple(_node(part, DEFAULT_PORTS[kind]) for part in hostlist.split(","))
    service = None
    if kind == "sentinel":
        service, _, path = path.partition("/")
        if not service:
            raise UrlError("is a Sentinel URL without the master's service name as its path")
        if path and not path.isdigit():
            raise UrlError("has a database after the service name that is not a number")
    elif path not in ("", "0"):
        raise UrlError(
            "is a Redis Cluster URL with a path other than /0 (a cluster has database 0)"
        )
    pairs = parse_qsl(query)
    sentinel_options = {k.removeprefix("sentinel_"): v for k, v in pairs if k in SENTINEL_QUERY}
    data_query = urlencode([(k, v) for k, v in pairs if k not in SENTINEL_QUERY])
    first = f"{quote(nodes[0][0], safe='')}:{nodes[0][1]}"
    options = parse_url(f"{base}://{userinfo}{at}{first}/{path}?{data_query}")  # type: ignore[no-untyped-call]
    options.pop("host", None)
    options.pop("port", None)
    if kind == "cluster" and options.pop("db", 0) != 0:  # RedisCluster refuses even db=0
        raise UrlError("is a Redis Cluster URL with a database other than 0 (a cluster has 0)")
    _check_arguments(options)
    return Topology(kind, nodes, options, service, sentinel_options)


PORT_0 = "has port 0: give the server's port, or none for the default"


def _node(text: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(f"//{text.strip()}")
    if not parts.hostname:
        raise UrlError("needs a name for every host in its host list")
    if parts.port == 0:
        raise UrlError(PORT_0)
    return parts.hostname, default_port if parts.port is None else parts.port


def _check_userinfo(userinfo: str) -> None:
    """The user and password must be %-escaped UTF-8, as the TypeScript client requires (redis-py
    would take ``%zz`` as it is, and undecodable bytes as U+FFFD)."""
    for part in userinfo.split(":", 1):
        try:
            if re.search(r"%(?![0-9A-Fa-f]{2})", part) is not None:
                raise UnicodeDecodeError("utf-8", b"", 0, 1, "a lone %")
            unquote(part, errors="strict")
        except UnicodeDecodeError:
            raise UrlError("has a malformed %-escape in its username or password") from None


def _check_arguments(options: dict[str, Any]) -> None:
    """Every query argument is one redis-py's connections (or pool) take: an unknown one would
    reach a connection's constructor at the first call (TypeError there), or be dropped."""
    connection_class = options.get("connection_class", Connection)
    accepted: set[str] = set()
    for cls in (*connection_class.__mro__, *ConnectionPool.__mro__):
        init = cls.__dict__.get("__init__")
        if init is not None:
            accepted.update(inspect.signature(init).parameters)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise UrlError(f"has a query argument redis-py's connections do not take: {unknown[0]}")


def connect(topology: Topology, options: dict[str, Any], asynchronous: bool) -> Any:
    """The redis-py client for ``topology`` with the client's connection ``options``
    (timeouts, no redis-py retries, pool size, a tenant key's credentials), sync or async.

    A sync cluster client learns the cluster's slots here (redis-py does it at construction):
    no node reachable is StoreUnavailableError, within the connect timeout per startup node.
    """
    merged = {**topology.options, **options}
    merged.pop("timeout", None)  # a BlockingConnectionPool's: redis-py sizes these pools
    merged.pop("retry_on_timeout", None)  # deprecated there: retry=Retry(..., 0) says it
    if topology.kind == "sentinel":
        return _sentinel(topology, merged, asynchronous)
    return _cluster(topology, merged, asynchronous)


def _cluster(topology: Topology, options: dict[str, Any], asynchronous: bool) -> Any:
    if asynchronous:
        from redis.asyncio.cluster import ClusterNode as AsyncNode
        from redis.asyncio.retry import Retry as AsyncRetry
        from redis.backoff import NoBackoff

        if options.pop("connection_class", None) is SSLConnection:
            options["ssl"] = True
        options["retry"] = AsyncRetry(NoBackoff(), 0)
        accepted = inspect.signature(AsyncRedisCluster.__init__).parameters
        kwargs = {k: v for k, v in options.items() if k in accepted}
        nodes = [AsyncNode(host, port) for host, port in topology.nodes]
        return _AsyncCluster(startup_nodes=nodes, **kwargs)
    from redis.cluster import ClusterNode

    if options.pop("connection_class", None) is SSLConnection:
        options["ssl"] = True  # RedisCluster builds its nodes' clients from ssl=, ssl_*=
    startup = [ClusterNode(host, port) for host, port in topology.nodes]  # type: ignore[no-untyped-call]
    try:
        return _Cluster(startup_nodes=startup, **options)
    except (RedisClusterException, redis.RedisError, OSError) as exc:
        # redis-py wraps what the last startup node answered (a refused key, say).
        cause = exc if not isinstance(exc, RedisClusterException) else exc.__cause__
        if isinstance(cause, redis.RedisError | OSError):
            raise translate(cause) from exc
        raise StoreUnavailableError(f"no node of the Redis Cluster answered: {exc}") from exc


def _redis_error(exc: RedisClusterException) -> redis.RedisError:
    """A redis-py error for one that is not (``RedisClusterException``: no node could be
    reached to learn the slots, or each refused): what the last node answered if redis-py kept
    it (a refused key stays an authentication error), else a connection error. agentbill's
    one error boundary translates redis-py errors only."""
    cause = exc.__cause__
    if isinstance(cause, redis.RedisError):
        return type(cause)(*cause.args)
    return redis.ConnectionError(f"no node of the Redis Cluster answered: {exc}")


# A Redis Cluster may run with `cluster-require-full-coverage no`: a primary down (no replica
# to promote) takes only its slots away, and the others keep serving theirs. Three things
# redis-py's cluster clients do would make every call fail then: they ask COMMAND of one node
# (the default node: the first primary) when they start, they ask that node for the keys of a
# command whose keys move (COMMAND GETKEYS, FCALL among them: one more round trip per call),
# and they send FUNCTION LOAD to every primary, failing if one is down. The twins below ask
# the nodes in turn, :func:`route_functions` reads FCALL's keys from the call itself, and
# :func:`load_library` loads on every primary that answers; a call on the dead primary's
# slots still fails (unreachable: StoreUnavailableError once the retry policy gives up).

_UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, OSError)
FUNCTION_CALLS = ("FCALL", "FCALL_RO")


def _each_node_first(default: Any, nodes: list[Any]) -> list[Any]:
    """``default`` first, then the other ``nodes`` (primaries first, as listed)."""
    return [default, *(node for node in nodes if node is not default)]


def _function_keys(args: tuple[Any, ...]) -> list[Any] | None:
    """The keys of an FCALL or FCALL_RO (function, key count, keys...), else None."""
    if len(args) > 2 and str(args[0]).upper() in FUNCTION_CALLS:
        return list(args[3 : 3 + int(args[2])])
    return None


def route_functions(cluster: Any) -> None:
    """Make a redis-py cluster client (sync or asyncio, ours or one handed in) read the keys of
    a function call from the call, as redis-py does for EVALSHA, instead of asking its default
    node (see above). Its pipelines share its command parser, so they do too."""
    parser = cluster.commands_parser
    if getattr(parser, "_agentbill_routes", False):
        return
    asked = parser.get_keys
    if inspect.iscoroutinefunction(asked):

        async def aget_keys(*args: Any) -> Any:
            keys = _function_keys(args)
            return keys if keys is not None else await asked(*args)

        parser.get_keys = aget_keys
    else:

        def get_keys(connection: Any, *args: Any) -> Any:
            keys = _function_keys(args)
            return keys if keys is not None else asked(connection, *args)

        parser.get_keys = get_keys
    parser._agentbill_routes = True


def _address(client: Any) -> str:
    """``host:port`` of a plain client's server (its unix socket, or its Sentinel service)."""
    pool = client.connection_pool
    kwargs = pool.connection_kwargs
    if "path" in kwargs:
        return str(kwargs["path"])
    if "host" in kwargs:
        return f"{kwargs['host']}:{kwargs.get('port', 6379)}"
    service = getattr(pool, "service_name", None)
    return f"the master of Sentinel service {service!r}" if service else "the Redis server"


def _not_loaded(library: Library, node: str, exc: Exception) -> LibraryNotLoadedError:
    return LibraryNotLoadedError(
        f"Redis at {node} does not have agentbill's Functions library {library.name} and this"
        f" client may not load it ({exc}): an operator loads it with `agentbill keys"
        " load-library` or KeyAdmin.load_library()",
        library.name,
        node,
    )


def load_library(client: Any, library: Library) -> None:
    """FUNCTION LOAD REPLACE of ``library`` on the server a sync client talks to: on a cluster,
    on every primary that answers (none answering raises the last failure). A server that
    refuses it (NOPERM: a tenant key) raises LibraryNotLoadedError naming the node."""
    if not isinstance(client, RedisCluster):
        try:
            client.function_load(library.text, replace=True)
        except redis.exceptions.NoPermissionError as exc:
            raise _not_loaded(library, _address(client), exc) from exc
        return
    loaded, last = False, None
    for node in client.get_primaries():  # type: ignore[no-untyped-call]
        try:
            client.execute_command(  # type: ignore[no-untyped-call]
                "FUNCTION LOAD", "REPLACE", library.text, target_nodes=node
            )
            loaded = True
        except redis.exceptions.NoPermissionError as exc:
            raise _not_loaded(library, node.name, exc) from exc
        except _UNREACHABLE as exc:
            last = exc
    if not loaded:
        assert last is not None
        raise last


async def aload_library(client: Any, library: Library) -> None:
    """:func:`load_library` for a redis.asyncio client."""
    if not isinstance(client, AsyncRedisCluster):
        try:
            await client.function_load(library.text, replace=True)
        except redis.exceptions.NoPermissionError as exc:
            raise _not_loaded(library, _address(client), exc) from exc
        return
    await client.initialize()
    loaded, last = False, None
    for node in client.get_primaries():
        try:
            await client.execute_command(
                "FUNCTION LOAD", "REPLACE", library.text, target_nodes=node
            )
            loaded = True
        except redis.exceptions.NoPermissionError as exc:
            raise _not_loaded(library, node.name, exc) from exc
        except _UNREACHABLE as exc:
            last = exc
    if not loaded:
        assert last is not None
        raise last


class _Cluster(RedisCluster):
    """redis-py's cluster client, raising redis-py errors only (see :func:`_redis_error`), and
    working while a primary is down (see above)."""

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().execute_command(*args, **kwargs)  # type: ignore[no-untyped-call]
        except RedisClusterException as exc:
            raise _redis_error(exc) from exc

    def command(self, **kwargs: Any) -> Any:
        """COMMAND, from the first node that answers (it becomes the default node)."""
        nodes = self.get_primaries() + self.get_replicas()  # type: ignore[no-untyped-call]
        last: Exception | None = None
        for node in _each_node_first(self.get_default_node(), nodes):  # type: ignore[no-untyped-call]
            try:
                reply = self.execute_command("COMMAND", target_nodes=node)
            except _UNREACHABLE as exc:
                last = exc
                continue
            self.set_default_node(node)  # type: ignore[no-untyped-call]
            return reply
        assert last is not None
        raise last


class _AsyncCommands(AsyncCommandsParser):
    """redis.asyncio's reader of COMMAND, asking the nodes in turn (see above)."""

    def __init__(self, cluster: AsyncRedisCluster) -> None:
        super().__init__()
        self._cluster = cluster

    async def initialize(self, node: Any = None) -> None:
        manager = self._cluster.nodes_manager
        nodes = self._cluster.get_primaries() + self._cluster.get_replicas()
        last: Exception | None = None
        for each in _each_node_first(node or manager.default_node, nodes):
            try:
                await super().initialize(each)
            except _UNREACHABLE as exc:
                last = exc
                continue
            manager.default_node = each
            return
        assert last is not None
        raise last


class _AsyncCluster(AsyncRedisCluster):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands_parser = _AsyncCommands(self)

    async def initialize(self, *args: Any, **kwargs: Any) -> AsyncRedisCluster:
        try:
            return await super().initialize(*args, **kwargs)
        except RedisClusterException as exc:
            raise _redis_error(exc) from exc


def _sentinel(topology: Topology, options: dict[str, Any], asynchronous: bool) -> Any:
    assert topology.service is not None
    tls = options.pop("connection_class", None) is SSLConnection
    if tls:
        options["ssl"] = True
    sentinel_options = {
        "socket_connect_timeout": options.get("socket_connect_timeout"),
        "socket_timeout": options.get("socket_timeout"),
        "retry": options.get("retry"),
        **{k: v for k, v in options.items() if k.startswith("ssl")},
        **topology.sentinel_options,
    }
    if asynchronous:
        from redis.asyncio.sentinel import Sentinel as AsyncSentinel

        nodes = list(topology.nodes)
        return AsyncSentinel(nodes, sentinel_kwargs=sentinel_options).master_for(  # type: ignore[no-untyped-call]
            topology.service, redis_class=_AsyncSentinelRedis, **options
        )
    from redis.sentinel import Sentinel

    sentinel = Sentinel(list(topology.nodes), sentinel_kwargs=sentinel_options)  # type: ignore[no-untyped-call]
    return sentinel.master_for(topology.service, redis_class=_SentinelRedis, **options)  # type: ignore[no-untyped-call]


class _SentinelRedis(redis.Redis):
    """The master's client; closing it closes the connections to the sentinels too."""

    def close(self) -> None:
        super().close()
        pool: Any = self.connection_pool
        for sentinel in pool.sentinel_manager.sentinels:
            sentinel.close()


class _AsyncSentinelRedis(aioredis.Redis):
    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        pool: Any = self.connection_pool
        for sentinel in pool.sentinel_manager.sentinels:
            await sentinel.aclose()


def credentials(url: str) -> tuple[str | None, str | None]:
    """The data nodes' username and password a URL carries (never a Sentinel's own)."""
    topology = parse(url)
    options = topology.options if topology is not None else parse_url(url)  # type: ignore[no-untyped-call]
    return options.get("username"), options.get("password")


def data_nodes(url: str, options: dict[str, Any]) -> tuple[Kind | None, list[redis.Redis]]:
    """A connection (sync, with ``options``, not yet connected) to every data node the URL
    names or reaches, failed ones included: for a cluster every node its ``CLUSTER NODES``
    lists (primaries and replicas, those it marks ``fail`` too), for Sentinel the master and
    every replica the sentinels know (``SENTINEL REPLICAS``, down ones too), else the one
    server. What must reach every node (the ACL users of tenant keys: Redis does not replicate
    ACL changes) goes through these, so a node that is down is one the caller can name, never
    one it skips unseen (``CLUSTER SLOTS`` and redis-py's ``discover_slaves`` leave failed
    replicas out). No node or sentinel answering is StoreUnavailableError (translated)."""
    topology = parse(url)
    if topology is None:
        return None, [redis.Redis.from_url(url, **options)]
    merged = {**topology.options, **options}
    if merged.pop("connection_class", None) is SSLConnection:
        merged["ssl"] = True
    if topology.kind == "cluster":
        addresses = _ask_first(topology.nodes, merged, _cluster_members)
    else:
        sentinel_options = {
            k: v for k, v in merged.items() if k.startswith(("socket_", "ssl", "retry"))
        }
        sentinel_options |= topology.sentinel_options
        assert topology.service is not None
        addresses = _sentinel_members(topology.nodes, sentinel_options, topology.service)
    return topology.kind, [redis.Redis(host=h, port=p, **merged) for h, p in addresses]


Address = tuple[str, int]


def cluster_members(reply: Any, asked: Address) -> list[Address]:
    """Every node in a ``CLUSTER NODES`` reply (text, or redis-py's parsed dict) that has an
    address, whatever its flags say (``fail``, ``fail?``): only a node still in handshake or
    without an address is left out. ``asked``: the node that answered (its own line may lack
    its IP before it learned it)."""
    lines: list[tuple[str, str]] = []
    if isinstance(reply, dict):
        lines = [(str(addr), str(info.get("flags", ""))) for addr, info in reply.items()]
    else:
        text = reply.decode() if isinstance(reply, bytes) else str(reply)
        for line in text.splitlines():
            fields = line.split()
            if len(fields) >= 3:
                lines.append((fields[1].split("@", 1)[0], fields[2]))
    found: list[Address] = []
    for addr, flag_text in lines:
        flags = flag_text.split(",")
        if "handshake" in flags or "noaddr" in flags:
            continue
        host, _, port = addr.rpartition(":")
        if "myself" in flags and not host:
            host = asked[0]
        if host and port.isdigit() and int(port) > 0 and (host, int(port)) not in found:
            found.append((host, int(port)))
    return found


def _cluster_members(node: redis.Redis, asked: Address) -> list[Address]:
    return cluster_members(node.execute_command("CLUSTER", "NODES"), asked)  # type: ignore[no-untyped-call]


def _ask_first(nodes: tuple[Address, ...], options: dict[str, Any], ask: Any) -> list[Address]:
    """``ask(connection, address)`` of the first node that answers; a node that cannot be
    reached is passed over, any other error (refused credentials) is raised, translated."""
    from agentbill._retry import translate, unreachable

    last: Exception | None = None
    for host, port in nodes:
        with redis.Redis(host=host, port=port, **options) as node:
            try:
                found: list[Address] = ask(node, (host, port))
                return found
            except (redis.RedisError, OSError) as exc:
                if not unreachable(exc):
                    raise translate(exc) from exc
                last = exc
    assert last is not None
    raise translate(last) from last


def _sentinel_members(
    sentinels: tuple[Address, ...], options: dict[str, Any], service: str
) -> list[Address]:
    """The master and every replica of ``service`` as every sentinel that answers knows them
    (their union: just after a failover two sentinels may still disagree)."""
    from agentbill._retry import translate, unreachable

    found: list[Address] = []
    last: Exception | None = None
    for host, port in sentinels:
        with redis.Redis(host=host, port=port, **options) as sentinel:
            try:
                master = sentinel.sentinel_master(service)
                replicas = sentinel.sentinel_slaves(service)
            except (redis.RedisError, OSError) as exc:
                if not (unreachable(exc) or isinstance(exc, redis.ResponseError)):
                    raise translate(exc) from exc
                last = exc  # down, or it does not monitor this service (yet)
                continue
        for info in [master, *replicas]:
            address = (_text(info["ip"]), int(info["port"]))
            if address not in found:
                found.append(address)
    if not found:
        assert last is not None
        raise translate(last) from last
    return found


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
