"""The only place that builds Redis key names.

Every key of one customer carries the same hash tag, ``{<tag>}``, so a script that touches all
of them runs on one Redis Cluster slot. The tag is a digest of the customer id, not the id
itself: customer ids may hold any printable character (``{``, ``}``, ``:``, ...), and a
reservation id must carry the tag while staying within the 256-character id limit.

Layout, for namespace ``ns`` and customer tag ``t``::

    ns:{t}:budget   hash  limits and counters of the customer and its agents
    ns:{t}:res      hash  reservation id -> open reservation (fields joined by \x1f)
    ns:{t}:exp      zset  reservation id, scored by expiry (ms, Redis clock)
    ns:{t}:open     zset  "<group>:<seq>:<reservation id>", lexical; oldest open per group
    ns:{t}:tasks    hash  "<task digest>:c|u|r|n" -> ceiling, used, reserved, name
    ns:{t}:tasksx   zset  task digest, scored by when it may be forgotten once idle
    ns:{t}:closed   hash  reservation id -> outcome of a closed reservation (joined by \x1f)
    ns:{t}:closedx  zset  reservation id, scored by when its outcome may be forgotten
    ns:{t}:ledger   stream every decision, record, release, expiry, threshold crossing
    ns:{t}:agents   zset  agent digest, scored by when it may be forgotten once idle
    ns:{t}:idem:<op>:<k>  str  idempotency record of a user's key k for one operation (TTL)
    ns:{t}:req:<id>       str  the client's own request id, so its retries land once (TTL)
    ns:{t}:stats:<d>      hash estimate statistics of one agent (d: digest of the agent id) or
                               of one agent's calls to one model (d: digest of both), kept by
                               settle.lua; expires after the idle retention without a record
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import quote

from agentbill._contract import FILE

RESERVATION_PREFIX = "rsv"


# Both are on the hot path of every call, for the same few ids over and over: cached.
@lru_cache(maxsize=65536)
def customer_tag(customer_id: str) -> str:
    """The hash tag shared by every key of ``customer_id`` (96-bit digest, hex)."""
    return hashlib.blake2b(customer_id.encode(), digest_size=12).hexdigest()


@lru_cache(maxsize=65536)
def digest(*parts: str) -> str:
    """A short fixed-length name for a tuple of ids (task refs, agent groups) inside a hash."""
    h = hashlib.blake2b(digest_size=12)
    for part in parts:
        h.update(part.encode())
        h.update(b"\x00")
    return h.hexdigest()


def namespace_prefix(namespace: str) -> str:
    """``namespace`` made safe for key names and ACL key patterns (no ``{}*?[]:``)."""
    return quote(namespace, safe="")


CUSTOMER_KEYS: tuple[str, ...] = tuple(k["name"] for k in FILE["customer_keys"])
"""The names of a customer's fixed keys, in the order every script takes them (the contract's):
each key is ``<prefix>:<name>``."""


@dataclass(frozen=True, slots=True)
class CustomerKeys:
    """The fixed keys of one customer (attributes named as in the contract; a test checks they
    are the same names), and the keys of one request."""

    prefix: str
    tag: str
    budget: str
    res: str
    exp: str
    open: str
    tasks: str
    tasksx: str
    closed: str
    closedx: str
    ledger: str
    agents: str

    @property
    def fixed(self) -> tuple[str, ...]:
        """KEYS[1..n] of every script, in the contract's order."""
        return tuple(getattr(self, name) for name in CUSTOMER_KEYS)

    def idempotency(self, operation: str, key: str) -> str:
        """The key remembering a user's idempotency key for one operation."""
        return f"{self.prefix}:idem:{operation}:{quote(key, safe='')}"

    def stats(self, agent_id: str, model: str | None = None) -> str:
        """The estimate statistics of one agent of this customer, or of its calls to one model
        (the LLM wrapper's)."""
        d = digest(agent_id) if model is None else digest(agent_id, "model", model)
        return f"{self.prefix}:stats:{d}"

    def request(self, token: str) -> str:
        """The key remembering one internal request id (the client's own retries)."""
        return f"{self.prefix}:req:{token}"


@lru_cache(maxsize=65536)
def _customer_keys(ns: str, tag: str) -> CustomerKeys:
    p = f"{ns}:{{{tag}}}"
    names: dict[str, str] = {name: f"{p}:{name}" for name in CUSTOMER_KEYS}
    return CustomerKeys(prefix=p, tag=tag, **names)


class KeySpace:
    """Key names for one namespace."""

    __slots__ = ("namespace", "prefix")

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.prefix = namespace_prefix(namespace)

    def customer(self, customer_id: str) -> CustomerKeys:
        return _customer_keys(self.prefix, customer_tag(customer_id))

    def by_tag(self, tag: str) -> CustomerKeys:
        return _customer_keys(self.prefix, tag)

    def pattern(self) -> str:
        """A glob matching every key of this namespace (for ACLs and admin scans)."""
        return f"{self.prefix}:*"


def reservation_id(tag: str, token: str) -> str:
    """An opaque reservation id that carries its customer's tag: ``rsv.<tag>.<token>``."""
    return f"{RESERVATION_PREFIX}.{tag}.{token}"


def tag_of_reservation(reservation_id: str) -> str | None:
    """The customer tag inside a reservation id, or None if the id is not one of ours."""
    parts = reservation_id.split(".")
    if len(parts) != 3 or parts[0] != RESERVATION_PREFIX:
        return None
    tag = parts[1]
    if len(tag) != 24 or any(ch not in "0123456789abcdef" for ch in tag):
        return None
    return tag
