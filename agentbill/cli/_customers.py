"""Which customers ``top`` and the exporter show: the ones named, else the ones found by SCAN.

Every customer that was ever preflighted, recorded or given a budget has a budget hash,
``<namespace>:{<tag>}:budget``, whose ``customer`` field holds its id. Finding them is a SCAN of
the whole keyspace (MATCH on that pattern, COUNT 1000: about one round trip per 1,000 keys of
the database, every namespace's included) and one HGET per customer found, pipelined. That is
too costly for every refresh or scrape, so the list is kept for ``rescan`` seconds. A SCAN
reaches one server: on Redis Cluster, and with a tenant key (its ACL refuses SCAN), name the
customers instead.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import redis

from agentbill._exceptions import StoreError, StoreUnavailableError
from agentbill._keys import KeySpace
from agentbill._models import UsageRequest, validate
from agentbill._retry import translated
from agentbill.cli._common import Failed

SCAN_COUNT = 1000
CUSTOMER_FIELD = "customer"


def budget_key_pattern(namespace: str) -> str:
    """A SCAN pattern for the budget hash of every customer of ``namespace``."""
    return KeySpace(namespace).by_tag("*").budget


def scan_customers(r: redis.Redis, namespace: str) -> list[str]:
    """Every customer id of ``namespace`` on this server, sorted."""
    found: set[str] = set()
    try:
        with translated():
            for keys in _batches(r, budget_key_pattern(namespace)):
                pipe = r.pipeline(transaction=False)
                for key in keys:
                    pipe.hget(key, CUSTOMER_FIELD)
                for value in pipe.execute():
                    if value is not None:
                        found.add(value.decode() if isinstance(value, bytes) else str(value))
    except StoreUnavailableError:
        raise
    except StoreError as error:  # a refusal of its own (a key that may not SCAN, say)
        raise Failed(f"cannot list the customers ({error}); name them with --customer") from error
    return sorted(found)


def _batches(r: redis.Redis, pattern: str) -> Iterator[list[bytes | str]]:
    """The keys matching ``pattern``, one SCAN reply at a time."""
    cursor = 0
    while True:
        cursor, keys = r.scan(cursor=cursor, match=pattern, count=SCAN_COUNT, _type="hash")
        if keys:
            yield list(keys)
        if cursor == 0:
            return


class Customers:
    """The customers to show: ``named`` if any, else those SCAN finds, found again after
    ``rescan`` seconds.

    Raises InvalidRequestError naming ``customer_id`` when a named one is not a valid id.
    """

    def __init__(
        self, r: redis.Redis, namespace: str, named: Sequence[str], rescan: float = 60.0
    ) -> None:
        self._redis = r
        self._namespace = namespace
        for customer in named:  # one no budget can have is bad input now, not a failed scrape
            validate(UsageRequest, customer_id=customer)
        self._named = list(dict.fromkeys(named))
        self._rescan = rescan
        self._found: list[str] = []
        self._found_at: float | None = None

    @property
    def discovered(self) -> bool:
        """True when the customers are found by SCAN rather than named."""
        return not self._named

    def current(self) -> list[str]:
        if self._named:
            return self._named
        now = time.monotonic()
        if self._found_at is None or now - self._found_at >= self._rescan:
            self._found = scan_customers(self._redis, self._namespace)
            self._found_at = now
        return self._found
