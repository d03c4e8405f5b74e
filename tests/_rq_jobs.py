"""Budgeted job functions for tests/test_contrib_rq.py, imported by RQ's work horses.

The test passes the server and the namespace through the environment. Every job writes what a
test asserts on under ``rqtest:<namespace>:``: the attempts its preflights saw, and how often
its body ran.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import redis
import rq

from agentbill import AgentBillClient
from agentbill.contrib.rq import JobBudget, JobCall, budgeted, header

P = ParamSpec("P")
R = TypeVar("R")

URL = os.environ["AGENTBILL_REDIS_URL"]
NAMESPACE = os.environ["AGENTBILL_RQ_TEST_NAMESPACE"]
AGENT = "rq-agent"
ESTIMATE = 10

client = AgentBillClient(redis_url=URL, namespace=NAMESPACE)
store = redis.Redis.from_url(URL, decode_responses=True)
BUSY_URL = os.environ.get("AGENTBILL_RQ_TEST_BUSY_URL", URL)
"""A second agentbill server (``lua-time-limit`` 20 ms) that ``busy_at_end`` makes busy."""
busy_client = AgentBillClient(redis_url=BUSY_URL, namespace=NAMESPACE)
OFFLINE_URL = os.environ.get("AGENTBILL_RQ_TEST_OFFLINE_URL", URL)
"""A second agentbill server, which ``offline_first`` finds down on its first run."""
offline_client = AgentBillClient(redis_url=OFFLINE_URL, namespace=NAMESPACE, on_outage="fail_open")


def attempts_key(job_id: str) -> str:
    return f"rqtest:{NAMESPACE}:attempts:{job_id}"


def runs_key(job_id: str) -> str:
    return f"rqtest:{NAMESPACE}:runs:{job_id}"


def customer(call: JobCall) -> str:
    """The ``customer_id`` argument; in a work horse, also notes the attempt it preflights."""
    if rq.get_current_job() is not None:
        store.rpush(attempts_key(call.job_id), call.attempt)
    value: str = call.arguments["customer_id"]
    return value


def body_ran() -> int:
    """Count a run of the current job's body (of a direct call: under "direct"); returns how
    many runs so far."""
    job = rq.get_current_job()
    return int(store.incr(runs_key(job.id if job is not None else "direct")))


@budgeted(client, agent_id=AGENT, estimated_units=ESTIMATE, customer_id=customer, units=len)
def summarise(customer_id: str, text: str) -> str:
    body_ran()
    return text


@budgeted(client, agent_id=AGENT, estimated_units=ESTIMATE, customer_id=customer, units=len)
async def summarise_async(customer_id: str, text: str) -> str:
    body_ran()
    await asyncio.sleep(0)
    return text


@budgeted(
    JobBudget(
        client=client,
        agent_id=AGENT,
        estimated_units=ESTIMATE,
        customer_id=header("customer_id"),  # from job.meta
        units=len,
    )
)
def tagged(text: str) -> str:
    body_ran()
    return text


@budgeted(client, agent_id=AGENT, estimated_units=ESTIMATE, customer_id=customer)
def crash(customer_id: str) -> None:
    body_ran()
    raise RuntimeError("the agent crashed")


@budgeted(client, agent_id=AGENT, estimated_units=ESTIMATE, customer_id=customer, units=3)
def flaky(customer_id: str) -> str:
    """Raises on its first run, succeeds after."""
    if body_ran() == 1:
        raise RuntimeError("transient")
    return "ok"


@budgeted(client, agent_id=AGENT, estimated_units=ESTIMATE, customer_id=customer, units=4)
def ask_again(customer_id: str) -> str | rq.Retry:
    """Returns rq.Retry on its first run (RQ runs it again), succeeds after."""
    if body_ran() == 1:
        return rq.Retry(max=1)
    return "done"


@budgeted(client, agent_id=AGENT, estimated_units=ESTIMATE, customer_id=customer)
def hang(customer_id: str) -> None:
    """Runs until RQ's death penalty interrupts it (the test enqueues it with a timeout)."""
    body_ran()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.05)


@budgeted(client, agent_id=AGENT, estimated_units=ESTIMATE, customer_id=customer, units=2)
def die(customer_id: str) -> str:
    """Its work horse kills itself (no Python code runs after) on the first run."""
    if body_ran() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return "survived"


def go_key(job_id: str, run: int) -> str:
    return f"rqtest:{NAMESPACE}:go:{job_id}:{run}"


