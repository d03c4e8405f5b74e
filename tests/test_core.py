"""The I/O-free core: keys, ids, argument building and reply decoding. No server needed."""

from __future__ import annotations

import json
import pickle
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, cast, get_args

import pytest
import redis
from redis.crc import key_slot

from agentbill import (
    AgentBillError,
    BaseCheck,
    BudgetExhaustedError,
    CeilingExceededError,
    ConcurrencyLimitedError,
    InvalidRequestError,
    LeaseCheck,
    RateLimitedError,
    RunBlockedError,
    TaskCeilingExceededError,
)
from agentbill._check import Reason
from agentbill._contract import SCRIPTS
from agentbill._core import ScriptSettings, preflight_call, record_call, release_call
from agentbill._keys import KeySpace, customer_tag, tag_of_reservation
from agentbill._models import ClientSettings, PreflightRequest, RecordRequest, ReleaseRequest
from agentbill._retry import RetryPolicy

POLICY = ScriptSettings.from_settings(ClientSettings(namespace="ns"))


def test_reservation_id_carries_the_customer_tag_within_256_chars() -> None:
    req = PreflightRequest(agent_id="a", estimated_units=1, customer_id="c" * 256)
    call, rid = preflight_call(POLICY, req, "0" * 24)
    assert len(rid) <= 256
    assert tag_of_reservation(rid) == customer_tag("c" * 256)
    assert SCRIPTS["preflight"].read_args(call.args)["reservation_id"] == rid


def test_all_keys_of_one_call_share_one_slot() -> None:
    req = PreflightRequest(
        agent_id="a", estimated_units=1, customer_id="{weird}:id", idempotency_key="k{}"
    )
    call, _ = preflight_call(POLICY, req, "1" * 24)
    assert len({key_slot(k.encode()) for k in call.keys}) == 1


@pytest.mark.parametrize("namespace", ["plain", "with:colon", "br{ace}s", "glob*?[x]", "spa ce"])
def test_namespace_prefix_is_safe_for_hash_tags_and_acl_globs(namespace: str) -> None:
    prefix = KeySpace(namespace).prefix
    assert not set(prefix) & set("{}*?[]: ")
    keys = KeySpace(namespace).customer("c")
    assert keys.budget.startswith(prefix + ":{")


def test_distinct_namespaces_never_share_keys() -> None:
    a, b = KeySpace("a:b").customer("c"), KeySpace("a").customer("c")
    assert not set(a.fixed) & set(b.fixed)


@pytest.mark.parametrize("rid", ["", "rsv", "rsv.x.y", "rsv." + "g" * 24 + ".t", "abc.def.ghi"])
def test_foreign_reservation_ids_are_rejected(rid: str) -> None:
    assert tag_of_reservation(rid) is None


def test_record_contradicting_customer_is_rejected_without_io() -> None:
    _, rid = preflight_call(
        POLICY, PreflightRequest(agent_id="a", estimated_units=1, customer_id="alice"), "2" * 24
    )
    req = RecordRequest(agent_id="a", units=1, customer_id="bob", reservation_id=rid)
    with pytest.raises(InvalidRequestError) as info:
        record_call(POLICY, req, "t")
    assert info.value.field == "customer_id"


def test_record_without_id_carries_a_request_id_so_retries_land_once() -> None:
    req = RecordRequest(agent_id="a", units=1, customer_id="c")
    first, second = record_call(POLICY, req, "tok1"), record_call(POLICY, req, "tok2")
    idem = len(POLICY.keys.customer("c").fixed)  # the first key after the customer's: idem
    assert first.keys[idem] != second.keys[idem]  # each logical call has its own request id
    # ... and the script is told to remember it
    assert SCRIPTS["settle"].read_args(first.args)["fingerprint"] != ""


def test_release_needs_only_the_reservation_id() -> None:
    _, rid = preflight_call(
        POLICY, PreflightRequest(agent_id="a", estimated_units=1, customer_id="zed"), "3" * 24
    )
    call = release_call(POLICY, ReleaseRequest(reservation_id=rid), "tok")
    assert call.keys[0] == KeySpace("ns").customer("zed").budget


