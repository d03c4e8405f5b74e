"""Celery: a budget on a task (``pip install 'agentbill-redis[celery]'``).

    @app.task(base=BudgetedTask, budget=JobBudget(client=client, agent_id="summariser",
                                                  estimated_units=10,
                                                  customer_id=param("customer_id")))
    def summarise(customer_id: str, text: str) -> str: ...

Each attempt of the task is preflighted before its body (a refusal fails the task with the typed
RunBlockedError, which no ``autoretry_for`` sees), recorded after it, and released if it ends any
other way:

- in the pool child, when the body raises anything (``self.retry()`` and ``autoretry_for``
  release before the retry is sent; SoftTimeLimitExceeded, SystemExit and KeyboardInterrupt
  too);
- in the worker's main process, when the child cannot run code any more (hard time limit,
  ``revoke(terminate=True)``, a child killed or lost, cold shutdown): :class:`BudgetRequest`,
  the task's Request class, releases by the task's idempotency key before Celery requeues
  or fails the message;
- otherwise (the whole worker killed) the reservation expires after its TTL: by default the
  task's hard time limit plus :data:`TTL_MARGIN` seconds, else the client's
  ``reservation_ttl``.

A task whose body returned is never failed by its record: if Redis cannot take the record now
(busy, unreachable or silent), it is queued, logged as a warning and delivered, exactly once,
when Redis can take it (by the pool child's background delivery; a child about to end, at
``worker_process_shutdown``, first tries a last delivery for up to a few seconds).

The idempotency key is ``celery:<task id>``, the same for every run of the task (see
``agentbill.contrib._jobs`` for the rules): a redelivered message (``acks_late`` after a lost
worker, the broker's visibility timeout) shares the reservation of the delivery still running,
or reserves afresh if that one was released; a retry reserves afresh (its attempt before was
released); the same task id sent again after it succeeded replays that approval and is charged
nothing more, whatever its retry count.
"""

from __future__ import annotations

from agentbill.contrib._jobs import require

require("celery", "celery")

import contextvars  # noqa: E402 - after require(), which names the extra if celery is missing
import dataclasses  # noqa: E402
import logging  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Mapping  # noqa: E402
from datetime import datetime  # noqa: E402
from typing import Any, ParamSpec, TypeVar  # noqa: E402

from billiard.einfo import ExceptionWithTraceback  # type: ignore[attr-defined]  # noqa: E402
from celery import Task  # noqa: E402
from celery.app.task import Context  # noqa: E402
from celery.exceptions import (  # noqa: E402
    Retry,
    Terminated,
    TimeLimitExceeded,
    WorkerLostError,
)
from celery.signals import worker_process_shutdown  # noqa: E402
from celery.worker.request import Request  # noqa: E402

from agentbill._exceptions import RunBlockedError  # noqa: E402
from agentbill._outage import deliver_queued  # noqa: E402
from agentbill.contrib._jobs import (  # noqa: E402
    JobBudget,
    JobCall,
    JobRun,
    bind_arguments,
    header,
    param,
)

__all__ = ["TTL_MARGIN", "BudgetRequest", "BudgetedTask", "JobBudget", "JobCall", "header", "param"]

logger = logging.getLogger("agentbill")

P = ParamSpec("P")
R = TypeVar("R")

IDEMPOTENCY_NAMESPACE = "celery"

TTL_MARGIN = 60
"""Seconds added to a task's hard time limit to make its reservation TTL (when ``budget.ttl`` is
unset): the worker's main process releases at the limit; the TTL only matters if it died too."""

# A child that died (or is about to be killed) runs no more code: its parent releases for it.
_CHILD_GONE = (Terminated, WorkerLostError, TimeLimitExceeded, SystemExit, KeyboardInterrupt)


@dataclasses.dataclass(slots=True)
class _Attempt:
    """The attempt running in this process (found again by ``retry()``)."""

    task: Task[Any, Any]
    run: JobRun
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.run.release()


_current: contextvars.ContextVar[_Attempt | None] = contextvars.ContextVar(
    "agentbill_celery_attempt", default=None
)


def _call_of(task: Task[Any, Any], request: Context, args: Any, kwargs: Any) -> JobCall:
    job_id = request.id or f"direct-{uuid.uuid4().hex}"  # a plain call has no task id
    return JobCall(
        job_id=job_id,
        attempt=request.retries or 0,
        arguments=bind_arguments(task.run, tuple(args or ()), dict(kwargs or {})),
        headers=request.headers or {},
    )


def _hard_time_limit(task: Task[Any, Any], request: Context) -> float | None:
    limits = request.timelimit or (None, None)
    hard: float | None = limits[0] or task.time_limit
    return hard


