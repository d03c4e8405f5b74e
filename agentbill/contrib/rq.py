"""Budgets for RQ jobs (``pip install 'agentbill-redis[rq]'``).

``@budgeted(...)`` over a job function preflights before its body runs in the worker, records
what it used after it returns, and releases the reservation if it raises (RQ's
``JobTimeoutException`` included) or returns an ``rq.Retry``. Values come from the job's
arguments (:func:`param`), its ``job.meta`` (:func:`header`), constants or any callable of the
:class:`JobCall`.

Idempotency follows the job, not the process: every run of a job preflights with the key
``rq:<job id>`` (``rq:<job id>:repeat:<n>`` for its n-th repeat, each of which is charged). A
run of the job while another still runs shares its reservation; a retry (raised, abandoned, or
``rq.Retry`` returned) reserves afresh, its run before having released; the same job id
enqueued again after it succeeded replays that approval and is charged nothing more, whatever
its retry history. See ``agentbill.contrib._jobs`` for the rules. A refusal, or a budget value
that cannot be resolved, fails the job with the typed error and cancels its remaining retries,
as does a record Redis refuses outright after the body ran (its work is done: running it again
would do it twice). A record Redis cannot take now (busy, unreachable or silent) fails nothing:
it is queued, logged as a warning and delivered, exactly once, when Redis can take it. A work
horse ends with ``os._exit``, which runs no exit hook, so :class:`Worker`'s horse first tries a
last delivery of what is queued, for up to a few seconds (with another worker class, a record
still queued when the horse ends is lost).

A work horse killed outright (SIGKILL, out of memory, RQ's hard kill after the timeout, ``rq``'s
stop-job command) runs no code: :class:`Worker`, whose main process sees the death, releases
for it (``rq worker -w agentbill.contrib.rq.Worker``). Otherwise, and for an abandoned job whose
whole worker died, the reservation expires after its ttl: by default the job's timeout plus
:data:`TTL_MARGIN` seconds.

The job's function may be wrapped by decorators stacked above ``@budgeted`` that keep
``__wrapped__`` (``functools.wraps``): the outermost budgeted function in that chain is the
job's. Called outside a worker (no current job, or a job running another function), a budgeted
function behaves like ``client.gate``: every call is a new run. A job function that carries a
budget it cannot be traced to (copied attributes without ``__wrapped__``) is refused with a
TypeError, not run as a plain call.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import math
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ParamSpec, TypeVar, overload

from agentbill._client import AgentBillClient
from agentbill._exceptions import InvalidRequestError, RunBlockedError
from agentbill._gate import UnitsUsed
from agentbill._outage import deliver_queued
from agentbill._results import Settlement
from agentbill.contrib._jobs import (
    From,
    JobBudget,
    JobCall,
    JobRun,
    bind_arguments,
    header,
    param,
    require,
)

require("rq", "rq")  # before importing it: a missing extra raises an ImportError naming it

import rq  # noqa: E402
from rq.job import Job, Retry  # noqa: E402

__all__ = [
    "TTL_MARGIN",
    "JobBudget",
    "JobCall",
    "Worker",
    "budgeted",
    "header",
    "param",
    "release_job",
]

logger = logging.getLogger("agentbill")

P = ParamSpec("P")
R = TypeVar("R")

TTL_MARGIN = 120
"""Seconds added to a job's timeout for its reservation's default ttl: RQ hard-kills a horse
60 s after the timeout, checked every ``job_monitoring_interval`` (30 s by default)."""

_NAMESPACE = "rq"
"""Prefix of the idempotency keys: ``rq:<job id>``, ``rq:<job id>:repeat:<n>``."""

_RUNS_LEFT = "agentbill_runs_left"
"""``job.meta`` key: the job's retries and repeats left when its first attempt began, from
which every later attempt counts its number."""

_REPEATS_LEFT = "agentbill_repeats_left"
"""``job.meta`` key: the job's repeats left when its first run began, from which every later
run counts its repeat."""

_SPEC = "__agentbill_rq__"


def _counted(job: Job, note: str, left: int) -> int:
    """How many of the job's runs ``left`` has counted down since its first run, which notes
    its start in ``job.meta[note]`` (in memory: callers persist it). A job id enqueued again
    starts from its new counts (RQ writes a new ``meta``)."""
    first = job.meta.get(note)
    if not isinstance(first, int) or first < left:
        first = left
        if left:
            job.meta[note] = left
    return first - left


def _attempt_of(job: Job) -> int:
    """The job's attempt: 0 for its first run, one more for every retry and every repeat.

    RQ counts down ``retries_left`` (raised, or abandoned, with ``retry=Retry(...)``) and
    ``repeats_left`` (``repeat=Repeat(...)``) and counts up ``number_of_retries`` (the job
    returned ``Retry``); it does not keep the starting counts, so the first attempt notes them.
    A run of the same attempt again has the same counts, so the same number.
    """
    left = (job.retries_left or 0) + (job.repeats_left or 0)
    return (job.number_of_retries or 0) + _counted(job, _RUNS_LEFT, left)


def _idempotency_key(job: Job) -> str:
    """The key every run of the job shares: retries reuse it (their run before released), a
    repeat is a new run of the work, with a key of its own."""
    repeat = _counted(job, _REPEATS_LEFT, job.repeats_left or 0)
    return f"{_NAMESPACE}:{job.id}" + (f":repeat:{repeat}" if repeat else "")


def _default_ttl(budget: JobBudget, job: Job) -> int | None:
    """The budget's ttl, else the job's timeout plus TTL_MARGIN (None: the client's default)."""
    if budget.ttl is not None:
        return budget.ttl
    if job.timeout is None or job.timeout < 0:  # -1: the job has no timeout
        return None
    return math.ceil(job.timeout) + TTL_MARGIN


def _no_retries(job: Job | None) -> None:
    """Make the failure being raised final: RQ retries only while ``retries_left`` > 0, read
    from this very object when the worker handles the failure (``handle_job_failure``)."""
    if job is not None and job.retries_left:
        job.retries_left = 0


class _Spec:
    """What ``@budgeted`` attaches to its function: the budget, and how to start a run."""

    def __init__(self, budget: JobBudget, fn: Callable[..., Any]) -> None:
        self.budget = budget
        self.fn = fn
        self.wrapper: Callable[..., Any] = fn

    def start(self, job: Job, arguments: Mapping[str, Any], *, persist: bool) -> JobRun:
        noted = (job.meta.get(_RUNS_LEFT), job.meta.get(_REPEATS_LEFT))
        attempt = _attempt_of(job)
        key = _idempotency_key(job)
        if persist and (job.meta.get(_RUNS_LEFT), job.meta.get(_REPEATS_LEFT)) != noted:
            # So that a later run of this job counts from the same start.
            job.save_meta()  # type: ignore[no-untyped-call]
        call = JobCall(job.id, attempt, arguments, dict(job.meta))
        budget = dataclasses.replace(self.budget, ttl=_default_ttl(self.budget, job))
        return budget.start(call, key)

    def begin(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[JobRun, Job | None]:
        """Resolve and preflight this call; a refusal or bad value ends the job for good."""
        job = rq.get_current_job()
        if job is not None:
            func = _function_of(job)
            if _job_spec(func) is not self:
                if getattr(func, _SPEC, None) is self:
                    _no_retries(job)
                    raise TypeError(
                        f"job {job.id} runs {func!r}, which carries the budget of "
                        f"{self.fn.__qualname__} without a __wrapped__ chain to it: stack "
                        "decorators above @budgeted with functools.wraps"
                    )
                job = None  # called inside another job: a plain gated call
        arguments = bind_arguments(self.fn, args, kwargs)
        try:
            if job is None:
                call = JobCall(uuid.uuid4().hex, 0, arguments, {})
                run = self.budget.start(call, f"{_NAMESPACE}:direct:{call.job_id}")
            else:
                run = self.start(job, arguments, persist=True)
            run.preflight()
        except (RunBlockedError, InvalidRequestError):
            _no_retries(job)
            raise
        return run, job

    def finish(self, run: JobRun, job: Job | None, result: object) -> None:
        if isinstance(result, Retry):  # the job asked RQ to run it again: this attempt failed
            run.release()
            return
        try:
            run.record(result)
        except BaseException:
            _no_retries(job)
            raise


def _function_of(job: Job) -> Any:
    """The function object RQ runs for the job (unbound, for a method)."""
    try:
        func = job.func
    except Exception:  # an import error: not ours to report here
        return None
    return getattr(func, "__func__", func)


def _job_spec(func: object) -> _Spec | None:
    """The budget of the job function ``func``: the outermost ``@budgeted`` function in its
    chain of ``__wrapped__`` (decorators stacked above with ``functools.wraps``). Those
    decorators copy its attribute too, so the wrapper it names must be the function itself."""
    seen: set[int] = set()
    while func is not None and id(func) not in seen:
        seen.add(id(func))
        spec = getattr(func, _SPEC, None)
        if isinstance(spec, _Spec) and spec.wrapper is func:
            return spec
        func = getattr(func, "__wrapped__", None)
    return None


@overload
def budgeted(budget: JobBudget, /) -> Callable[[Callable[P, R]], Callable[P, R]]: ...


@overload
def budgeted(
    client: AgentBillClient,
    /,
    *,
    agent_id: From[str],
    estimated_units: From[int],
    customer_id: From[str | None] = None,
    task_ref: From[str | None] = None,
    task_ceiling: int | None = None,
    units: UnitsUsed[Any] = None,
    ttl: int | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]: ...


def budgeted(
    budget: JobBudget | AgentBillClient, /, **settings: Any
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Put a budget on an RQ job function (``def`` or ``async def``).

    Give a :class:`JobBudget`, or a client and the budget's fields. In a worker, each run
    preflights with the job's idempotency key (``rq:<job id>``) before the body (raising the
    typed RunBlockedError, body not run, no retries, on refusal), records ``units`` after it
    (an int, a callable of the result, or the estimate), and releases its reservation if the
    body raises or returns ``rq.Retry``. ``ttl`` defaults to the job's timeout plus
    TTL_MARGIN.
    """
    if isinstance(budget, JobBudget):
        if settings:
            raise TypeError("budgeted(JobBudget(...)) takes no other arguments")
    else:
        budget = JobBudget(client=budget, **settings)
    job_budget = budget

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        spec = _Spec(job_budget, fn)
        wrapper = _wrap_async(spec, fn) if inspect.iscoroutinefunction(fn) else _wrap(spec, fn)
        spec.wrapper = wrapper
        setattr(wrapper, _SPEC, spec)
        return wrapper

    return decorate


def _wrap(spec: _Spec, fn: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(fn)
    def job_function(*args: P.args, **kwargs: P.kwargs) -> R:
        run, job = spec.begin(args, kwargs)
        try:
            result = fn(*args, **kwargs)
        except BaseException:  # JobTimeoutException, SystemExit and KeyboardInterrupt too
            run.release()
            raise
        spec.finish(run, job, result)
        return result

    return job_function


def _wrap_async(spec: _Spec, fn: Callable[P, Awaitable[Any]]) -> Callable[P, Any]:
    @functools.wraps(fn)
    async def job_function(*args: P.args, **kwargs: P.kwargs) -> Any:
        run, job = spec.begin(args, kwargs)
        try:
            result = await fn(*args, **kwargs)
        except BaseException:  # CancelledError and timeouts too
            run.release()
            raise
        spec.finish(run, job, result)
        return result

    return job_function


def release_job(job: Job) -> Settlement | None:
    """Release the reservation the job's idempotency key names, from any process: for a work
    horse that died without running its own release (it is that horse's, unless another run of
    the job reserved afresh under the key since). None if the job is not budgeted or its
    budget cannot be resolved; a ``noop`` Settlement if the key holds nothing. Never raises.

    Call it before RQ handles the failure, on the job object RQ then saves: the run's counts
    are noted in its ``job.meta``, as the horse noted them in Redis, so RQ's save keeps them.
    """
    try:
        spec = _job_spec(_function_of(job))
        if spec is None:
            return None
        args = tuple(job.args) if job.instance is None else (job.instance, *job.args)
        run = spec.start(job, bind_arguments(spec.fn, args, job.kwargs), persist=False)
    except Exception as exc:
        logger.warning("agentbill: could not release job %s (%s)", job.id, exc)
        return None
    return run.release_by_key()


class Worker(rq.Worker):
    """RQ's forking Worker that also releases a budgeted job's reservation when its work horse
    dies without doing so (killed, out of memory, hard timeout, stopped), and whose work horse
    delivers what its clients still have queued (a record Redis could not take yet) before it
    ends. Run it with ``rq worker -w agentbill.contrib.rq.Worker``.

    For another worker class, call :func:`release_job` the same way: in the main process's
    ``handle_job_failure``, before RQ's own.
    """

    def perform_job(self, job: Job, queue: rq.Queue, execution: Any = None) -> bool:
        try:
            performed: bool = super().perform_job(job, queue, execution)
        finally:
            # The horse leaves with os._exit right after this: no exit hook runs.
            if self.is_horse:
                deliver_queued()
        return performed

    def handle_job_failure(
        self,
        job: Job,
        queue: rq.Queue,
        started_job_registry: Any = None,
        exc_string: str = "",
        execution: Any = None,
    ) -> None:
        # In the horse, the job's own wrapper already released; the main process gets here
        # only after the horse died (monitor_work_horse, _handle_stopped_job).
        if not self.is_horse:
            release_job(job)
        super().handle_job_failure(
            job,
            queue,
            started_job_registry=started_job_registry,
            exc_string=exc_string,
            execution=execution,
        )
