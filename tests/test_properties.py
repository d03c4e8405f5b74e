"""Every public input, fuzzed: a bad value is an InvalidRequestError naming its parameter, and
nothing is written.

One property per (method, parameter) of both clients, run on the sync client and on the async
one: Hypothesis draws a bad value for that parameter (a wrong type, a bool for an int, a float,
a negative number, more than 2**53 - 1, an empty, oversized or control-character id, bad
metadata, ...) and keeps the other arguments valid. The call must raise InvalidRequestError
whose ``field`` is the parameter (or a place inside it: ``thresholds.0``, ``requests[2].ttl``),
the namespace's keys in Redis must be exactly as before, and the same call with valid arguments
must then work (nothing was left half-written). The constructor's settings, the items of
``preflight_many`` and ``Check.record`` are fuzzed the same way.

``test_every_public_input_is_fuzzed`` keeps the table honest: a public parameter added to
either client without a property here fails it. Gaps it found are regression tests at the end.

tests/test_validation.py has fixed examples for many of these on the sync client, and
Hypothesis properties for ``preflight(agent_id=...)`` and ``record(units=...)``; those two are
not repeated here for the sync client.
"""

from __future__ import annotations

import asyncio
import inspect
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentbill import AgentBillClient, AsyncAgentBillClient, InvalidRequestError, Preflight
from agentbill._keys import tag_of_reservation
from agentbill._models import MAX_ID_LENGTH, MAX_METADATA_BYTES, MAX_TTL_SECONDS, MAX_UNITS
from tests._servers import RedisServer
from tests.conftest import namespace_keys

# -- bad values --------------------------------------------------------------------------------

control = st.characters(categories=["Cc"])
not_str = st.one_of(
    st.integers(),
    st.floats(),
    st.booleans(),
    st.binary(max_size=8),
    st.lists(st.text(max_size=3), max_size=2),
    st.tuples(st.text(max_size=3)),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=1),
)
not_int = st.one_of(
    st.booleans(),
    st.floats(),  # 1.0 too: an int-valued float is still not an int
    st.decimals(allow_nan=False, allow_infinity=False, places=0),
    st.fractions(),
    st.text(max_size=5),
    st.binary(max_size=5),
    st.lists(st.integers(), max_size=2),
    st.complex_numbers(),
)


def bad_ids(*, optional: bool) -> st.SearchStrategy[object]:
    """Not an id: empty, longer than 256, holding a control character, or not a str at all.
    (None only when the parameter is required.)"""
    bad = st.one_of(
        st.just(""),
        st.text(min_size=MAX_ID_LENGTH + 1, max_size=MAX_ID_LENGTH + 40),
        st.builds(lambda a, c, b: a + c + b, st.text(max_size=8), control, st.text(max_size=8)),
        not_str,
    )
    return bad if optional else bad | st.none()


def bad_units(*, optional: bool) -> st.SearchStrategy[object]:
    """Not units: below 0, above 2**53 - 1, or not an int (bools, floats, Decimals, strs...)."""
    bad = st.one_of(
        st.integers(max_value=-1),
        st.integers(min_value=MAX_UNITS + 1),
        st.just(MAX_UNITS + 1),
        not_int,
    )
    return bad if optional else bad | st.none()


def bad_seconds(*, optional: bool) -> st.SearchStrategy[object]:
    """Not a TTL: below 1 s, above 2**31 - 1 s, or not an int."""
    bad = st.one_of(
        st.integers(max_value=0),
        st.integers(min_value=MAX_TTL_SECONDS + 1),
        not_int,
    )
    return bad if optional else bad | st.none()


def bad_ints(low: int, high: int) -> st.SearchStrategy[object]:
    return st.one_of(st.integers(max_value=low - 1), st.integers(min_value=high + 1), not_int)


