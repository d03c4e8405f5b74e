"""agentbill.contrib.rq, end to end: RQ's own worker process runs budgeted jobs (tests/_rq_jobs.py)
from a real redis-server, and the budget is read back through a client on the same server."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import redis
import rq
from rq.command import send_stop_job_command
from rq.job import Job, JobStatus

from agentbill import AgentBillClient, BudgetExhaustedError
from tests._servers import RedisServer, running

ROOT = Path(__file__).resolve().parent.parent
WORKER = "agentbill.contrib.rq.Worker"
JOBS = "tests._rq_jobs"
WORKER_DEADLINE = 60.0


class Harness:
    """A queue of its own, and RQ's worker started on it in burst mode (it exits when the queue
    is empty), with the job module configured by the environment."""

    def __init__(self, server: RedisServer, namespace: str, tmp_path: Path) -> None:
        self.url = server.url
        self.namespace = namespace
        self.tmp_path = tmp_path
        self.connection = redis.Redis.from_url(server.url)
        self.store = redis.Redis.from_url(server.url, decode_responses=True)
        self.queue = rq.Queue(namespace, connection=self.connection)
        self.client = AgentBillClient(redis_url=server.url, namespace=namespace)
        self.logs: dict[int, Path] = {}

    def close(self) -> None:
        self.client.close()
        self.connection.close()
        self.store.close()

    def enqueue(self, function: str, *args: object, **options: object) -> Job:
        return self.queue.enqueue(f"{JOBS}.{function}", *args, **options)

    def work(self, worker_class: str = WORKER, **env: str) -> str:
        """Run the worker until the queue is empty; its log."""
        return self.wait(self.start(worker_class, **env))

    def start(self, worker_class: str = WORKER, **more_env: str) -> subprocess.Popen[bytes]:
        log = self.tmp_path / f"worker-{uuid.uuid4().hex[:6]}.log"
        env = {
            **os.environ,
            "AGENTBILL_REDIS_URL": self.url,
            "AGENTBILL_RQ_TEST_NAMESPACE": self.namespace,
            "PYTHONPATH": str(ROOT),
            **more_env,
        }
        args = [sys.executable, "-m", "rq.cli", "worker", "--burst", "--url", self.url]
        args += ["--worker-class", worker_class, self.namespace]
        with log.open("wb") as out:
            proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.logs[proc.pid] = log
        return proc

    def wait(self, proc: subprocess.Popen[bytes]) -> str:
        """Wait for the worker to exit (terminate, then kill it past the deadline); its log."""
        try:
            code = proc.wait(timeout=WORKER_DEADLINE)
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        text = self.logs[proc.pid].read_text(errors="replace")
        assert code == 0, text
        return text

    def attempts(self, job: Job) -> list[int]:
        """The attempt number of every preflight a work horse made for the job."""
        return [
            int(a) for a in self.store.lrange(f"rqtest:{self.namespace}:attempts:{job.id}", 0, -1)
        ]

    def runs(self, job: Job) -> int:
        """How many times the job's body ran."""
        return int(self.store.get(f"rqtest:{self.namespace}:runs:{job.id}") or 0)

    def status(self, job: Job) -> JobStatus:
        return job.get_status(refresh=True)

    def failure(self, job: Job) -> str:
        result = job.latest_result()
        assert result is not None
        return result.exc_string or ""


