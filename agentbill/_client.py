"""AgentBillClient: one script call per operation, over the logic in ``_core``."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import redis
from pydantic import SecretStr
from redis.backoff import NoBackoff
from redis.retry import Retry

from agentbill import _core
from agentbill._gate import Gate, Units
from agentbill._models import (
    BudgetRequest,
    ClientSettings,
    CustomerRef,
    PreflightRequest,
    RecordRequest,
    ReservationRef,
    TaskRequest,
    validate,
)
from agentbill._results import BudgetStatus, Check, Settlement, TaskStatus
from agentbill._retry import retrying, translate
from agentbill._scripts import bind

logger = logging.getLogger("agentbill")

ENV_REDIS_URL = "AGENTBILL_REDIS_URL"


def connection_url(settings: ClientSettings) -> str:
    """``redis_url``, else ``$AGENTBILL_REDIS_URL``, else the embedded local server."""
    if settings.redis_url is not None:
        return settings.redis_url
    from_env = os.environ.get(ENV_REDIS_URL)
    if from_env:
        return from_env
    from agentbill._local import ensure_local_server

    return ensure_local_server()


def connection_options(settings: ClientSettings) -> dict[str, Any]:
    """What every connection the client builds gets: bounded timeouts, no redis-py retries."""
    return {
        "socket_connect_timeout": settings.connect_timeout,
        "socket_timeout": settings.socket_timeout,
        # agentbill's own retry policy (_retry.py) is the only retry layer.
        "retry": Retry(NoBackoff(), 0),
        "retry_on_timeout": False,
        "health_check_interval": 0,
    }


class AgentBillClient:
    """Budget enforcement for agent runs, against a Redis shared by every worker.

    Connects to ``redis`` (a ready ``redis.Redis``) if given, else ``redis_url``, else the
    ``AGENTBILL_REDIS_URL`` environment variable, else an embedded local server shared by every
    process on this machine. ``ceiling`` caps the estimate of any single run; ``namespace``
    prefixes every key, so clients with different namespaces never see each other's data.

    Raises InvalidRequestError for bad settings, StoreUnavailableError when the embedded server
    cannot be started.
    """

    def __init__(
        self,
        api_key: str | None = None,
        ceiling: int | None = None,
        *,
        redis_url: str | None = None,
        redis: redis.Redis | None = None,
        namespace: str = "agentbill",
        reservation_ttl: int = 3600,
        idempotency_ttl: int = 24 * 3600,
        outcome_retention: int = 24 * 3600,
        reap_limit: int = 100,
        connect_timeout: float = 1.0,
        socket_timeout: float = 2.0,
        retry_attempts: int = 3,
        retry_deadline: float = 2.5,
    ) -> None:
        settings = validate(
            ClientSettings,
            api_key=SecretStr(api_key) if isinstance(api_key, str) else api_key,
            ceiling=ceiling,
            redis_url=redis_url,
            namespace=namespace,
            reservation_ttl=reservation_ttl,
            idempotency_ttl=idempotency_ttl,
            outcome_retention=outcome_retention,
            reap_limit=reap_limit,
            connect_timeout=connect_timeout,
            socket_timeout=socket_timeout,
            retry_attempts=retry_attempts,
            retry_deadline=retry_deadline,
        )
        self._settings = settings
        self._policy = _core.Policy.from_settings(settings)
        self._owns_redis = redis is None
        if redis is None:
            redis = self._connect(settings)
        self._redis: Any = redis
        self._scripts = bind(redis)
        self._retrying = retrying(settings.retry_attempts, settings.retry_deadline)

    @staticmethod
    def _connect(settings: ClientSettings) -> redis.Redis:
        return redis.Redis.from_url(connection_url(settings), **connection_options(settings))

    def __repr__(self) -> str:
        return f"AgentBillClient(namespace={self.namespace!r}, ceiling={self.ceiling!r})"

    @property
    def namespace(self) -> str:
        return self._settings.namespace

    @property
    def ceiling(self) -> int | None:
        return self._settings.ceiling

    # -- the round trip ------------------------------------------------------------------------

    def _call(self, call: _core.Call) -> Any:
        script = self._scripts[call.script]
        try:
            for attempt in self._retrying.copy():
                with attempt:
                    return script(keys=call.keys, args=call.args)
        except redis.RedisError as exc:
            raise translate(exc) from exc
        except OSError as exc:  # a socket error redis-py did not wrap
            raise translate(exc) from exc
        raise AssertionError("unreachable: tenacity re-raises the last error")

    # -- runs ----------------------------------------------------------------------------------

    def preflight(
        self,
        agent_id: str,
        estimated_units: int,
        customer_id: str | None = None,
        *,
        task_ref: str | None = None,
        task_ceiling: int | None = None,
        idempotency_key: str | None = None,
        ttl: int | None = None,
    ) -> Check:
        """Check every rule and, only if all pass, reserve ``estimated_units``. One atomic call.

        Returns a Check; a refusal is returned (``approved`` False, ``reason`` set), not raised.
        ``customer_id`` None is the customer named "default". ``task_ceiling`` opens an unknown
        ``task_ref`` with that ceiling; for a known task it is ignored. ``ttl`` (seconds,
        default ``reservation_ttl``) is how long an unsettled reservation holds its units.
        The same ``idempotency_key`` with the same arguments returns the first approval.

        Raises InvalidRequestError (nothing written), StoreUnavailableError (nothing approved).
        """
        req = validate(
            PreflightRequest,
            agent_id=agent_id,
            estimated_units=estimated_units,
            customer_id=_core.customer_of(customer_id),
            task_ref=task_ref,
            task_ceiling=task_ceiling,
            idempotency_key=idempotency_key,
            ttl=ttl,
        )
        call, _ = _core.preflight_call(self._policy, req, _core.new_token())
        check = _core.decode_preflight(self._call(call), req, self._policy)
        return _bind(check, self)

    def record(
        self,
        agent_id: str,
        units: int,
        customer_id: str | None = None,
        *,
        reservation_id: str | None = None,
        task_ref: str | None = None,
        success: bool = True,
        idempotency_key: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Settlement:
        """Record the units a run actually used.

        With ``reservation_id``: close that reservation, charging ``units`` in full (even above
        the estimate) and releasing the whole estimate. Without it: close the oldest open
        reservation of (customer, agent, task_ref), or charge ``units`` directly if none is
        open. ``success=False`` releases without charging. Closing twice charges once.

        Raises InvalidRequestError (nothing written), StoreUnavailableError.
        """
        req = validate(
            RecordRequest,
            agent_id=agent_id,
            units=units,
            customer_id=customer_id,
            reservation_id=reservation_id,
            task_ref=task_ref,
            success=success,
            idempotency_key=idempotency_key,
            metadata=metadata,
        )
        call = _core.record_call(self._policy, req, _core.new_token())
        return _core.decode_settle(self._call(call), req.metadata)

    def release(self, reservation_id: str) -> Settlement:
        """Close a reservation without charging: its units return to every scope at once."""
        ref = validate(ReservationRef, reservation_id=reservation_id)
        call = _core.release_call(self._policy, ref.reservation_id, _core.new_token())
        return _core.decode_settle(self._call(call))

    def gate(
        self,
        agent_id: str,
        estimated_units: int,
        customer_id: str | None = None,
        *,
        units: Units[Any] = None,
        task_ref: str | None = None,
        task_ceiling: int | None = None,
        ttl: int | None = None,
    ) -> Gate:
        """Decorate a function (``def`` or ``async def``) so every call is preflighted first.

        On refusal the body does not run and the typed RunBlockedError is raised. After the body
        returns, ``units`` is recorded: an int, a callable of the result, or by default the
        estimate. If the body raises anything (KeyboardInterrupt and cancellation too), the
        reservation is released and the exception re-raised.
        """
        # Validate now, so a bad decorator fails at import time rather than on first call.
        validate(
            PreflightRequest,
            agent_id=agent_id,
            estimated_units=estimated_units,
            customer_id=_core.customer_of(customer_id),
            task_ref=task_ref,
            task_ceiling=task_ceiling,
            ttl=ttl,
        )
        return Gate(
            self,
            agent_id=agent_id,
            estimated_units=estimated_units,
            customer_id=customer_id,
            units=units,
            task_ref=task_ref,
            task_ceiling=task_ceiling,
            ttl=ttl,
        )

    # -- admin ---------------------------------------------------------------------------------

    def set_budget(self, customer_id: str | None, limit: int | None) -> BudgetStatus:
        """Set the customer's budget (``None``: unlimited). Lowering it below what is spent and
        reserved is allowed: it only refuses new runs."""
        req = validate(BudgetRequest, customer_id=_core.customer_of(customer_id), limit=limit)
        reply = self._call(_core.set_budget_call(self._policy, req.customer_id, req.limit))
        return _core.decode_budget(reply, req.customer_id)

    def get_budget(self, customer_id: str | None = None) -> BudgetStatus:
        """The customer's limit, spent, reserved, remaining and open reservations."""
        req = validate(CustomerRef, customer_id=_core.customer_of(customer_id))
        reply = self._call(_core.get_budget_call(self._policy, req.customer_id))
        return _core.decode_budget(reply, req.customer_id)

    def open_task(
        self, task_ref: str, ceiling: int | None, customer_id: str | None = None
    ) -> TaskStatus:
        """Open a task of the customer with a ceiling (``None``: no ceiling), or change it."""
        req = validate(
            TaskRequest,
            task_ref=task_ref,
            customer_id=_core.customer_of(customer_id),
            ceiling=ceiling,
        )
        call = _core.open_task_call(self._policy, req.customer_id, req.task_ref, req.ceiling)
        return _core.decode_task(self._call(call), req.customer_id, req.task_ref)

    def get_task(self, task_ref: str, customer_id: str | None = None) -> TaskStatus:
        """The task's ceiling, used, reserved and remaining (``exists`` False if never seen)."""
        req = validate(TaskRequest, task_ref=task_ref, customer_id=_core.customer_of(customer_id))
        call = _core.get_task_call(self._policy, req.customer_id, req.task_ref)
        return _core.decode_task(self._call(call), req.customer_id, req.task_ref)

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connections this client opened (not a ``redis=`` client you passed in)."""
        if self._owns_redis:
            self._redis.close()

    def __enter__(self) -> AgentBillClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _bind(check: Check, client: AgentBillClient) -> Check:
    return dataclasses.replace(check, _client=client) if check.approved else check