bad_bools = st.one_of(
    st.integers(),  # 0 and 1 too: strict
    st.floats(),
    st.text(max_size=5),
    st.none(),
    st.binary(max_size=3),
)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10))
bad_metadata = st.one_of(
    # not a dict
    st.lists(json_scalars, max_size=3),
    st.text(max_size=10),
    st.integers(),
    st.tuples(st.tuples(st.text(max_size=3), st.integers())),
    # a dict whose values JSON cannot encode (or only as NaN / Infinity)
    st.dictionaries(
        st.text(max_size=5),
        st.one_of(
            st.sampled_from([float("nan"), float("inf"), float("-inf")]),
            st.builds(object),
            st.sets(st.integers(), max_size=2),
            st.binary(max_size=3),
            st.complex_numbers(allow_nan=False, allow_infinity=False),
        ),
        min_size=1,
        max_size=2,
    ),
    # more than 4 KiB of JSON
    st.integers(MAX_METADATA_BYTES, MAX_METADATA_BYTES + 200).map(lambda n: {"x": "y" * n}),
)
bad_timeouts = st.one_of(
    st.floats(max_value=0),
    st.floats(min_value=300, exclude_min=True),
    st.sampled_from([float("nan"), float("inf"), float("-inf")]),
    st.booleans(),
    st.text(max_size=5),
    st.none(),
)


def _not_a_reservation_id(value: str) -> bool:
    return tag_of_reservation(value) is None


# A reservation id must be one agentbill issued: rsv.<24 hex digits>.<token>.
bad_reservation_ids = bad_ids(optional=True) | st.one_of(
    st.text(min_size=1, max_size=40).filter(lambda s: _not_a_reservation_id(s)),
    st.from_regex(r"\Arsv\.[0-9a-f]{0,23}\.[0-9a-f]{1,24}\Z").filter(_not_a_reservation_id),
    st.from_regex(r"\Arsv\.[0-9a-fA-Z]{24}\.[0-9a-f]{1,24}\Z").filter(_not_a_reservation_id),
)

# -- the table ---------------------------------------------------------------------------------

# Every method's valid arguments; a property replaces one of them with a bad value. Limits are
# set on customer "r", so they never refuse the valid calls on customer "c".
VALID_ARGS: dict[str, dict[str, object]] = {
    "preflight": {"agent_id": "a", "estimated_units": 1, "customer_id": "c"},
    "gate": {"agent_id": "a", "estimated_units": 1, "customer_id": "c"},
    "run": {"agent_id": "a", "estimated_units": 1, "customer_id": "c"},
    "record": {"agent_id": "a", "units": 1, "customer_id": "c"},
    "release": {"idempotency_key": "k", "customer_id": "c"},
    "set_budget": {"customer_id": "c", "limit": 1000},
    "get_budget": {"customer_id": "c"},
    "set_rate_limit": {"customer_id": "r", "units": 1000, "per_seconds": 1},
    "set_concurrency_limit": {"customer_id": "r", "max_in_flight": 1000},
    "get_usage": {"customer_id": "c"},
    "events": {"customer_id": "c"},
    "open_task": {"task_ref": "t", "ceiling": 5, "customer_id": "c"},
    "get_task": {"task_ref": "t", "customer_id": "c"},
    "lease": {"agent_id": "a", "customer_id": "c", "slice_units": 5},
    "estimates": {"agent_id": "a", "customer_id": "c"},
}
# A bad reservation_id is given alone: with the idempotency key too, that is the error.
WITHOUT = {("release", "reservation_id"): ("idempotency_key", "customer_id")}


@dataclass(frozen=True)
class Param:
    """One public parameter and the bad values to give it."""

    method: str
    name: str
    bad: st.SearchStrategy[object]

    @property
    def id(self) -> str:
        return f"{self.method}.{self.name}"

    def call(self, client: AgentBillClient, value: object) -> object:
        args = {**VALID_ARGS[self.method], self.name: value}
        for name in WITHOUT.get((self.method, self.name), ()):
            del args[name]
        return getattr(client, self.method)(**args)


def _valid_call(client: AgentBillClient, method: str) -> object:
    return getattr(client, method)(**VALID_ARGS[method])


# What the valid call after a bad one must give back: the operation really ran.
WORKED: dict[str, Callable[[Any], bool]] = {
    "preflight": lambda check: check.approved and check.reservation_id is not None,
    "gate": callable,
    "run": lambda run: hasattr(run, "__enter__") or hasattr(run, "__aenter__"),
    "record": lambda s: s.status in ("recorded", "direct") and s.charged == 1,
    "release": lambda s: s.status in ("released", "noop") and s.charged == 0,
    "set_budget": lambda b: b.limit == 1000,
    "get_budget": lambda b: b.customer_id == "c",
    "set_rate_limit": lambda b: b.rate_limit is not None and b.rate_limit.units == 1000,
    "set_concurrency_limit": lambda b: b.max_in_flight == 1000,
    "get_usage": lambda u: u.customer.customer_id == "c",
    "events": lambda events: isinstance(events, list) and len(events) > 0,
    "open_task": lambda t: t.exists and t.ceiling == 5,
    "get_task": lambda t: t.task_ref == "t",
    "lease": lambda lease: lease.stats().slices == 0,
    "estimates": lambda e: (e.agent_id, e.customer_id) == ("a", "c"),
}


