"""The Celery app that tests/test_contrib_celery.py runs in real worker processes.

Broker, result backend and agentbill all live on the suite's redis-server; the test passes the
URLs and the agentbill namespace through the environment (the worker imports this module with
``-A tests._celery_app``). Bodies leave markers in Redis (``<namespace>:marker:...``) so the test
can see whether, how often and where (which pid) they ran.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from typing import Any

import redis
from celery import Celery
from celery.signals import task_postrun, task_prerun

from agentbill import AgentBillClient
from agentbill.contrib.celery import BudgetedTask, JobBudget, header, param

BROKER_ENV = "AGENTBILL_TEST_CELERY_BROKER"
"""Broker and result backend URL."""
REDIS_ENV = "AGENTBILL_TEST_CELERY_REDIS"
"""Where agentbill and the markers live."""
NAMESPACE_ENV = "AGENTBILL_TEST_CELERY_NAMESPACE"
BUSY_REDIS_ENV = "AGENTBILL_TEST_CELERY_BUSY_REDIS"
"""A second agentbill server (``lua-time-limit`` 20 ms) that ``busy_at_end`` makes busy."""
QUICK_REDELIVERY_ENV = "AGENTBILL_TEST_CELERY_QUICK_REDELIVERY"
"""Set: unacked messages are redelivered 2 s after their worker vanished (not 1 hour)."""

UNSET = "redis://127.0.0.1:1/0"  # the test process configures its own copy before use
ESTIMATE = 10

NAMESPACE = os.environ.get(NAMESPACE_ENV, "celery-tests")

app = Celery("tests._celery_app")
app.conf.update(
    broker_url=os.environ.get(BROKER_ENV, UNSET),
    result_backend=os.environ.get(BROKER_ENV, UNSET),
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
)
if os.environ.get(QUICK_REDELIVERY_ENV):
    app.conf.broker_transport_options = {
        "visibility_timeout": 2,
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    }

client = AgentBillClient(redis_url=os.environ.get(REDIS_ENV, UNSET), namespace=NAMESPACE)
busy_client = AgentBillClient(redis_url=os.environ.get(BUSY_REDIS_ENV, UNSET), namespace=NAMESPACE)


@functools.cache
def markers() -> redis.Redis:
    return redis.Redis.from_url(os.environ.get(REDIS_ENV, UNSET), decode_responses=True)


def marker(kind: str, task_id: str | None) -> str:
    return f"{NAMESPACE}:marker:{kind}:{task_id}"


@task_prerun.connect
def count_starts(sender: Any = None, task_id: str = "", **_: Any) -> None:
    """Every time a worker starts this task id, before any preflight."""
    if getattr(sender, "app", None) is app:
        markers().incr(marker("prerun", task_id))


@task_postrun.connect
def count_ends(sender: Any = None, task_id: str = "", **_: Any) -> None:
    """Every time a run of this task id ended, after its record or release."""
    if getattr(sender, "app", None) is app:
        markers().incr(marker("postrun", task_id))


def _ran(task_id: str | None) -> int:
    count: int = markers().incr(marker("ran", task_id))
    markers().set(marker("pid", task_id), os.getpid())
    return count


def _used(result: int) -> int:
    return result


def budget(**overrides: Any) -> JobBudget:
    values: dict[str, Any] = {
        "client": client,
        "agent_id": "agent",
        "estimated_units": ESTIMATE,
        "customer_id": param("customer_id"),
        "units": _used,
    }
    return JobBudget(**{**values, **overrides})


@app.task(
    bind=True,
    base=BudgetedTask,
    budget=budget(),
    autoretry_for=(Exception,),
    retry_kwargs={"countdown": 0, "max_retries": 3},
)
def charge(self: BudgetedTask[Any, Any], customer_id: str, used: int) -> int:
    """Charged ``used``. Any exception is autoretried: a refusal must not be."""
    _ran(self.request.id)
    return used


@app.task(bind=True, base=BudgetedTask, budget=budget(customer_id=header("customer")))
def charge_header(self: BudgetedTask[Any, Any], used: int) -> int:
    """Its customer comes from the message header ``customer``."""
    _ran(self.request.id)
    return used


@app.task(bind=True, base=BudgetedTask, budget=budget())
def boom(self: BudgetedTask[Any, Any], customer_id: str) -> int:
    _ran(self.request.id)
    raise ValueError("the body failed")


@app.task(
    bind=True,
    base=BudgetedTask,
    budget=budget(),
    autoretry_for=(ConnectionError,),
    retry_kwargs={"countdown": 0},
    max_retries=2,
)
def flaky(self: BudgetedTask[Any, Any], customer_id: str, how: str) -> int:
    """Attempt 0 fails (``self.retry()`` or an autoretried error); attempt 1 notes what the
    customer had reserved while it ran, and uses 4."""
    attempt = self.request.retries
    markers().set(
        marker(f"reserved-{attempt}", self.request.id), client.get_budget(customer_id).reserved
    )
    if attempt == 0:
        if how == "retry":
            raise self.retry(countdown=0)
        raise ConnectionError("transient")
    return 4


@app.task(bind=True, base=BudgetedTask, budget=budget(), soft_time_limit=1)
def soft_limited(self: BudgetedTask[Any, Any], customer_id: str) -> int:
    _ran(self.request.id)
    time.sleep(60)
    return 1


@app.task(bind=True, base=BudgetedTask, budget=budget(), time_limit=2)
def hard_limited(self: BudgetedTask[Any, Any], customer_id: str) -> int:
    _ran(self.request.id)
    time.sleep(60)
    return 1


@app.task(bind=True, base=BudgetedTask, budget=budget())
def hang(self: BudgetedTask[Any, Any], customer_id: str) -> int:
    """Runs until the test kills its process or revokes it."""
    _ran(self.request.id)
    time.sleep(60)
    return 1


@app.task(bind=True, base=BudgetedTask, budget=budget(), acks_late=True)
def hang_first_time(self: BudgetedTask[Any, Any], customer_id: str, used: int) -> int:
    """acks_late: the first delivery hangs until the test kills the worker; the redelivery
    returns."""
    delivery = _ran(self.request.id)
    reserved = client.get_budget(customer_id).reserved
    markers().set(marker(f"reserved-{delivery}", self.request.id), reserved)
    if delivery == 1:
        time.sleep(60)
    return used


def go_marker(task_id: str | None, delivery: int) -> str:
    return marker(f"go-{delivery}", task_id)


def _wait_for_go(task_id: str | None, delivery: int) -> None:
    """Block until the test sets this delivery's go marker (at most 60 s)."""
    deadline = time.monotonic() + 60
    while not markers().exists(go_marker(task_id, delivery)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"delivery {delivery} of {task_id} never got its go")
        time.sleep(0.02)