@pytest.fixture
def rq_harness(redis_server: RedisServer, namespace: str, tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(redis_server, namespace, tmp_path)
    yield harness
    harness.close()


def customer() -> str:
    return f"c-{uuid.uuid4().hex[:8]}"


def test_approved_jobs_run_and_are_charged_their_actual_units(rq_harness: Harness) -> None:
    cust = customer()
    rq_harness.client.set_budget(cust, 100)
    jobs = [
        rq_harness.enqueue("summarise", cust, "seven u"),
        rq_harness.enqueue("summarise", customer_id=cust, text="three"),
        rq_harness.enqueue("summarise_async", cust, "async"),
        rq_harness.enqueue("tagged", "meta", meta={"customer_id": cust}),
    ]
    rq_harness.work()
    for job in jobs:
        assert rq_harness.status(job) == JobStatus.FINISHED, rq_harness.failure(job)
        assert rq_harness.runs(job) == 1
    assert [job.return_value() for job in jobs] == ["seven u", "three", "async", "meta"]
    assert [rq_harness.attempts(job) for job in jobs[:3]] == [[0], [0], [0]]
    budget = rq_harness.client.get_budget(cust)
    # Each charged len(result), not the estimate of 10.
    assert (budget.spent, budget.reserved, budget.open_reservations) == (7 + 5 + 5 + 4, 0, 0)


def test_every_run_of_a_repeated_job_is_charged(rq_harness: Harness) -> None:
    cust = customer()
    rq_harness.client.set_budget(cust, 100)
    job = rq_harness.enqueue("summarise", cust, "four", repeat=rq.Repeat(times=2))
    rq_harness.work()
    assert rq_harness.status(job) == JobStatus.FINISHED, rq_harness.failure(job)
    assert rq_harness.attempts(job) == [0, 1, 2]  # a repeat is the next attempt, not a replay
    budget = rq_harness.client.get_budget(cust)
    assert (budget.spent, budget.reserved, budget.open_reservations) == (3 * 4, 0, 0)
    # The same job id enqueued again: each repeat was charged already, and is not again.
    rq_harness.enqueue("summarise", cust, "four", repeat=rq.Repeat(times=2), job_id=job.id)
    rq_harness.work()
    assert rq_harness.runs(job) == 6
    budget = rq_harness.client.get_budget(cust)
    assert (budget.spent, budget.reserved, budget.open_reservations) == (3 * 4, 0, 0)


def test_refused_job_never_runs_and_is_not_retried(rq_harness: Harness) -> None:
    cust = customer()
    rq_harness.client.set_budget(cust, 5)  # the estimate is 10
    job = rq_harness.enqueue("summarise", cust, "text", retry=rq.Retry(max=3))
    rq_harness.work()
    assert rq_harness.status(job) == JobStatus.FAILED
    assert BudgetExhaustedError.__name__ in rq_harness.failure(job)
    assert rq_harness.runs(job) == 0
    assert rq_harness.attempts(job) == [0]  # one preflight: RQ did not retry
    budget = rq_harness.client.get_budget(cust)
    assert (budget.spent, budget.reserved, budget.open_reservations) == (0, 0, 0)


def test_job_that_raises_is_released_on_every_attempt(rq_harness: Harness) -> None:
    cust = customer()
    rq_harness.client.set_budget(cust, 10)  # room for one estimate at a time
    job = rq_harness.enqueue("crash", cust, retry=rq.Retry(max=2))
    rq_harness.work()
    assert rq_harness.status(job) == JobStatus.FAILED
    assert "the agent crashed" in rq_harness.failure(job)
    # Each retry reserved afresh, which it could only do once the attempt before was released.
    assert rq_harness.attempts(job) == [0, 1, 2]
    assert rq_harness.runs(job) == 3
    budget = rq_harness.client.get_budget(cust)
    assert (budget.spent, budget.reserved, budget.open_reservations) == (0, 0, 0)


def test_retried_job_reserves_afresh_and_charges_once(rq_harness: Harness) -> None:
    raiser, asker = customer(), customer()
    for cust in (raiser, asker):
        rq_harness.client.set_budget(cust, 10)  # room for one estimate at a time
    raised = rq_harness.enqueue("flaky", raiser, retry=rq.Retry(max=3))
    asked = rq_harness.enqueue("ask_again", asker)  # returns rq.Retry on its first run
    rq_harness.work()
    for job, cust, units in ((raised, raiser, 3), (asked, asker, 4)):
        assert rq_harness.status(job) == JobStatus.FINISHED, rq_harness.failure(job)
        assert rq_harness.attempts(job) == [0, 1]
        assert rq_harness.runs(job) == 2
        budget = rq_harness.client.get_budget(cust)
        assert (budget.spent, budget.reserved, budget.open_reservations) == (units, 0, 0)


def test_timed_out_job_is_released(rq_harness: Harness) -> None:
    cust = customer()
    rq_harness.client.set_budget(cust, 100)
    job = rq_harness.enqueue("hang", cust, job_timeout=1)
    rq_harness.work()
    assert rq_harness.status(job) == JobStatus.FAILED
    assert "JobTimeoutException" in rq_harness.failure(job)
    assert rq_harness.runs(job) == 1
    budget = rq_harness.client.get_budget(cust)
    assert (budget.spent, budget.reserved, budget.open_reservations) == (0, 0, 0)


def test_killed_work_horse_is_released_by_the_worker(rq_harness: Harness) -> None:
    cust = customer()
    rq_harness.client.set_budget(cust, 100)
    once = rq_harness.enqueue("die", cust)
    retried = rq_harness.enqueue("die", cust, retry=rq.Retry(max=1))
    rq_harness.work()
    assert rq_harness.status(once) == JobStatus.FAILED
    assert "terminated unexpectedly" in rq_harness.failure(once)
    assert rq_harness.status(retried) == JobStatus.FINISHED, rq_harness.failure(retried)
    # The attempt count survived RQ saving the job from the worker's main process.
    assert rq_harness.attempts(retried) == [0, 1]
    budget = rq_harness.client.get_budget(cust)
    assert (budget.spent, budget.reserved, budget.open_reservations) == (2, 0, 0)


def test_stopped_job_is_released_by_the_worker(rq_harness: Harness) -> None:
    cust = customer()
    rq_harness.client.set_budget(cust, 100)
    job = rq_harness.enqueue("hang", cust, job_timeout=50)
    worker = rq_harness.start()
    try:
        deadline = time.monotonic() + WORKER_DEADLINE
        while rq_harness.runs(job) == 0:  # the body runs: its reservation is held
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.02)
        assert rq_harness.client.get_budget(cust).reserved == 10
        send_stop_job_command(rq_harness.connection, job.id)
    finally:
        rq_harness.wait(worker)
    assert rq_harness.status(job) == JobStatus.STOPPED
    budget = rq_harness.client.get_budget(cust)
    assert (budget.spent, budget.reserved, budget.open_reservations) == (0, 0, 0)