@pytest.mark.parametrize(
    "error",
    [
        BudgetExhaustedError(
            BaseCheck(
                approved=False,
                reason="budget_exhausted",
                reservation_id=None,
                expires_at=datetime(2026, 1, 1, tzinfo=UTC),
                remaining=3,
                limit=10,
                agent_id="a",
                customer_id="c",
                estimated_units=5,
            )
        ),
        TaskCeilingExceededError(
            BaseCheck(
                approved=False,
                reason="task_ceiling_exceeded",
                reservation_id=None,
                expires_at=None,
                remaining=None,
                limit=4,
                agent_id="a",
                customer_id="c",
                estimated_units=5,
                task_ref="t",
                task_ceiling=4,
                task_used=1,
                task_remaining=3,
            )
        ),
        InvalidRequestError("estimated_units", "must be >= 0"),
    ],
    ids=["budget", "task", "invalid"],
)
def test_errors_survive_pickle_and_a_rebuild_from_their_args(error: AgentBillError) -> None:
    """Task queues store a job's exception: by pickle, or (Celery's json backend) as its args,
    rebuilt with cls(*args). Either way the typed error, with its numbers, comes back."""
    for copy in (pickle.loads(pickle.dumps(error)), type(error)(*error.args)):
        assert type(copy) is type(error)
        assert str(copy) == str(error)
        assert vars(copy).keys() == vars(error).keys()
        if isinstance(error, RunBlockedError):
            assert isinstance(copy, RunBlockedError)
            assert (copy.check, copy.reason, copy.limit, copy.remaining) == (
                error.check,
                error.reason,
                error.limit,
                error.remaining,
            )
    json.dumps(error.args)  # what a json result backend stores


def test_a_lease_refusal_survives_pickle_and_a_rebuild_from_its_args() -> None:
    """A LeaseCheck has a field of its own (its run): the error keeps the check's fields only,
    and comes back with them, as a BaseCheck."""
    fields: dict[str, Any] = {
        "approved": False,
        "reason": "budget_exhausted",
        "reservation_id": None,
        "expires_at": None,
        "remaining": 0,
        "limit": 1,
        "agent_id": "a",
        "customer_id": "c",
        "estimated_units": 2,
    }
    refused = LeaseCheck(**fields)
    with pytest.raises(BudgetExhaustedError) as info:
        refused.raise_for_refusal()
    error = info.value
    json.dumps(error.args)
    for copy in (pickle.loads(pickle.dumps(error)), type(error)(*error.args)):
        assert type(copy) is BudgetExhaustedError
        assert str(copy) == str(error)
        assert copy.check == BaseCheck(**fields)


@pytest.mark.parametrize("reason", [*get_args(Reason), "a reason from a newer script"])
def test_a_refusal_raises_the_error_of_its_reason(reason: str) -> None:
    """``raise_for_refusal`` raises from a table the error module fills in (the check sits a
    floor below the errors): every reason has its own error; an unknown one the base class."""
    refused = BaseCheck(
        approved=False,
        reason=cast(Reason, reason),
        reservation_id=None,
        expires_at=None,
        remaining=0,
        limit=1,
        agent_id="a",
        customer_id="c",
        estimated_units=2,
    )
    expected = {
        "ceiling_exceeded": CeilingExceededError,
        "task_ceiling_exceeded": TaskCeilingExceededError,
        "budget_exhausted": BudgetExhaustedError,
        "rate_limited": RateLimitedError,
        "concurrency_limited": ConcurrencyLimitedError,
    }.get(reason, RunBlockedError)
    with pytest.raises(RunBlockedError) as info:
        refused.raise_for_refusal()
    assert type(info.value) is expected
    assert info.value.check is refused


def _failing(calls: list[int], exc: Exception, pause: float = 0.0) -> Callable[[], int]:
    def fn() -> int:
        calls.append(1)
        time.sleep(pause)
        raise exc

    return fn


def test_retries_only_transient_failures_and_count_the_first_attempt() -> None:
    policy = RetryPolicy(attempts=3, deadline=10.0)
    calls: list[int] = []
    with pytest.raises(redis.ConnectionError):
        policy.call(_failing(calls, redis.ConnectionError("refused")))
    assert len(calls) == 3  # the plain first call and two retries: three in all
    calls.clear()
    with pytest.raises(redis.ResponseError):
        policy.call(_failing(calls, redis.ResponseError("a script error is an answer")))
    assert len(calls) == 1
    assert policy.call(lambda: 7) == 7


def test_the_deadline_counts_from_the_first_attempt() -> None:
    """Each attempt takes 0.6 s; with a 1 s deadline the second is the last."""
    calls: list[int] = []
    with pytest.raises(redis.TimeoutError):
        RetryPolicy(attempts=5, deadline=1.0).call(
            _failing(calls, redis.TimeoutError("silent"), pause=0.6)
        )
    assert len(calls) == 2