PREFLIGHT_PARAMS = {
    "agent_id": bad_ids(optional=False),
    "estimated_units": bad_units(optional=False),
    "customer_id": bad_ids(optional=True),  # None is the customer named "default"
    "task_ref": bad_ids(optional=True),
    "task_ceiling": bad_units(optional=True),
    "idempotency_key": bad_ids(optional=True),
    "ttl": bad_seconds(optional=True),
}
GATE_PARAMS = {n: bad for n, bad in PREFLIGHT_PARAMS.items() if n != "idempotency_key"}
bad_periods = st.one_of(
    st.text(max_size=8).filter(lambda s: s not in ("hour", "day", "week", "month")),
    st.sampled_from(["Hour", "daily", "year", "minute", " day"]),
    not_str,
)
bad_zones = st.one_of(
    st.just(""),
    st.text(min_size=65, max_size=80),
    st.sampled_from(["Mars/Olympus", "UTC+1", "utc ", "../etc/passwd", "Europe/"]),
    not_str,
    st.none(),
)
bad_thresholds = st.one_of(
    st.integers(),
    st.text(max_size=5),
    st.sets(st.integers(1, 100), min_size=1, max_size=3),
    st.lists(st.one_of(st.integers(max_value=0), st.integers(min_value=1001), not_int), min_size=1),
    st.lists(st.integers(1, 1000), min_size=21, max_size=25),
)
bad_since = st.one_of(
    st.text(max_size=10).filter(lambda s: re.fullmatch(r"\d{1,20}-\d{1,20}", s) is None),
    st.sampled_from(["0", "-", "1-", "-1", "1-1-1", "1.5-0", "123456789012345678901-0", "$"]),
    not_str,
)

PARAMS: list[Param] = [
    *(Param("preflight", n, bad) for n, bad in PREFLIGHT_PARAMS.items()),
    *(Param("gate", n, bad) for n, bad in GATE_PARAMS.items()),
    *(Param("run", n, bad) for n, bad in GATE_PARAMS.items()),
    Param("record", "agent_id", bad_ids(optional=False)),
    Param("record", "units", bad_units(optional=False)),
    Param("record", "customer_id", bad_ids(optional=True)),
    Param("record", "reservation_id", bad_reservation_ids),
    Param("record", "task_ref", bad_ids(optional=True)),
    Param("record", "success", bad_bools),
    Param("record", "idempotency_key", bad_ids(optional=True)),
    Param("record", "metadata", bad_metadata),
    Param("release", "reservation_id", bad_reservation_ids),
    Param("release", "idempotency_key", bad_ids(optional=True)),
    Param("release", "customer_id", bad_ids(optional=True)),
    Param("set_budget", "customer_id", bad_ids(optional=True)),
    Param("set_budget", "limit", bad_units(optional=True)),
    Param("set_budget", "period", bad_periods),
    Param("set_budget", "tz", bad_zones),
    Param("set_budget", "agent_id", bad_ids(optional=True)),
    Param("set_budget", "thresholds", bad_thresholds),
    Param("get_budget", "customer_id", bad_ids(optional=True)),
    Param("get_budget", "agent_id", bad_ids(optional=True)),
    Param("set_rate_limit", "customer_id", bad_ids(optional=True)),
    Param("set_rate_limit", "units", bad_ints(1, MAX_UNITS)),
    Param("set_rate_limit", "per_seconds", bad_seconds(optional=False)),  # units need one
    Param("set_rate_limit", "burst", bad_ints(1, MAX_UNITS)),
    Param("set_rate_limit", "agent_id", bad_ids(optional=True)),
    Param("set_concurrency_limit", "customer_id", bad_ids(optional=True)),
    Param("set_concurrency_limit", "max_in_flight", bad_units(optional=True)),
    Param("set_concurrency_limit", "agent_id", bad_ids(optional=True)),
    Param("get_usage", "customer_id", bad_ids(optional=True)),
    Param("events", "customer_id", bad_ids(optional=True)),
    Param("events", "since", bad_since),
    Param("events", "limit", bad_ints(1, 1_000_000)),
    Param("get_usage", "limit", st.one_of(bad_ints(1, 10_000), st.none())),
    Param("open_task", "task_ref", bad_ids(optional=False)),
    Param("open_task", "ceiling", bad_units(optional=True)),
    Param("open_task", "customer_id", bad_ids(optional=True)),
    Param("get_task", "task_ref", bad_ids(optional=False)),
    Param("get_task", "customer_id", bad_ids(optional=True)),
    Param("lease", "agent_id", bad_ids(optional=False)),
    Param("lease", "customer_id", bad_ids(optional=True)),
    Param("lease", "slice_units", bad_ints(1, MAX_UNITS) | st.none()),
    Param("lease", "task_ref", bad_ids(optional=True)),
    Param("lease", "ttl", bad_seconds(optional=False)),
    Param("estimates", "agent_id", bad_ids(optional=False)),
    Param("estimates", "customer_id", bad_ids(optional=True)),
    Param("estimates", "model", st.one_of(st.sampled_from(["", " ", "\t"]), not_str)),
]

