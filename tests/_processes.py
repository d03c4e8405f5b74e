"""The multiprocessing context of every test that races real processes on one budget.

"forkserver": the first worker started in a session starts a server process, a fresh
interpreter that imports agentbill, redis-py and the test helpers once; every worker is then
forked from it. Each worker is still a process of its own with its own client and its own
connections, and inherits nothing from the test process (no client, no socket, no thread, no
lock): what "spawn" gives, without paying an interpreter start-up and agentbill's imports for
every worker (about half a second of CPU each, seconds for a fleet on a 2-core machine).

A worker sees the environment of the test process as it was when the server started: pass a
worker what it needs as arguments, never by changing ``os.environ`` in a test.
"""

from __future__ import annotations

import multiprocessing

CTX = multiprocessing.get_context("forkserver")
CTX.set_forkserver_preload(["agentbill", "redis", "pytest", "tests.test_concurrency"])
