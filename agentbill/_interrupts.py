"""SIGINT held back while a sync round trip or a settle runs, then raised again.

A KeyboardInterrupt that lands inside redis-py (between taking a pooled connection and the
``try`` that gives it back, inside the pool's queue while it holds its lock, or between sending
a command and reading its reply) leaks the connection, deadlocks the pool for good, or leaves a
reply unread for the next call to take as its own. And one that lands between a run's end and
its record leaves the run uncharged. So the sync client holds SIGINT for each round trip (each
is bounded by the client's timeouts), and the gate from a body's return through its record;
the interrupt is raised as soon as that is done, as it would have been.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["interrupts_held"]


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """SIGINT held back while the block runs, then raised again (as it would have been:
    ``KeyboardInterrupt`` with the default handler). Holds nest. Only the main thread receives
    signals, so elsewhere, or when SIGINT's handler is not Python's, nothing is changed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:  # set outside Python: it cannot be put back
        yield
        return
    held: list[int] = []
    try:
        signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    except ValueError:  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            signal.raise_signal(signal.SIGINT)