# Gaps these properties found (now fixed), each a regression test below.
ONCE_UNCHECKED = {
    "gate.units": bad_units(optional=True),
    "run.charge_estimate": bad_bools,
}

FUZZ = settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture
def client(both_clients: AgentBillClient) -> AgentBillClient:
    return both_clients


def _refused_without_writing(
    call: Callable[[], object], field: str, raw: redis.Redis, namespace: str
) -> None:
    before = namespace_keys(raw, namespace)
    with pytest.raises(InvalidRequestError) as info:
        call()
    assert _names(info.value.field, field), str(info.value)
    assert str(info.value).startswith(f"{info.value.field}: ")
    assert namespace_keys(raw, namespace) == before


def _names(got: str, field: str) -> bool:
    """``field``, or a place inside it: ``thresholds.0``, ``metadata.<key>.[key]``."""
    return got == field or got.startswith((f"{field}.", f"{field}["))


# -- the properties ----------------------------------------------------------------------------


@pytest.mark.parametrize("param", PARAMS, ids=lambda p: p.id)
def test_a_bad_value_names_its_parameter_and_writes_nothing(
    client: AgentBillClient,
    raw: redis.Redis,
    namespace: str,
    param: Param,
) -> None:
    client.preflight("a", 1, "c", task_ref="t", idempotency_key="k")  # data to keep unchanged

    @FUZZ
    @given(value=param.bad)
    def bad_then_valid(value: object) -> None:
        _refused_without_writing(lambda: param.call(client, value), param.name, raw, namespace)
        result = _valid_call(client, param.method)
        assert WORKED[param.method](result), (param.method, result)

    bad_then_valid()


@pytest.mark.parametrize("name", list(PREFLIGHT_PARAMS))
def test_a_bad_item_of_preflight_many_names_its_index_and_field(
    client: AgentBillClient, raw: redis.Redis, namespace: str, name: str
) -> None:
    client.preflight("a", 1, "c")
    good = {"agent_id": "a", "estimated_units": 1, "customer_id": "c"}

    @FUZZ
    @given(value=PREFLIGHT_PARAMS[name], size=st.integers(1, 4), data=st.data())
    def bad_then_valid(value: object, size: int, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, size - 1))
        items = [Preflight(**good) for _ in range(size)]  # type: ignore[arg-type]
        items[index] = Preflight(**{**good, name: value})  # type: ignore[arg-type]
        _refused_without_writing(
            lambda: client.preflight_many(items), f"requests[{index}].{name}", raw, namespace
        )
        checks = client.preflight_many([Preflight(**good)])  # type: ignore[arg-type]
        assert [c.approved for c in checks] == [True]

    bad_then_valid()


@FUZZ
@given(
    requests=st.one_of(
        st.integers(), st.floats(), st.text(), st.binary(), st.none(), st.booleans()
    ),
)
def test_preflight_many_wants_an_iterable_of_preflights(
    client: AgentBillClient, raw: redis.Redis, namespace: str, requests: object
) -> None:
    _refused_without_writing(
        lambda: client.preflight_many(requests),  # type: ignore[arg-type]
        "requests",
        raw,
        namespace,
    )