def test_plain_rq_worker_leaves_a_killed_horse_reservation_to_its_ttl(
    rq_harness: Harness,
) -> None:
    cust = customer()
    rq_harness.client.set_budget(cust, 100)
    job = rq_harness.enqueue("die", cust)
    rq_harness.work(worker_class="rq.Worker")
    assert rq_harness.status(job) == JobStatus.FAILED
    budget = rq_harness.client.get_budget(cust)
    assert (budget.spent, budget.reserved, budget.open_reservations) == (0, 10, 1)
    rq_harness.client.release(idempotency_key=f"rq:{job.id}", customer_id=cust)
    assert rq_harness.client.get_budget(cust).reserved == 0  # the key is rq:<job id>


def test_redelivered_job_is_charged_once(rq_harness: Harness) -> None:
    cust = customer()
    rq_harness.client.set_budget(cust, 100)
    job_id = f"report-{uuid.uuid4().hex[:8]}"
    first = rq_harness.enqueue("summarise", cust, "six u.", job_id=job_id)
    rq_harness.work()
    assert rq_harness.status(first) == JobStatus.FINISHED, rq_harness.failure(first)
    again = rq_harness.enqueue("summarise", cust, "six u.", job_id=job_id)  # the same job id
    rq_harness.work()
    assert rq_harness.status(again) == JobStatus.FINISHED, rq_harness.failure(again)
    assert rq_harness.runs(first) == 2
    assert rq_harness.attempts(first) == [0, 0]
    budget = rq_harness.client.get_budget(cust)
    assert (budget.spent, budget.reserved, budget.open_reservations) == (6, 0, 0)


