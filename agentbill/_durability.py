"""``durability="replicated"``: a write returns only once a replica has it.

Redis replicates asynchronously: a primary acknowledges a write before any replica has it, so a
failover (Sentinel or Cluster promoting a replica) can lose approvals and records the old
primary already acknowledged. With ``durability="replicated"`` every script call that writes
is followed, on the same connection and in the same pipelined round trip, by ``WAIT
<durability_replicas> <timeout>``: Redis answers once that many replicas have acknowledged
everything this connection wrote.

How many: every replica the primary has (``durability_replicas``, 1 by default). WAIT counts
replicas, not the one a failover will promote: with two replicas and ``WAIT 1``, a failover
that leaves the old primary up (``SENTINEL FAILOVER``, a partition) promotes replica A while
the old primary keeps acknowledging writes that replica B confirms; then both follow A and
those writes are gone. Waiting for all of them closes that, at a price: one replica down or
lagging makes every write fail in doubt until it is back.

Why the same round trip, and not a transaction: WAIT covers the writes of the connection it is
sent on, so it must follow the script on that connection; pipelining the two costs no second
round trip, and Redis runs them in order. Inside MULTI/EXEC WAIT cannot block, so it would
confirm nothing.

On a Redis Cluster each item goes, with WAIT after it, to the node that owns its slot, in one
pipeline per node (:func:`send_on_nodes`): redis-py's cluster pipeline would send WAIT to a
node of its choosing, and after a redirection re-send an item on another connection than its
WAIT. An item answered MOVED or ASK (its slot moved, or is moving) ran nothing: the slot map is
refreshed and the batch fails with TRYAGAIN, "not now", for the retry policy to send again
(items that had run on other nodes then answer as replays of themselves). A slot that stays
in migration for longer than the retry deadline makes such calls StoreBusyError; redis-py's
own ASKING path is not used, as it would send the item apart from its WAIT.

Why WAIT and not WAITAOF: the promise is that one failover loses nothing acknowledged, and a
promoted replica holds what WAIT confirmed in its memory. WAITAOF's replica count needs
``appendonly yes`` on the replicas (without it every write would time out) and guards against
the primary and the replica crashing together, which no single failover does; Redis 7.0 lacks
it too.

A write a replica did not confirm in time is :class:`ReplicaTimeout`: a redis-py timeout, so
the one retry policy treats it as a lost reply (in doubt: it may have landed on the primary,
and may or may not survive a failover). It is retried with the same request id, which cannot
reserve or charge twice, and ends as StoreUnavailableError if no replica confirms within the
retry deadline.
"""

from __future__ import annotations

from typing import Any, Literal

from redis import exceptions as rx

Durability = Literal["primary", "replicated"]

WRITES = frozenset({"preflight", "extend", "settle", "set_budget", "set_limits", "open_task"})
"""The scripts that write (the reads' reaping of expired reservations is redone if lost)."""


class ReplicaTimeout(rx.TimeoutError):
    """No replica confirmed a write within the WAIT timeout (the write may have landed)."""


def wait_command(
    durability: Durability, replicas: int, socket_timeout: float
) -> tuple[object, ...] | None:
    """The command that follows each write (None: none): WAIT for ``replicas`` replicas. Its
    timeout is half the socket timeout, so Redis answers before the client stops reading."""
    if durability == "primary":
        return None
    return ("WAIT", replicas, max(1, int(socket_timeout * 500)))


# WAIT's error replies when the node stopped being a primary under it (a failover demoting it,
# or REPLICAOF): the writes before it ran, and nothing confirmed them. In doubt, as a timeout.
_DEMOTED = ("UNBLOCKED", "WAIT cannot be used with replica")


def check_acked(reply: object, replicas: int) -> None:
    """Raise ReplicaTimeout unless WAIT's reply says ``replicas`` replicas (the number the
    command asked for, :func:`wait_command`) have the writes. An error reply
    of a node that a failover just demoted is a ReplicaTimeout too; another (a refused WAIT,
    say) is raised as it is."""
    if isinstance(reply, rx.ResponseError) and str(reply).startswith(_DEMOTED):
        raise ReplicaTimeout(
            f"the node stopped being the primary before a replica confirmed the write ({reply}):"
            " it may or may not survive the failover"
        ) from reply
    if isinstance(reply, Exception):
        raise reply
    if not isinstance(reply, int) or reply < replicas:
        raise ReplicaTimeout(
            f"fewer replicas than durability_replicas={replicas} confirmed the write in time"
            f" (WAIT answered {reply!r}): it may or may not survive a failover"
        )


def _by_node(nodes: list[Any]) -> dict[str, tuple[Any, list[int]]]:
    """The items' indexes grouped by their node."""
    groups: dict[str, tuple[Any, list[int]]] = {}
    for i, node in enumerate(nodes):
        groups.setdefault(node.name, (node, []))[1].append(i)
    return groups


def _redirected(answered: list[object]) -> rx.TryAgainError | None:
    moved = [a for a in answered if isinstance(a, rx.AskError)]  # MovedError is an AskError
    if not moved:
        return None
    return rx.TryAgainError(f"the cluster's slots moved under the batch ({moved[0]}): again")


def send_on_nodes(
    cluster: Any, commands: list[list[Any]], wait: tuple[object, ...]
) -> tuple[list[object], list[object]]:
    """Each command (an FCALL: function, key count, keys...) on the node owning its slot (its
    first key's), WAIT after them on the same connection, one pipeline per node: the answers
    in order, and WAIT's replies."""
    answered: list[object] = [None] * len(commands)
    acks: list[object] = []
    nodes = [cluster.get_node_from_key(args[3]) for args in commands]
    for node, indexes in _by_node(nodes).values():
        pipe = node.redis_connection.pipeline(transaction=False)
        for i in indexes:
            pipe.execute_command(*commands[i])
        pipe.execute_command(*wait)
        try:
            replies = pipe.execute(raise_on_error=False)
        except rx.ConnectionError:
            cluster.nodes_manager.initialize()  # the node may be gone: learn the slots again
            raise
        acks.append(replies.pop())
        for i, reply in zip(indexes, replies, strict=True):
            answered[i] = reply
    moved = _redirected(answered)
    if moved is not None:
        cluster.nodes_manager.initialize()
        raise moved
    return answered, acks


async def asend_on_nodes(
    cluster: Any, commands: list[list[Any]], wait: tuple[object, ...]
) -> tuple[list[object], list[object]]:
    """:func:`send_on_nodes` for redis.asyncio's cluster client."""
    from redis.asyncio.cluster import PipelineCommand

    await cluster.initialize()
    answered: list[object] = [None] * len(commands)
    acks: list[object] = []
    nodes = [cluster.get_node_from_key(args[3]) for args in commands]
    for node, indexes in _by_node(nodes).values():
        sent = [PipelineCommand(i, *commands[i]) for i in indexes]
        sent.append(PipelineCommand(len(commands), *wait))
        try:
            await node.execute_pipeline(sent)
            for command in sent:  # a lost connection is the batch's failure, in doubt
                if isinstance(command.result, rx.ConnectionError | rx.TimeoutError | OSError):
                    raise command.result
        except (rx.ConnectionError, OSError):
            await cluster.nodes_manager.initialize()  # the node may be gone
            raise
        acks.append(sent.pop().result)
        for command in sent:
            answered[command.position] = command.result
    moved = _redirected(answered)
    if moved is not None:
        await cluster.nodes_manager.initialize()
        raise moved
    return answered, acks