def wait_for_go(job_id: str, run: int) -> None:
    """Block until the test sets the go marker of this run of the job (at most 60 s)."""
    deadline = time.monotonic() + 60
    while not store.exists(go_key(job_id, run)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"run {run} of {job_id} never got its go")
        time.sleep(0.02)


@budgeted(client, agent_id=AGENT, estimated_units=ESTIMATE, customer_id=customer, units=7)
def on_cue(customer_id: str, outcomes: str) -> str:
    """Run n waits for the test's go, then fails if the n-th letter of ``outcomes`` is "f"
    and returns otherwise (charged 7)."""
    job = rq.get_current_job()
    assert job is not None
    run = body_ran()
    wait_for_go(job.id, run)
    if outcomes[run - 1] == "f":
        raise RuntimeError(f"run {run} failed on cue")
    return "ok"


@budgeted(client, agent_id=AGENT, estimated_units=ESTIMATE, customer_id=customer, units=4)
def fails_twice(customer_id: str) -> str:
    """Raises on its first two runs, succeeds after."""
    if body_ran() <= 2:
        raise RuntimeError("transient")
    return "ok"


def traced(fn: Callable[P, R]) -> Callable[P, R]:
    """A decorator of the user's, stacked above @budgeted."""

    @functools.wraps(fn)
    def traced_call(*args: P.args, **kwargs: P.kwargs) -> R:
        store.incr(f"rqtest:{NAMESPACE}:traced")
        return fn(*args, **kwargs)

    return traced_call


@traced
@budgeted(client, agent_id=AGENT, estimated_units=ESTIMATE, customer_id=customer, units=len)
def traced_summarise(customer_id: str, text: str) -> str:
    body_ran()
    return text


@traced
@budgeted(client, agent_id=AGENT, estimated_units=ESTIMATE, customer_id=customer, units=2)
def traced_die(customer_id: str) -> str:
    """Its work horse kills itself (no Python code runs after) on the first run."""
    if body_ran() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return "survived"


def opaque_summarise(customer_id: str, text: str) -> str:
    """A hand-made wrapper of summarise: it copies summarise's attributes, not ``__wrapped__``."""
    return summarise(customer_id, text)


opaque_summarise.__dict__.update(
    {name: value for name, value in summarise.__dict__.items() if name != "__wrapped__"}
)


SLOW_SCRIPT = """
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local start = now()
while now() - start < tonumber(ARGV[1]) do end
return 1
"""


def busy_for(url: str, ms: int) -> None:
    """Another connection runs a script for ``ms`` on the server at ``url``: past its
    ``lua-time-limit`` it answers BUSY to everyone else. Returns once it does."""
    runner = redis.Redis.from_url(url, socket_timeout=60)
    threading.Thread(target=runner.eval, args=(SLOW_SCRIPT, 0, ms), daemon=True).start()
    probe = redis.Redis.from_url(url, socket_timeout=5)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            probe.ping()
        except redis.ResponseError:
            return
        time.sleep(0.01)
    raise RuntimeError("the server never answered BUSY")


@budgeted(busy_client, agent_id=AGENT, estimated_units=ESTIMATE, customer_id=customer, units=7)
def busy_at_end(customer_id: str) -> str:
    """Its budget lives on the second server, which another client's script makes busy for
    2.5 s just as the body returns: longer than the record's retries."""
    body_ran()
    busy_for(BUSY_URL, 2500)
    return "ok"


@budgeted(client, agent_id=AGENT, estimated_units=50, customer_id=customer, units=50)
def records_without_an_id(customer_id: str) -> tuple[int, int, int]:
    """Runs the README's first example (a preflight, a record without an id) while it holds
    its own reservation; what the customer's budget showed right after."""
    body_ran()
    client.preflight(AGENT, 1, customer_id)
    client.record(AGENT, 1, customer_id)
    status = client.get_budget(customer_id)
    return status.spent, status.reserved, status.open_reservations


@budgeted(offline_client, agent_id=AGENT, estimated_units=ESTIMATE, customer_id=customer, units=6)
def offline_first(customer_id: str) -> str:
    """Its budget lives on the second server. Its first run was approved offline (the test
    killed that server) and waits for its go (the test restarts the server first)."""
    job = rq.get_current_job()
    assert job is not None
    run = body_ran()
    if run == 1:
        wait_for_go(job.id, run)
    return "done"