# -- issue 16: runs of one job id that overlap, retry histories, wrapped job functions ---------


def test_a_job_whose_record_meets_a_busy_redis_finishes_and_is_charged_once(
    rq_harness: Harness,
) -> None:
    """Attack a21: the body returned, then Redis answered BUSY for longer than the record's
    retries. The job finishes (its retries untouched), and its queued record is delivered by
    the work horse before it ends. Before: FAILED with its retries cancelled, and the
    reservation expired uncharged."""
    with running(extra={"lua-time-limit": "20"}) as busy_server:
        cust = customer()
        with AgentBillClient(redis_url=busy_server.url, namespace=rq_harness.namespace) as looker:
            looker.set_budget(cust, 100)
            job = rq_harness.enqueue("busy_at_end", cust, retry=rq.Retry(max=2))
            rq_harness.work(AGENTBILL_RQ_TEST_BUSY_URL=busy_server.url)
            assert rq_harness.status(job) == JobStatus.FINISHED, rq_harness.failure(job)
            assert job.retries_left == 2
            assert rq_harness.runs(job) == 1
            budget = looker.get_budget(cust)  # the horse delivered before it ended
            assert (budget.spent, budget.reserved, budget.open_reservations) == (7, 0, 0)
            recorded = [(e.units, e.reason) for e in looker.events(cust) if e.type == "recorded"]
            assert recorded == [(7, "recorded")]


