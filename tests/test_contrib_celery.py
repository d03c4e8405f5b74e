"""agentbill.contrib.celery end to end: real worker processes (prefork pool) consuming from the
suite's redis-server (Celery's Redis broker and result backend), charging a budget in the same
server. The tasks live in tests/_celery_app.py; their bodies leave markers in Redis."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from celery import Celery
from celery.app.task import Context
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded, WorkerLostError
from celery.result import AsyncResult
from celery.signals import task_prerun

from agentbill import (
    AgentBillClient,
    AgentBillError,
    BudgetExhaustedError,
    InvalidRequestError,
    RunBlockedError,
    StoreBusyError,
)
from agentbill.contrib.celery import TTL_MARGIN, BudgetedTask, JobBudget, header, param
from tests import _celery_app as tasks
from tests._servers import RedisServer, running

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")

pytestmark = pytest.mark.timeout(120)


# -- helpers -----------------------------------------------------------------------------------


def wait_for(what: str, probe: Callable[[], T], timeout: float = 20.0) -> T:
    """Poll ``probe`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def broker_url(server: RedisServer, db: int) -> str:
    return f"redis://127.0.0.1:{server.port}/{db}"


class Worker:
    """``celery -A tests._celery_app worker --pool=prefork`` in its own process group."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Worker:
        name = f"w{uuid.uuid4().hex[:8]}@%h"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "tests._celery_app", "worker",
                 "--pool=prefork", "--concurrency=2", "-l", "info", "-n", name,
                 "--without-heartbeat", "--without-gossip", "--without-mingle"],
                cwd=ROOT,
                env={**os.environ, **self.env},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its pool children share its process group
            )  # fmt: skip
        started = self.log.stat().st_size if self.log.exists() else 0
        try:
            wait_for("the worker to be ready", lambda: self._ready(started), timeout)
        except BaseException as exc:
            self.kill()
            raise AssertionError(f"{exc}; its log:\n{self.tail()}") from exc
        return self

    def _ready(self, since: int) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the worker exited ({self.proc.returncode})")
        return " ready." in self.log.read_text(errors="replace")[since:]

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL to the worker and its pool children at once: nothing runs any more code."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.proc = None

    def stop(self) -> None:
        """Warm shutdown; whatever is left after 10 s is killed."""
        if self.proc is not None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        self.kill()


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def namespace() -> str:
    return f"celery-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def busy_server() -> Iterator[RedisServer]:
    """A second agentbill server, for the tasks that make it busy (``lua-time-limit`` 20 ms)."""
    with running(extra={"lua-time-limit": "20"}) as server:
        yield server


@pytest.fixture(scope="module")
def worker_env(
    redis_server: RedisServer, busy_server: RedisServer, namespace: str
) -> dict[str, str]:
    return {
        tasks.BROKER_ENV: broker_url(redis_server, 1),
        tasks.REDIS_ENV: redis_server.url,
        tasks.BUSY_REDIS_ENV: busy_server.url,
        tasks.NAMESPACE_ENV: namespace,
    }


@pytest.fixture(scope="module")
def worker(
    worker_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    """One worker for the module; the test process sends to it through tasks.app."""
    tasks.app.conf.update(
        broker_url=worker_env[tasks.BROKER_ENV], result_backend=worker_env[tasks.BROKER_ENV]
    )
    w = Worker(worker_env, tmp_path_factory.mktemp("celery") / "worker.log")
    try:
        yield w.start()
    finally:
        w.stop()


@pytest.fixture(scope="module")
def client(redis_server: RedisServer, namespace: str) -> Iterator[AgentBillClient]:
    with AgentBillClient(redis_url=redis_server.url, namespace=namespace) as c:
        yield c


@pytest.fixture(scope="module")
def raw(redis_server: RedisServer) -> Iterator[redis.Redis]:
    with redis_server.client(decode_responses=True) as r:
        yield r


@pytest.fixture
def customer(client: AgentBillClient) -> str:
    """A fresh customer with a budget of 100."""
    name = f"cust-{uuid.uuid4().hex[:8]}"
    client.set_budget(name, 100)
    return name


class Markers:
    """What the task bodies wrote (see tests/_celery_app.py): counters, pids, numbers seen."""

    def __init__(self, raw: redis.Redis, namespace: str) -> None:
        self.raw = raw
        self.namespace = namespace

    def get(self, kind: str, task_id: str) -> str | None:
        value = self.raw.get(f"{self.namespace}:marker:{kind}:{task_id}")
        return None if value is None else str(value)

    def count(self, kind: str, task_id: str) -> int:
        return int(self.get(kind, task_id) or 0)

    def set(self, kind: str, task_id: str) -> None:
        self.raw.set(f"{self.namespace}:marker:{kind}:{task_id}", 1)


@pytest.fixture(scope="module")
def markers(raw: redis.Redis, namespace: str) -> Markers:
    return Markers(raw, namespace)


def spent_reserved(client: AgentBillClient, customer: str) -> tuple[int, int]:
    status = client.get_budget(customer)
    return status.spent, status.reserved


# -- packaging ---------------------------------------------------------------------------------


def test_importing_agentbill_does_not_import_celery() -> None:
    code = "import agentbill, agentbill.contrib, sys; assert 'celery' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_missing_extra_is_named() -> None:
    code = (
        "import sys; sys.modules['celery'] = None\n"
        "try:\n"
        "    import agentbill.contrib.celery\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True
    ).stdout
    assert "pip install 'agentbill-redis[celery]'" in out


# -- a real worker -----------------------------------------------------------------------------


def test_approved_task_runs_and_is_charged_its_actual_units(
    worker: Worker, client: AgentBillClient, customer: str, markers: Markers
) -> None:
    result = tasks.charge.delay(customer, 7)
    assert result.get(timeout=20) == 7
    assert markers.count("ran", result.id) == 1
    assert spent_reserved(client, customer) == (7, 0)  # the estimate was 10


def test_customer_from_a_message_header(
    worker: Worker, client: AgentBillClient, customer: str
) -> None:
    result = tasks.charge_header.apply_async((3,), headers={"customer": customer})
    assert result.get(timeout=20) == 3
    assert spent_reserved(client, customer) == (3, 0)


def test_refused_task_fails_without_running_or_retrying(
    worker: Worker, client: AgentBillClient, customer: str, markers: Markers
) -> None:
    """charge autoretries every Exception, up to 3 times: a refusal is not retried."""
    client.set_budget(customer, 5)  # below the estimate of 10
    result = tasks.charge.delay(customer, 7)
    with pytest.raises(AgentBillError, match=r"run blocked \(budget_exhausted\)"):
        result.get(timeout=20)
    assert result.state == "FAILURE"
    assert markers.count("prerun", result.id) == 1  # one attempt, no retry
    assert markers.get("ran", result.id) is None  # the body never ran
    assert spent_reserved(client, customer) == (0, 0)


def test_refusal_reaches_the_caller_as_the_typed_error(
    worker: Worker, client: AgentBillClient, customer: str
) -> None:
    client.set_budget(customer, 5)
    result = tasks.charge.delay(customer, 7)
    with pytest.raises(AgentBillError) as info:
        result.get(timeout=20)
    assert isinstance(info.value, BudgetExhaustedError), repr(info.value)


def test_task_that_raises_is_released(
    worker: Worker, client: AgentBillClient, customer: str, markers: Markers
) -> None:
    result = tasks.boom.delay(customer)
    with pytest.raises(ValueError, match="the body failed"):
        result.get(timeout=20)
    assert markers.count("ran", result.id) == 1
    assert spent_reserved(client, customer) == (0, 0)
    assert client.get_budget(customer).open_reservations == 0


@pytest.mark.parametrize("how", ["retry", "autoretry"])
def test_retry_releases_and_the_next_attempt_reserves_again(
    worker: Worker, client: AgentBillClient, customer: str, markers: Markers, how: str
) -> None:
    result = tasks.flaky.delay(customer, how)
    assert result.get(timeout=20) == 4
    # Each attempt saw exactly its own estimate reserved: the first attempt's reservation was
    # released before the retry was sent, and the retry reserved afresh.
    assert markers.get("reserved-0", result.id) == "10"
    assert markers.get("reserved-1", result.id) == "10"
    assert spent_reserved(client, customer) == (4, 0)


def test_soft_time_limit_releases(
    worker: Worker, client: AgentBillClient, customer: str, markers: Markers
) -> None:
    result = tasks.soft_limited.delay(customer)
    with pytest.raises(SoftTimeLimitExceeded):
        result.get(timeout=20)
    assert markers.count("ran", result.id) == 1
    assert spent_reserved(client, customer) == (0, 0)


def test_hard_time_limit_releases_from_the_workers_main_process(
    worker: Worker, client: AgentBillClient, customer: str, markers: Markers
) -> None:
    """The child is killed at 2 s; its parent releases before it marks the task failed, long
    before the reservation's TTL (2 + TTL_MARGIN s) would."""
    result = tasks.hard_limited.delay(customer)
    wait_for("the body to start", lambda: markers.get("ran", result.id))
    assert spent_reserved(client, customer) == (0, 10)
    with pytest.raises(TimeLimitExceeded):
        result.get(timeout=20)
    assert spent_reserved(client, customer) == (0, 0)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_revoke_with_terminate_releases(
    worker: Worker, client: AgentBillClient, customer: str, markers: Markers, sig: str
) -> None:
    """SIGTERM may let the child unwind (and release); after SIGKILL only its parent can."""
    result = tasks.hang.delay(customer)
    wait_for("the body to start", lambda: markers.get("ran", result.id))
    assert spent_reserved(client, customer) == (0, 10)
    result.revoke(terminate=True, signal=sig)
    wait_for("the release", lambda: spent_reserved(client, customer) == (0, 0))
    wait_for("the revoked state", lambda: str(result.state) == "REVOKED")


def test_killed_child_releases(
    worker: Worker, client: AgentBillClient, customer: str, markers: Markers
) -> None:
    result = tasks.hang.delay(customer)
    pid = int(wait_for("the body to start", lambda: markers.get("pid", result.id) or ""))
    assert spent_reserved(client, customer) == (0, 10)
    os.kill(pid, signal.SIGKILL)  # a pool child our worker started, by its pid
    with pytest.raises(WorkerLostError):
        result.get(timeout=20)
    assert spent_reserved(client, customer) == (0, 0)


def test_same_message_delivered_twice_is_charged_once(
    worker: Worker, client: AgentBillClient, customer: str, markers: Markers
) -> None:
    task_id = str(uuid.uuid4())
    for _ in range(2):
        tasks.charge.apply_async((customer, 7), task_id=task_id)
    wait_for("both runs to end", lambda: markers.count("postrun", task_id) == 2)
    assert markers.count("ran", task_id) == 2  # at-least-once: the body ran twice
    assert AsyncResult(task_id, app=tasks.app).get(timeout=20) == 7
    assert spent_reserved(client, customer) == (7, 0)  # ... and was charged once


def test_acks_late_redelivery_after_the_worker_died_is_charged_once(
    worker_env: dict[str, str],
    redis_server: RedisServer,
    client: AgentBillClient,
    customer: str,
    markers: Markers,
    tmp_path: Path,
) -> None:
    """A real redelivery: the worker running an acks_late task is SIGKILLed (parent and child:
    no code runs, the message stays unacked), a new worker gets the message again after the
    broker's visibility timeout (2 s here), runs the same attempt again, and it is charged
    once. Its own broker database, so the module's worker cannot take the message."""
    url = broker_url(redis_server, 2)
    env = {**worker_env, tasks.BROKER_ENV: url, tasks.QUICK_REDELIVERY_ENV: "1"}
    sender = Celery("sender", broker=url, backend=url, set_as_current=False)
    first = Worker(env, tmp_path / "first.log").start()
    try:
        result = sender.send_task(tasks.hang_first_time.name, (customer, 6))
        wait_for("the first delivery to start", lambda: markers.get("ran", result.id))
        assert spent_reserved(client, customer) == (0, 10)
    finally:
        first.kill()
    second = Worker(env, tmp_path / "second.log").start()
    try:
        assert result.get(timeout=30) == 6
    finally:
        second.stop()
        sender.close()
    assert markers.count("ran", result.id) == 2
    # The redelivery replayed the first approval: it reserved nothing more ...
    assert markers.get("reserved-1", result.id) == "10"
    assert markers.get("reserved-2", result.id) == "10"
    # ... and its record charged once.
    assert spent_reserved(client, customer) == (6, 0)


# -- issue 16: deliveries that overlap, retry histories ----------------------------------------


@pytest.mark.parametrize("outcomes", ["of", "fo"], ids=["release-first", "record-first"])
def test_redelivery_while_the_first_delivery_runs_charges_the_success_once(
    worker_env: dict[str, str],
    redis_server: RedisServer,
    client: AgentBillClient,
    customer: str,
    markers: Markers,
    tmp_path: Path,
    outcomes: str,
) -> None:
    """An acks_late message outlives the broker's visibility timeout (2 s here) and is delivered
    again while its first delivery still runs: two deliveries of one attempt, sharing one
    reservation. One fails (a release), the other returns 7 (a record); in either order the
    success is charged once and nothing stays reserved. Its own broker database."""
    url = broker_url(redis_server, 4)
    env = {**worker_env, tasks.BROKER_ENV: url, tasks.QUICK_REDELIVERY_ENV: "1"}
    sender = Celery("sender", broker=url, backend=url, set_as_current=False)
    w = Worker(env, tmp_path / "overlap.log").start()
    try:
        result = sender.send_task(tasks.on_cue.name, (customer, 7, outcomes))
        wait_for("the redelivery", lambda: markers.count("ran", result.id) == 2, timeout=30)
        assert spent_reserved(client, customer) == (0, 10)  # one reservation, shared
        markers.set("go-2", result.id)
        wait_for("the second delivery to end", lambda: markers.count("postrun", result.id) == 1)
        markers.set("go-1", result.id)
        wait_for("the first delivery to end", lambda: markers.count("postrun", result.id) == 2)
        value = result.get(timeout=20)  # SUCCESS, in either order: Celery never overwrites it
    finally:
        w.stop()
        sender.close()
    assert value == 7
    assert markers.count("ran", result.id) == 2
    assert spent_reserved(client, customer) == (7, 0)
    assert client.get_budget(customer).open_reservations == 0


def test_task_id_sent_again_after_retries_is_charged_once(
    worker: Worker, client: AgentBillClient, customer: str, markers: Markers
) -> None:
    """A task that failed twice (autoretried) and then returned 4, sent again with the same task
    id: its retry count restarts at 0, yet the task was already charged, so the run replays
    that approval and charges nothing more."""
    task_id = str(uuid.uuid4())
    assert tasks.fails_twice.apply_async((customer, 4), task_id=task_id).get(timeout=20) == 4
    assert spent_reserved(client, customer) == (4, 0)
    assert tasks.fails_twice.apply_async((customer, 4), task_id=task_id).get(timeout=20) == 4
    wait_for("the fourth run to end", lambda: markers.count("postrun", task_id) == 4)
    assert markers.count("ran", task_id) == 4
    assert spent_reserved(client, customer) == (4, 0)


def test_a_task_whose_record_meets_a_busy_redis_succeeds_and_is_charged_once_it_can(
    worker: Worker, busy_server: RedisServer, namespace: str, markers: Markers
) -> None:
    """Attack a08: the body returned 7, then Redis answered BUSY for longer than the record's
    retries. The task is a SUCCESS and its record, queued in the pool child, lands once Redis
    can take it. Before: FAILURE (StoreBusyError), and the reservation expired uncharged."""
    with AgentBillClient(redis_url=busy_server.url, namespace=namespace) as looker:
        customer = f"cust-{uuid.uuid4().hex[:8]}"
        looker.set_budget(customer, 100)
        result = tasks.busy_at_end.delay(customer, 7)
        assert result.get(timeout=30) == 7
        assert result.state == "SUCCESS"
        assert markers.count("ran", result.id) == 1

        def landed() -> bool:
            try:
                return spent_reserved(looker, customer) == (7, 0)
            except StoreBusyError:  # the script still runs
                return False

        wait_for("the queued record to land", landed)
        recorded = [(e.units, e.reason) for e in looker.events(customer) if e.type == "recorded"]
        assert recorded == [(7, "recorded")]
        assert looker.get_budget(customer).open_reservations == 0


# -- no worker: eager apply(), direct calls ----------------------------------------------------


@pytest.fixture
def eager_app() -> Iterator[Celery]:
    app = Celery(f"eager-{uuid.uuid4().hex[:8]}", set_as_current=False)
    yield app
    app.close()


def test_apply_and_direct_calls_are_budgeted(
    eager_app: Celery, client: AgentBillClient, customer: str
) -> None:
    budget = JobBudget(
        client=client, agent_id="a", estimated_units=10, customer_id=param("customer_id"),
        units=len,
    )  # fmt: skip

    @eager_app.task(base=BudgetedTask, budget=budget)
    def echo(customer_id: str, text: str) -> str:
        return text

    assert echo.apply((customer, "abc")).get() == "abc"
    assert echo(customer, "de") == "de"
    assert spent_reserved(client, customer) == (5, 0)


def test_a_record_without_an_id_never_closes_a_running_tasks_reservation(
    eager_app: Celery, client: AgentBillClient, customer: str
) -> None:
    """Attack a15, for a task: a record without an id made in the same process while the task
    runs closes its own reservation, never the task's."""
    budget = JobBudget(client=client, agent_id="a", estimated_units=50, customer_id=customer)
    seen: list[tuple[int, int, int]] = []

    @eager_app.task(base=BudgetedTask, budget=budget)
    def work() -> None:
        client.preflight("a", 1, customer)
        client.record("a", 1, customer)
        status = client.get_budget(customer)
        seen.append((status.spent, status.reserved, status.open_reservations))

    work.apply().get()
    assert seen == [(1, 50, 1)]  # the task's 50 still held; the record closed its own 1
    assert spent_reserved(client, customer) == (51, 0)
    recorded = [(e.units, e.reason) for e in client.events(customer) if e.type == "recorded"]
    assert sorted(recorded) == [(1, "recorded"), (50, "recorded")]


def test_eager_refusal_raises_the_typed_error_and_is_not_autoretried(
    eager_app: Celery, client: AgentBillClient, customer: str
) -> None:
    client.set_budget(customer, 5)
    attempts: list[int] = []
    runs: list[int] = []

    @eager_app.task(
        bind=True,
        base=BudgetedTask,
        budget=JobBudget(client=client, agent_id="a", estimated_units=10,
                         customer_id=header("customer")),
        autoretry_for=(Exception,),
        retry_kwargs={"countdown": 0},
    )  # fmt: skip
    def work(self: BudgetedTask[Any, Any]) -> int:
        runs.append(1)
        return 1

    def count(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "name", None) == work.name:
            attempts.append(1)

    task_prerun.connect(count, weak=False)
    try:
        with pytest.raises(BudgetExhaustedError) as info:
            work.apply(headers={"customer": customer}, throw=True)
    finally:
        task_prerun.disconnect(count)
    assert info.value.customer_id == customer
    assert (attempts, runs) == ([1], [])


class _RateLimited(RunBlockedError):
    @property
    def retry_after(self) -> float | None:
        return 0.01


def test_rate_limited_refusal_retries_only_when_opted_in(
    eager_app: Celery, client: AgentBillClient, customer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refusal whose retry_after is set retries after it, with ``budget_retry_rate_limited``
    (max_retries still applies); without, it fails the task."""
    from agentbill.contrib import _jobs

    refused = client.preflight("a", 1000, customer)
    assert not refused.approved
    real_preflight = _jobs.JobRun.preflight
    refusals = [2]

    def rate_limited_twice(run: _jobs.JobRun) -> Any:
        if refusals[0]:
            refusals[0] -= 1
            raise _RateLimited(refused)
        return real_preflight(run)

    monkeypatch.setattr(_jobs.JobRun, "preflight", rate_limited_twice)
    budget = JobBudget(client=client, agent_id="a", estimated_units=3, customer_id=customer)

    @eager_app.task(base=BudgetedTask, budget=budget, budget_retry_rate_limited=True, bind=True)
    def patient(self: BudgetedTask[Any, Any]) -> int:
        return self.request.retries

    assert patient.apply().get() == 2  # attempts 0 and 1 were refused, 2 ran
    assert spent_reserved(client, customer) == (3, 0)

    @eager_app.task(base=BudgetedTask, budget=budget)
    def impatient() -> int:
        return 0

    refusals[0] = 1
    with pytest.raises(_RateLimited):
        impatient.apply(throw=True)


def test_a_retry_that_changes_the_budget_is_an_idempotency_conflict(
    eager_app: Celery, client: AgentBillClient, customer: str
) -> None:
    """Every run of a task id shares one idempotency key, so every run must resolve to the same
    budget: a retry whose new arguments change the estimate fails, holding nothing."""
    budget = JobBudget(
        client=client, agent_id="a", estimated_units=param("estimate"), customer_id=customer
    )

    @eager_app.task(bind=True, base=BudgetedTask, budget=budget)
    def grow(self: BudgetedTask[Any, Any], estimate: int) -> int:
        if self.request.retries == 0:
            raise self.retry(args=(estimate + 1,), countdown=0)
        return estimate

    with pytest.raises(InvalidRequestError) as info:
        grow.apply((3,)).get()  # the retry runs eagerly too, as apply() returns
    assert info.value.field == "idempotency_key"
    assert spent_reserved(client, customer) == (0, 0)


def test_task_without_budget_is_a_type_error(eager_app: Celery) -> None:
    @eager_app.task(base=BudgetedTask)
    def unbudgeted() -> int:
        return 0

    with pytest.raises(TypeError, match="no budget"):
        unbudgeted.apply(throw=True)


def test_reservation_ttl_defaults_to_the_hard_time_limit_plus_a_margin(
    client: AgentBillClient,
) -> None:
    request = Context({"id": "t1", "retries": 2, "timelimit": (30, 20)})
    run = tasks.hang._budget_run(request, ("c",), {})
    assert run.budget.ttl == 30 + TTL_MARGIN
    assert run.idempotency_key == "celery:t1"  # every run of the task shares it
    assert tasks.hard_limited._budget_run(Context({"id": "t2"}), ("c",)).budget.ttl == (
        2 + TTL_MARGIN
    )


def test_cold_shutdown_releases(
    worker_env: dict[str, str],
    redis_server: RedisServer,
    client: AgentBillClient,
    customer: str,
    markers: Markers,
    tmp_path: Path,
) -> None:
    """SIGQUIT: the worker's cold shutdown stops its pool children mid-task; the attempt is
    released (here by the child itself, as it unwinds from the SIGTERM it gets)."""
    url = broker_url(redis_server, 3)
    env = {**worker_env, tasks.BROKER_ENV: url}
    sender = Celery("sender", broker=url, backend=url, set_as_current=False)
    w = Worker(env, tmp_path / "cold.log").start()
    try:
        result = sender.send_task(tasks.hang.name, (customer,))
        wait_for("the body to start", lambda: markers.get("ran", result.id))
        assert spent_reserved(client, customer) == (0, 10)
        assert w.proc is not None
        w.proc.send_signal(signal.SIGQUIT)
        w.proc.wait(timeout=20)
        wait_for("the release", lambda: spent_reserved(client, customer) == (0, 0))
    finally:
        w.stop()
        sender.close()
