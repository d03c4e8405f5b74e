"""Locks made anew in a forked child.

A child gets a copy of every lock in the state it had at ``fork()``: a lock that another
thread of the parent held stays held in the child, where that thread does not exist, and the
child's first use of it waits forever. Every object of a client that owns a lock registers
here; in the child, before any other code runs, each one's ``_after_fork()`` replaces its
locks and forgets what belonged to the parent process (its queue, its threads).
"""

from __future__ import annotations

import os
import weakref
from typing import Protocol


class ForkSafe(Protocol):
    def _after_fork(self) -> None:
        """Called in a forked child: make new locks; drop the parent's per-process state."""


_objects: weakref.WeakSet[ForkSafe] = weakref.WeakSet()


def reset_at_fork(obj: ForkSafe) -> None:
    """Have ``obj._after_fork()`` run in every child forked from now on (while obj lives)."""
    _objects.add(obj)


def _in_child() -> None:
    for obj in list(_objects):
        obj._after_fork()


os.register_at_fork(after_in_child=_in_child)