def wait_until(what: str, probe: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WORKER_DEADLINE
    while not probe():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def go(harness: Harness, job_id: str, run: int) -> None:
    """Let run ``run`` of the job (an on_cue job) end."""
    harness.store.set(f"rqtest:{harness.namespace}:go:{job_id}:{run}", 1)


@pytest.mark.parametrize("outcomes", ["ofo", "foo"], ids=["release-first", "record-first"])
def test_overlapping_runs_of_one_job_id_charge_the_success_once(
    rq_harness: Harness, outcomes: str
) -> None:
    """The same job id enqueued again while its first run still runs: the two runs share one
    reservation (the idempotency key). One fails and releases, the other records 7; in either
    order the success is charged once and nothing stays reserved. Enqueued a third time, the
    job has succeeded already: charged nothing more."""
    cust = customer()
    rq_harness.client.set_budget(cust, 100)
    job_id = f"twice-{uuid.uuid4().hex[:8]}"
    job = rq_harness.enqueue("on_cue", cust, outcomes, job_id=job_id)
    first = rq_harness.start()
    try:
        wait_until("the first run", lambda: rq_harness.runs(job) == 1)
        rq_harness.enqueue("on_cue", cust, outcomes, job_id=job_id)
        second = rq_harness.start()
        try:
            wait_until("the second run", lambda: rq_harness.runs(job) == 2)
            assert rq_harness.client.get_budget(cust).reserved == 10  # one reservation, shared
            go(rq_harness, job_id, 2)
        finally:
            rq_harness.wait(second)
        go(rq_harness, job_id, 1)
    finally:
        rq_harness.wait(first)
    budget = rq_harness.client.get_budget(cust)
    assert (budget.spent, budget.reserved, budget.open_reservations) == (7, 0, 0)
    go(rq_harness, job_id, 3)  # run 3 need not wait
    third = rq_harness.enqueue("on_cue", cust, outcomes, job_id=job_id)
    rq_harness.work()
    assert rq_harness.status(third) == JobStatus.FINISHED, rq_harness.failure(third)
    budget = rq_harness.client.get_budget(cust)
    assert (budget.spent, budget.reserved, budget.open_reservations) == (7, 0, 0)


def test_a_failing_run_releases_only_the_reservation_it_holds(rq_harness: Harness) -> None:
    """Runs 1 and 2 of one job id overlap and share a reservation; run 2 fails at once and its
    retry, run 3, reserves afresh under the same key. When run 1 fails later, it releases the
    reservation it held (already released), not the one the key now names (run 3's)."""
    cust = customer()
    rq_harness.client.set_budget(cust, 100)
    job_id = f"stale-{uuid.uuid4().hex[:8]}"
    job = rq_harness.enqueue("on_cue", cust, "ffo", job_id=job_id)
    first = rq_harness.start()
    try:
        wait_until("the first run", lambda: rq_harness.runs(job) == 1)
        go(rq_harness, job_id, 2)
        rq_harness.enqueue("on_cue", cust, "ffo", job_id=job_id, retry=rq.Retry(max=1))
        second = rq_harness.start()
        try:
            wait_until("the retry", lambda: rq_harness.runs(job) == 3)
            assert rq_harness.client.get_budget(cust).reserved == 10  # run 3's own
            go(rq_harness, job_id, 1)
            rq_harness.wait(first)  # run 1 failed and released what it held
            assert rq_harness.client.get_budget(cust).reserved == 10  # run 3's, still held
            go(rq_harness, job_id, 3)
        finally:
            rq_harness.wait(second)
    finally:
        rq_harness.wait(first)
    budget = rq_harness.client.get_budget(cust)
    assert (budget.spent, budget.reserved, budget.open_reservations) == (7, 0, 0)


def test_job_id_enqueued_again_after_failed_attempts_is_charged_once(rq_harness: Harness) -> None:
    """A job that failed twice and then succeeded under Retry(max=3), enqueued again with the
    same id: the attempt count restarts, yet the job was already charged, so the run replays
    that approval and charges nothing more."""
    cust = customer()
    rq_harness.client.set_budget(cust, 100)
    job_id = f"retried-{uuid.uuid4().hex[:8]}"
    first = rq_harness.enqueue("fails_twice", cust, job_id=job_id, retry=rq.Retry(max=3))
    rq_harness.work()
    assert rq_harness.status(first) == JobStatus.FINISHED, rq_harness.failure(first)
    assert rq_harness.client.get_budget(cust).spent == 4
    again = rq_harness.enqueue("fails_twice", cust, job_id=job_id, retry=rq.Retry(max=3))
    rq_harness.work()
    assert rq_harness.status(again) == JobStatus.FINISHED, rq_harness.failure(again)
    assert rq_harness.runs(first) == 4
    assert rq_harness.attempts(first) == [0, 1, 2, 0]
    budget = rq_harness.client.get_budget(cust)
    assert (budget.spent, budget.reserved, budget.open_reservations) == (4, 0, 0)


def test_job_that_failed_for_good_and_is_enqueued_again_reserves_afresh(
    rq_harness: Harness,
) -> None:
    """Its reservation was released, so the key holds nothing: the new run reserves (and is
    charged) like a first run."""
    cust = customer()
    rq_harness.client.set_budget(cust, 10)  # room for one estimate at a time
    job_id = f"failed-{uuid.uuid4().hex[:8]}"
    failed = rq_harness.enqueue("crash", cust, job_id=job_id)
    rq_harness.work()
    assert rq_harness.status(failed) == JobStatus.FAILED
    ok = rq_harness.enqueue("summarise", cust, "again", job_id=job_id)
    rq_harness.work()
    assert rq_harness.status(ok) == JobStatus.FINISHED, rq_harness.failure(ok)
    budget = rq_harness.client.get_budget(cust)
    assert (budget.spent, budget.reserved, budget.open_reservations) == (5, 0, 0)


def test_decorator_stacked_above_budgeted_keeps_the_job_rules(rq_harness: Harness) -> None:
    """``@traced`` (functools.wraps) above ``@budgeted``: still the job's reservation, so the
    worker releases it when the horse is killed, and the same job id run again charges once."""
    cust = customer()
    rq_harness.client.set_budget(cust, 100)
    killed = rq_harness.enqueue("traced_die", cust)
    job_id = f"traced-{uuid.uuid4().hex[:8]}"
    first = rq_harness.enqueue("traced_summarise", cust, "four", job_id=job_id)
    rq_harness.work()
    again = rq_harness.enqueue("traced_summarise", cust, "four", job_id=job_id)
    rq_harness.work()
    assert rq_harness.status(killed) == JobStatus.FAILED
    assert rq_harness.status(again) == JobStatus.FINISHED, rq_harness.failure(again)
    assert int(rq_harness.store.get(f"rqtest:{rq_harness.namespace}:traced") or 0) == 3
    assert rq_harness.runs(first) == 2
    assert rq_harness.attempts(first) == [0, 0]
    assert rq_harness.attempts(killed) == [0]
    budget = rq_harness.client.get_budget(cust)
    assert (budget.spent, budget.reserved, budget.open_reservations) == (4, 0, 0)


# -- in this process: outside a worker, and RQ's synchronous queue -----------------------------


LOCAL_NAMESPACE = f"t-rq-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def jobs(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """tests._rq_jobs imported here, on LOCAL_NAMESPACE (its client is made on import)."""
    monkeypatch.setenv("AGENTBILL_REDIS_URL", redis_server.url)
    monkeypatch.setenv("AGENTBILL_RQ_TEST_NAMESPACE", LOCAL_NAMESPACE)
    return importlib.import_module(JOBS)


def test_outside_a_worker_every_call_is_a_new_run(
    jobs: ModuleType, redis_server: RedisServer
) -> None:
    cust = customer()
    with AgentBillClient(redis_url=redis_server.url, namespace=LOCAL_NAMESPACE) as client:
        client.set_budget(cust, 15)
        with pytest.raises(RuntimeError, match="crashed"):
            jobs.crash(cust)
        assert jobs.summarise(cust, "abc") == "abc"
        assert jobs.summarise(customer_id=cust, text="abc") == "abc"
        budget = client.get_budget(cust)
        assert (budget.spent, budget.reserved, budget.open_reservations) == (6, 0, 0)
        with pytest.raises(BudgetExhaustedError):  # 9 left, the estimate is 10
            jobs.summarise(cust, "abc")
        assert jobs.store.get(jobs.runs_key("direct")) is not None


def test_a_record_without_an_id_never_closes_a_running_jobs_reservation(
    jobs: ModuleType, redis_server: RedisServer
) -> None:
    """Attack a15, for a budgeted function: a record without an id made in the same process
    while it runs closes its own reservation, never the function's."""
    cust = customer()
    with AgentBillClient(redis_url=redis_server.url, namespace=LOCAL_NAMESPACE) as client:
        assert jobs.records_without_an_id(cust) == (1, 50, 1)
        budget = client.get_budget(cust)
        assert (budget.spent, budget.reserved, budget.open_reservations) == (51, 0, 0)


def test_synchronous_queue_runs_budgeted_jobs_in_process(
    jobs: ModuleType, redis_server: RedisServer
) -> None:
    cust = customer()
    job_id = f"sync-{uuid.uuid4().hex[:8]}"
    with (
        AgentBillClient(redis_url=redis_server.url, namespace=LOCAL_NAMESPACE) as client,
        redis.Redis.from_url(redis_server.url) as connection,
    ):
        client.set_budget(cust, 15)
        queue = rq.Queue(f"sync-{LOCAL_NAMESPACE}", connection=connection, is_async=False)
        job = queue.enqueue(jobs.summarise, cust, "sync!", job_id=job_id)
        assert job.get_status() == JobStatus.FINISHED
        assert job.return_value() == "sync!"
        again = queue.enqueue(jobs.summarise, cust, "sync!", job_id=job_id)
        assert again.get_status() == JobStatus.FINISHED
        assert client.get_budget(cust).spent == 5  # the same job id ran twice, charged once
        refused = queue.enqueue(jobs.summarise, cust, "too much")  # 10 left, estimate 10: ok
        assert refused.get_status() == JobStatus.FINISHED
        refused = queue.enqueue(jobs.summarise, cust, "too much")
        assert refused.get_status() == JobStatus.FAILED
        result = refused.latest_result()
        assert result is not None
        assert BudgetExhaustedError.__name__ in (result.exc_string or "")
        assert client.get_budget(cust).reserved == 0


def test_a_job_function_hiding_its_budget_is_refused(
    jobs: ModuleType, redis_server: RedisServer
) -> None:
    """A wrapper that copies the budgeted function's attributes but not ``__wrapped__`` cannot be
    traced to its budget: the job fails loudly, rather than run as a plain gated call."""
    cust = customer()
    with (
        AgentBillClient(redis_url=redis_server.url, namespace=LOCAL_NAMESPACE) as client,
        redis.Redis.from_url(redis_server.url) as connection,
    ):
        client.set_budget(cust, 100)
        queue = rq.Queue(f"opaque-{LOCAL_NAMESPACE}", connection=connection, is_async=False)
        job = queue.enqueue(jobs.opaque_summarise, cust, "text", retry=rq.Retry(max=2))
        assert job.get_status() == JobStatus.FAILED
        result = job.latest_result()
        assert result is not None
        assert "without a __wrapped__ chain" in (result.exc_string or "")
        assert jobs.store.get(jobs.runs_key(job.id)) is None  # the body never ran
        budget = client.get_budget(cust)
        assert (budget.spent, budget.reserved, budget.open_reservations) == (0, 0, 0)


# -- the extra ---------------------------------------------------------------------------------


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_importing_agentbill_does_not_import_rq() -> None:
    done = run_python(
        "import sys, agentbill, agentbill.contrib, agentbill.contrib._jobs\n"
        "assert 'rq' not in sys.modules, sorted(m for m in sys.modules if 'rq' in m)"
    )
    assert done.returncode == 0, done.stderr


def test_missing_extra_names_it() -> None:
    done = run_python(
        "import sys\n"
        "sys.modules['rq'] = None  # as if rq were not installed\n"
        "try:\n"
        "    import agentbill.contrib.rq\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'agentbill-redis[rq]'" in done.stdout


def test_a_job_approved_offline_then_enqueued_again_is_charged_once(rq_harness: Harness) -> None:
    """Attack16 F4 with a real worker: the job's budget server is down on its first run
    (``fail_open``: approved offline, the body runs; the server is back before it records).
    The same job id enqueued again replays the recorded run: charged once. Before: 12."""
    with running(extra={"appendonly": "yes", "appendfsync": "always"}) as server:
        cust = customer()
        with AgentBillClient(redis_url=server.url, namespace=rq_harness.namespace) as looker:
            looker.set_budget(cust, 100)
            server.kill()
            job_id = f"offline-{uuid.uuid4().hex[:8]}"
            first = rq_harness.enqueue("offline_first", cust, job_id=job_id)
            worker = rq_harness.start(AGENTBILL_RQ_TEST_OFFLINE_URL=server.url)
            wait_until("the first run's body", lambda: rq_harness.runs(first) == 1)
            server.restart()
            go(rq_harness, job_id, 1)
            log = rq_harness.wait(worker)
            assert "approved 10 units offline" in log
            assert rq_harness.status(first) == JobStatus.FINISHED, rq_harness.failure(first)
            again = rq_harness.enqueue("offline_first", cust, job_id=job_id)
            rq_harness.work(AGENTBILL_RQ_TEST_OFFLINE_URL=server.url)
            assert rq_harness.status(again) == JobStatus.FINISHED, rq_harness.failure(again)
            assert rq_harness.runs(first) == 2
            budget = looker.get_budget(cust)
            assert (budget.spent, budget.reserved, budget.open_reservations) == (6, 0, 0)