@app.task(bind=True, base=BudgetedTask, budget=budget(), acks_late=True)
def on_cue(self: BudgetedTask[Any, Any], customer_id: str, used: int, outcomes: str) -> int:
    """acks_late: with the quick visibility timeout, the broker delivers the message again while
    the first delivery still runs. Delivery n waits for the test's go, then fails if the n-th
    letter of ``outcomes`` is "f", else returns ``used``."""
    delivery = _ran(self.request.id)
    _wait_for_go(self.request.id, delivery)
    if outcomes[delivery - 1] == "f":
        raise ValueError(f"delivery {delivery} failed on cue")
    return used


@app.task(
    bind=True,
    base=BudgetedTask,
    budget=budget(),
    autoretry_for=(ConnectionError,),
    retry_kwargs={"countdown": 0},
    max_retries=3,
)
def fails_twice(self: BudgetedTask[Any, Any], customer_id: str, used: int) -> int:
    """Its first two runs raise an autoretried error; later runs return ``used``."""
    if _ran(self.request.id) <= 2:
        raise ConnectionError("transient")
    return used


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


@app.task(bind=True, base=BudgetedTask, budget=budget(client=busy_client))
def busy_at_end(self: BudgetedTask[Any, Any], customer_id: str, used: int) -> int:
    """Its budget lives on the second server, which another client's script makes busy for
    2.5 s just as the body returns: longer than the record's retries."""
    _ran(self.request.id)
    busy_for(os.environ[BUSY_REDIS_ENV], 2500)
    return used