class BudgetedTask(Task[P, R]):
    """A task base class that runs every attempt under a budget.

    Use it as ``@app.task(base=BudgetedTask, budget=JobBudget(...))``; Celery sets the options
    below as attributes of the task:

    - ``budget``: the :class:`JobBudget` (its values may read the task's arguments with
      :func:`param` and the message headers with :func:`header`). Required.
    - ``budget_retry_rate_limited``: when a refusal says waiting helps (its ``retry_after`` is
      not None), retry the task after that many seconds (``self.retry``, so ``max_retries``
      applies) instead of failing it. Default False.

    A refusal raises the typed RunBlockedError before ``run`` is called, so ``autoretry_for``
    never retries it; it is listed in ``throws``, Celery's expected errors.
    """

    budget: JobBudget | None = None
    budget_retry_rate_limited: bool = False
    throws: tuple[type[Exception], ...] = (RunBlockedError,)
    Request = "agentbill.contrib.celery:BudgetRequest"

    def _budget_run(
        self, request: Context, args: Any = (), kwargs: Mapping[str, Any] | None = None
    ) -> JobRun:
        """The budget of this task resolved against one attempt (``request``); raises
        InvalidRequestError if a value is bad, TypeError if the task has no budget."""
        budget = self.budget
        if budget is None:
            raise TypeError(
                f"task {self.name} has base=BudgetedTask but no budget: "
                "@app.task(base=BudgetedTask, budget=JobBudget(...))"
            )
        if budget.ttl is None:
            hard = _hard_time_limit(self, request)
            if hard:
                budget = dataclasses.replace(budget, ttl=int(hard) + TTL_MARGIN)
        call = _call_of(self, request, args, kwargs)
        return budget.start(call, f"{IDEMPOTENCY_NAMESPACE}:{call.job_id}")

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        request = self.request
        run = self._budget_run(request, args, kwargs)
        try:
            run.preflight()
        except RunBlockedError as refusal:
            wait = refusal.retry_after
            if self.budget_retry_rate_limited and wait is not None and not request.called_directly:
                raise self.retry(exc=refusal, countdown=wait) from refusal
            raise
        attempt = _Attempt(self, run)
        token = _current.set(attempt)
        try:
            result = super().__call__(*args, **kwargs)
        except BaseException:  # Retry, SoftTimeLimitExceeded, SystemExit too
            attempt.release()
            raise
        finally:
            _current.reset(token)
        run.record(result)
        return result

    def retry(
        self,
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        exc: Exception | None = None,
        throw: bool = True,
        eta: datetime | None = None,
        countdown: float | None = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> Retry:
        """Celery's retry, releasing this attempt first: the next attempt, which may start
        before this one has unwound, must not find its units still held."""
        attempt = _current.get()
        if throw and attempt is not None and attempt.task is self:
            attempt.release()
        return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)


class BudgetRequest(Request):
    """The worker's main-process side of a BudgetedTask's message (Celery's ``Task.Request``).

    When the pool child is gone or about to be killed (hard time limit, ``revoke(terminate=
    True)``, the child killed or lost, cold shutdown), nothing runs in it any more: this releases
    the attempt's reservation by its idempotency key, before Celery requeues or fails the
    message. It holds no reservation id (the child made the reservation), so it releases the
    one the task id's key names, which is the dead child's unless another delivery of the task
    reserved afresh under that key since. Subclass it (and point your task's ``Request`` at the
    subclass) to add your own.
    """

    _agentbill_released = False

    def on_timeout(self, soft: bool, timeout: float) -> None:
        if not soft:
            self._release_attempt()
        super().on_timeout(soft, timeout)

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> None:
        exc = getattr(exc_info, "exception", None)
        if isinstance(exc, ExceptionWithTraceback):  # raised in the child, sent to its parent
            exc = exc.exc
        if isinstance(exc, _CHILD_GONE):
            self._release_attempt()
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    def _release_attempt(self) -> None:
        if self._agentbill_released:
            return
        self._agentbill_released = True
        task = self.task
        if not isinstance(task, BudgetedTask):
            return
        try:
            context = Context(self.request_dict)
            run = task._budget_run(context, self.args, self.kwargs)
        except Exception as exc:  # an unresolvable budget never reserved anything
            logger.warning("agentbill: no budget to release for task %s: %r", self.id, exc)
            return
        run.release_by_key()


@worker_process_shutdown.connect
def _deliver_before_the_child_ends(**_: Any) -> None:
    """A prefork pool child ends with ``os._exit``, which runs no exit hook: what its clients
    still have queued (a record Redis could not take yet) gets its last delivery here."""
    deliver_queued()
