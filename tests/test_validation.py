"""Bad input: InvalidRequestError naming the field, raised before anything is written."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentbill import AgentBillClient, InvalidRequestError
from tests._ids import valid_ids
from tests._servers import RedisServer
from tests.conftest import namespace_keys

BAD_UNITS: list[object] = [True, False, 1.0, 2.5, float("nan"), float("inf"), "3", None, -1, 2**53]
BAD_IDS: list[object] = [
    "",
    "x" * 257,
    "a\x00b",
    "tab\there",
    "new\nline",
    "\x7f",
    5,
    b"bytes",
    # No visible character, or a line separator (issue 16, finding 7).
    " ",
    "\u200b",
    "\u00a0\u3000",
    "a\u2028b",
    "a\u2029b",
]

Op = Callable[[AgentBillClient, object], object]

UNIT_FIELDS: dict[str, Op] = {
    "estimated_units": lambda c, v: c.preflight("a", v, "c"),  # type: ignore[arg-type]
    "task_ceiling": lambda c, v: c.preflight("a", 1, "c", task_ref="t", task_ceiling=v),  # type: ignore[arg-type]
    "units": lambda c, v: c.record("a", v, "c"),  # type: ignore[arg-type]
    "limit": lambda c, v: c.set_budget("c", v),  # type: ignore[arg-type]
    "ceiling": lambda c, v: c.open_task("t", v, "c"),  # type: ignore[arg-type]
}

ID_FIELDS: dict[str, list[Op]] = {
    "agent_id": [
        lambda c, v: c.preflight(v, 1, "c"),  # type: ignore[arg-type]
        lambda c, v: c.record(v, 1, "c"),  # type: ignore[arg-type]
    ],
    "customer_id": [
        lambda c, v: c.preflight("a", 1, v),  # type: ignore[arg-type]
        lambda c, v: c.record("a", 1, v),  # type: ignore[arg-type]
        lambda c, v: c.set_budget(v, 5),  # type: ignore[arg-type]
        lambda c, v: c.get_budget(v),  # type: ignore[arg-type]
        lambda c, v: c.open_task("t", 5, v),  # type: ignore[arg-type]
    ],
    "task_ref": [
        lambda c, v: c.preflight("a", 1, "c", task_ref=v),  # type: ignore[arg-type]
        lambda c, v: c.record("a", 1, "c", task_ref=v),  # type: ignore[arg-type]
        lambda c, v: c.open_task(v, 5, "c"),  # type: ignore[arg-type]
        lambda c, v: c.get_task(v, "c"),  # type: ignore[arg-type]
    ],
    "idempotency_key": [
        lambda c, v: c.preflight("a", 1, "c", idempotency_key=v),  # type: ignore[arg-type]
        lambda c, v: c.record("a", 1, "c", idempotency_key=v),  # type: ignore[arg-type]
    ],
    "reservation_id": [
        lambda c, v: c.release(v),  # type: ignore[arg-type]
        lambda c, v: c.record("a", 1, "c", reservation_id=v),  # type: ignore[arg-type]
    ],
}


def _refused_without_writing(
    op: Op, client: AgentBillClient, value: object, field: str, raw: redis.Redis, ns: str
) -> None:
    before = namespace_keys(raw, ns)
    with pytest.raises(InvalidRequestError) as info:
        op(client, value)
    assert info.value.field == field, str(info.value)
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(f"{field}: ")
    assert namespace_keys(raw, ns) == before


# None is valid where it means "no ceiling" or "unlimited".
OPTIONAL_UNIT_FIELDS = {"task_ceiling", "limit", "ceiling"}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        (f, v)
        for f in UNIT_FIELDS
        for v in BAD_UNITS
        if not (v is None and f in OPTIONAL_UNIT_FIELDS)
    ],
    ids=repr,
)
def test_bad_units_name_the_field(
    client: AgentBillClient, raw: redis.Redis, namespace: str, field: str, value: object
) -> None:
    _refused_without_writing(UNIT_FIELDS[field], client, value, field, raw, namespace)


@pytest.mark.parametrize("field", ID_FIELDS)
@pytest.mark.parametrize("value", BAD_IDS, ids=repr)
def test_bad_ids_name_the_field(
    client: AgentBillClient, raw: redis.Redis, namespace: str, field: str, value: object
) -> None:
    client.preflight("a", 1, "c")  # some state, so "nothing written" compares non-empty data
    for op in ID_FIELDS[field]:
        _refused_without_writing(op, client, value, field, raw, namespace)


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "60"], ids=repr)
def test_bad_ttl_names_the_field(client: AgentBillClient, value: object) -> None:
    with pytest.raises(InvalidRequestError) as info:
        client.preflight("a", 1, "c", ttl=value)  # type: ignore[arg-type]
    assert info.value.field == "ttl"


def test_bad_success_flag_names_the_field(client: AgentBillClient) -> None:
    with pytest.raises(InvalidRequestError) as info:
        client.record("a", 1, "c", success="yes")  # type: ignore[arg-type]
    assert info.value.field == "success"


def test_bad_metadata_names_the_field(client: AgentBillClient) -> None:
    for bad in [{"x": object()}, {"big": "x" * 5000}, ["not", "a", "dict"]]:
        with pytest.raises(InvalidRequestError) as info:
            client.record("a", 1, "c", metadata=bad)  # type: ignore[arg-type]
        assert info.value.field == "metadata"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"ceiling": -1}, "ceiling"),
        ({"ceiling": 1.5}, "ceiling"),
        ({"namespace": ""}, "namespace"),
        ({"namespace": "a\nb"}, "namespace"),
        ({"reservation_ttl": 0}, "reservation_ttl"),
        ({"socket_timeout": float("nan")}, "socket_timeout"),
        ({"api_key": 42}, "api_key"),
        ({"redis_url": ""}, "redis_url"),
    ],
)
def test_bad_client_settings_name_the_field(
    redis_server: RedisServer, kwargs: dict[str, Any], field: str
) -> None:
    kwargs.setdefault("redis_url", redis_server.url)
    with pytest.raises(InvalidRequestError) as info:
        AgentBillClient(**kwargs)
    assert info.value.field == field


def test_api_key_never_appears_in_repr_or_errors(redis_server: RedisServer) -> None:
    secret = "agb_top-secret-value"
    client = AgentBillClient(api_key=secret, redis_url=redis_server.url)
    assert secret not in repr(client)
    assert secret not in repr(client._settings)
    with pytest.raises(InvalidRequestError) as info:
        AgentBillClient(api_key=secret, ceiling=-1, redis_url=redis_server.url)
    assert secret not in str(info.value)


# -- properties --------------------------------------------------------------------------------

control = st.characters(categories=["Cc"])
bad_id = st.one_of(
    st.just(""),
    st.text(min_size=257, max_size=300),
    st.builds(lambda a, c, b: a + c + b, st.text(max_size=5), control, st.text(max_size=5)),
    st.integers(),
    st.floats(),
    st.none(),
    st.booleans(),
)
bad_units = st.one_of(
    st.integers(max_value=-1),
    st.integers(min_value=2**53),
    st.floats(),
    st.booleans(),
    st.text(),
    st.none(),
    st.decimals(),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(agent=bad_id, units=st.integers(0, 10))
def test_property_bad_agent_id(
    client: AgentBillClient, raw: redis.Redis, namespace: str, agent: object, units: int
) -> None:
    _refused_without_writing(
        lambda c, v: c.preflight(v, units, "c"),  # type: ignore[arg-type]
        client,
        agent,
        "agent_id",
        raw,
        namespace,
    )


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(units=bad_units)
def test_property_bad_units(
    client: AgentBillClient, raw: redis.Redis, namespace: str, units: object
) -> None:
    _refused_without_writing(
        lambda c, v: c.record("a", v, "c"),  # type: ignore[arg-type]
        client,
        units,
        "units",
        raw,
        namespace,
    )


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    customer=valid_ids(),
    units=st.integers(0, 2**53 - 1),
)
def test_property_any_valid_customer_id_round_trips(
    client: AgentBillClient, customer: str, units: int
) -> None:
    client.set_budget(customer, 2**53 - 1)
    before = client.get_budget(customer)
    check = client.preflight("a", units, customer)
    if check.approved:
        assert check.reservation_id is not None
        assert len(check.reservation_id) <= 256
        check.record(units)
        after = client.get_budget(customer)
        assert after.spent == before.spent + units
        assert after.reserved == before.reserved
    else:
        assert before.spent + before.reserved + units > 2**53 - 1
