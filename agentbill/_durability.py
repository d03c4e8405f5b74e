"""``durability="replicated"``: a write returns only once a replica has it.

Redis replicates asynchronously: a primary acknowledges a write before any replica has it, so a
failover (Sentinel or Cluster promoting a replica) can lose approvals and records the old
primary already acknowledged. With ``durability="replicated"`` every script call that writes
is followed, on the same connection and in the same pipelined round trip, by ``WAIT 1
<timeout>``: Redis answers once one replica has acknowledged everything this connection wrote.

Why the same round trip, and not a transaction: WAIT covers the writes of the connection it is
sent on, so it must follow the script on that connection; pipelining the two costs no second
round trip, and Redis runs them in order. Inside MULTI/EXEC WAIT cannot block, so it would
confirm nothing.

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

from typing import Literal

from redis import exceptions as rx

Durability = Literal["primary", "replicated"]

WRITES = frozenset({"preflight", "settle", "set_budget", "set_limits", "open_task"})
"""The scripts that write (the reads' reaping of expired reservations is redone if lost)."""

REPLICAS = 1


class ReplicaTimeout(rx.TimeoutError):
    """No replica confirmed a write within the WAIT timeout (the write may have landed)."""


def wait_command(durability: Durability, socket_timeout: float) -> tuple[object, ...] | None:
    """The command that follows each write (None: none). Its timeout is half the socket
    timeout, so Redis answers before the client stops reading."""
    if durability == "primary":
        return None
    return ("WAIT", REPLICAS, max(1, int(socket_timeout * 500)))


def check_acked(reply: object) -> None:
    """Raise ReplicaTimeout unless WAIT's reply says a replica has the writes (an error reply,
    a refused WAIT say, is raised as it is)."""
    if isinstance(reply, Exception):
        raise reply
    if not isinstance(reply, int) or reply < REPLICAS:
        raise ReplicaTimeout(
            f"no replica confirmed the write in time (WAIT answered {reply!r}): it may or may "
            "not survive a failover"
        )