@FUZZ
@given(item=st.one_of(not_str, st.text(), st.none(), st.tuples(st.just("a"), st.just(1))))
def test_preflight_many_items_must_be_preflights(
    client: AgentBillClient, raw: redis.Redis, namespace: str, item: object
) -> None:
    items = [Preflight("a", 1, "c"), item]
    _refused_without_writing(
        lambda: client.preflight_many(items),  # type: ignore[arg-type]
        "requests[1]",
        raw,
        namespace,
    )


@FUZZ
@given(units=bad_units(optional=False))
def test_check_record_names_units(
    client: AgentBillClient, raw: redis.Redis, namespace: str, units: object
) -> None:
    check = client.preflight("a", 1, "c")
    _refused_without_writing(lambda: check.record(units), "units", raw, namespace)  # type: ignore[arg-type]
    assert check.record(1).status == "recorded"


# -- the constructor ---------------------------------------------------------------------------

SETTINGS: dict[str, st.SearchStrategy[object]] = {
    "api_key": st.one_of(
        not_str,
        # claims to be a tenant key (agb_ and a dot) but is not a well-formed one
        st.builds(lambda a, b: f"agb_{a}.{b}", st.text(max_size=6), st.text(max_size=6)),
    ),
    "ceiling": bad_units(optional=True),
    "redis_url": st.one_of(st.just(""), not_str),
    "namespace": bad_ids(optional=False),
    "reservation_ttl": bad_seconds(optional=False),
    "idempotency_ttl": bad_seconds(optional=False),
    "outcome_retention": bad_seconds(optional=False),
    "task_retention": bad_seconds(optional=False),
    "idle_retention": bad_seconds(optional=False),
    "reap_limit": bad_ints(1, 10_000),
    "connect_timeout": bad_timeouts,
    "socket_timeout": bad_timeouts,
    "retry_attempts": bad_ints(1, 10),
    "retry_deadline": bad_timeouts,
    "max_connections": bad_ints(1, 10_000),
    "on_outage": st.one_of(
        st.text(max_size=12).filter(lambda s: s not in ("fail_closed", "fail_open", "allowance")),
        not_str,
        st.none(),
    ),
    "outage_allowance": bad_units(optional=True),
    "durability": st.one_of(
        st.text(max_size=12).filter(lambda s: s not in ("primary", "replicated")),
        not_str,
        st.none(),
    ),
    "durability_replicas": bad_ints(1, 100),
    "ledger_max_len": bad_ints(1, 100_000_000),
    "on_threshold": st.one_of(not_str, st.text(max_size=5)),  # not callable
    "background_settle": bad_bools,
    "metrics": st.one_of(st.text(max_size=5), st.integers(), st.none()),  # a bool or a registry
    "metrics_customers": bad_bools,
    "trace_customers": bad_bools,
}
# Arguments the setting needs beside it to be about that setting alone, and a valid value.
SETTING_CONTEXT: dict[str, dict[str, object]] = {
    "outage_allowance": {"on_outage": "allowance"},
    "durability_replicas": {"durability": "replicated"},
}
VALID_SETTING: dict[str, object] = {"outage_allowance": 5}


@pytest.fixture(params=["sync", "async"])
def client_class(request: pytest.FixtureRequest) -> type[AgentBillClient]:
    return AgentBillClient if request.param == "sync" else cast(Any, AsyncAgentBillClient)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_a_bad_setting_names_itself(
    redis_server: RedisServer, client_class: type[AgentBillClient], name: str
) -> None:
    base: dict[str, object] = {"redis_url": redis_server.url, **SETTING_CONTEXT.get(name, {})}

    @FUZZ
    @given(value=SETTINGS[name])
    def bad_then_valid(value: object) -> None:
        with pytest.raises(InvalidRequestError) as info:
            client_class(**{**base, name: value})  # type: ignore[arg-type]
        assert _names(info.value.field, name), str(info.value)
        valid = {name: VALID_SETTING[name]} if name in VALID_SETTING else {}
        _close(client_class(**base, **valid))  # type: ignore[arg-type]

    bad_then_valid()


def _close(client: object) -> None:
    outcome = client.close()  # type: ignore[attr-defined]
    if inspect.isawaitable(outcome):
        asyncio.run(cast(Any, outcome))


# -- every public input is in the table --------------------------------------------------------

