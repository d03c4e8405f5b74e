"""The reservations this client made, so that a record without an id closes one of its own.

``record(agent_id, units, customer_id)`` without a reservation id closes an open reservation of
the same (customer, agent, task_ref). It closes one this client made, if one is still open, before
anything else: otherwise it would take the group's oldest, which may be another worker's, whose
own record would then find its reservation closed (the scripts still charge that record, flagged
``late``, so nothing is lost, but the holds move between workers). The script falls back to the
group's oldest, then to a direct charge, when the one named here is no longer open.

The book is per process and in memory, bounded (:data:`LIMIT` reservations; the oldest are
forgotten first), and forgets a reservation once it is settled by id or past its expiry. A child
process after ``fork()`` starts with an empty book: its parent's reservations are its parent's.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from datetime import datetime

from agentbill._fork import reset_at_fork

LIMIT = 100_000
"""Reservations remembered per client; beyond it, the oldest are forgotten (they are then
closed like anyone's: the group's oldest first)."""

Group = tuple[str, str, str | None]
"""(customer id, agent id, task_ref): the reservations a record without an id may close."""


class OwnReservations:
    """Open reservations this client made, oldest first per group; safe across threads."""

    def __init__(self) -> None:
        self._after_fork()
        reset_at_fork(self)

    def _after_fork(self) -> None:
        """A new book (and lock): a forked child's reservations are its own."""
        self._lock = threading.Lock()
        self._groups: dict[Group, OrderedDict[str, float]] = {}
        self._group_of: OrderedDict[str, Group] = OrderedDict()

    def add(self, group: Group, rid: str, expires_at: datetime | None) -> None:
        """Remember reservation ``rid`` of ``group``, open until ``expires_at``."""
        deadline = expires_at.timestamp() if expires_at is not None else float("inf")
        with self._lock:
            if rid in self._group_of:
                return
            self._groups.setdefault(group, OrderedDict())[rid] = deadline
            self._group_of[rid] = group
            while len(self._group_of) > LIMIT:
                old, old_group = self._group_of.popitem(last=False)
                self._forget(old_group, old)

    def oldest(self, group: Group) -> str | None:
        """The oldest reservation of ``group`` not past its expiry (those past it are forgotten);
        None if there is none. It stays remembered until :meth:`discard`: a record that failed
        closed nothing."""
        now = time.time()
        with self._lock:
            rids = self._groups.get(group)
            while rids:
                rid, deadline = next(iter(rids.items()))
                if deadline > now:
                    return rid
                del rids[rid]
                del self._group_of[rid]
            self._groups.pop(group, None)
            return None

    def discard(self, rid: str | None) -> None:
        """Forget ``rid``: it was settled by a request naming it."""
        if rid is None:
            return
        with self._lock:
            group = self._group_of.pop(rid, None)
            if group is not None:
                self._forget(group, rid)

    def _forget(self, group: Group, rid: str) -> None:
        rids = self._groups.get(group)
        if rids is not None:
            rids.pop(rid, None)
            if not rids:
                del self._groups[group]

    def __len__(self) -> int:
        return len(self._group_of)