# Public parameters with no bad value to give: callables, whole objects, or nothing to validate.
NOT_FUZZED = {
    "__init__.redis",  # a ready client object (see test_a_foreign_redis_object_is_invalid)
    "gate.units",  # an int, a callable of the result, or None (see ONCE_UNCHECKED)
    "run.charge_estimate",  # see ONCE_UNCHECKED
    "preflight_many.requests",  # test_preflight_many_* above
    # With an int estimate any bound is refused; with "learned", fuzzed in tests/test_learned.py
    "gate.bound",
    "run.bound",
    # wrap() needs an SDK client to wrap: its arguments are checked, each with bad values,
    # in tests/test_llm.py (test_wrap_checks_its_arguments_and_writes_nothing); its ids go
    # through the same validation as gate's, fuzzed above.
    *(
        f"wrap.{name}"
        for name in (
            "llm_client",
            "agent_id",
            "customer_id",
            "task_ref",
            "task_ceiling",
            "unit",
            "estimate",
            "prices",
            "default_max_output_tokens",
        )
    ),
}


def _public_parameters(cls: type) -> Iterator[str]:
    for name, member in inspect.getmembers(cls):
        if (name.startswith("_") and name != "__init__") or not callable(member):
            continue
        for p in list(inspect.signature(member).parameters)[1:]:
            yield f"{name}.{p}"


def test_every_public_input_is_fuzzed() -> None:
    covered = {p.id for p in PARAMS} | {f"__init__.{name}" for name in SETTINGS} | NOT_FUZZED
    for cls in (AgentBillClient, AsyncAgentBillClient):
        missing = sorted(set(_public_parameters(cls)) - covered)
        assert not missing, (
            f"{cls.__name__}: no bad-value property for {missing}; add them to PARAMS or "
            "SETTINGS here (or to NOT_FUZZED, saying why)"
        )


# -- gaps found, now fixed ---------------------------------------------------------------


@FUZZ
@given(units=ONCE_UNCHECKED["gate.units"])
def test_gate_validates_units_when_decorating(client: AgentBillClient, units: object) -> None:
    """The docstring: "Bad arguments raise InvalidRequestError when decorating." A bad int
    ``units`` was once found only after the body ran (the estimate charged, then the error)."""
    with pytest.raises(InvalidRequestError) as info:
        client.gate("a", 1, "c", units=units)  # type: ignore[arg-type]
    assert info.value.field == "units"


@FUZZ
@given(flag=ONCE_UNCHECKED["run.charge_estimate"])
def test_run_validates_charge_estimate(client: AgentBillClient, flag: object) -> None:
    """``charge_estimate="no"`` is truthy: unchecked, a block left without a record would
    charge the estimate. It is strict, like record(success=...)."""
    with pytest.raises(InvalidRequestError) as info:
        client.run("a", 1, "c", charge_estimate=flag)  # type: ignore[arg-type]
    assert info.value.field == "charge_estimate"


@pytest.mark.parametrize(
    "url", ["localhost:6379", "http://localhost", "redis//x"], ids=["no-scheme", "http", "typo"]
)
def test_an_unusable_redis_url_names_redis_url(
    client_class: type[AgentBillClient], url: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        client_class(redis_url=url)
    assert info.value.field == "redis_url"


@pytest.mark.parametrize("value", ["redis://localhost", 42, object()], ids=["url", "int", "object"])
def test_a_foreign_redis_object_is_invalid(
    client_class: type[AgentBillClient], value: object
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        client_class(redis=value)  # type: ignore[arg-type]
    assert info.value.field == "redis"


class _Connected(Exception):
    """Raised instead of connecting: the constructor got as far as the connection."""


def test_a_bad_on_threshold_is_refused_before_connecting(
    monkeypatch: pytest.MonkeyPatch, client_class: type[AgentBillClient]
) -> None:
    """Every setting is checked before the client connects: a non-callable ``on_threshold``
    once started the embedded local server (or built a connection pool) before its error."""

    def connect(settings: object) -> object:
        raise _Connected

    module = "agentbill._client" if client_class is AgentBillClient else "agentbill._async_client"
    monkeypatch.setattr(f"{module}._connect", connect)
    with pytest.raises(InvalidRequestError) as info:
        client_class(on_threshold=5)  # type: ignore[arg-type]
    assert info.value.field == "on_threshold"
