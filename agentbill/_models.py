"""Pydantic models for what users hand in: client settings and each operation's arguments.

Validation happens here, once, at the boundary; everything past it passes plain ints and strs.
A :class:`pydantic.ValidationError` never escapes: :func:`validate` turns it into an
:class:`~agentbill.InvalidRequestError` naming the offending field.
"""

from __future__ import annotations

import json
import unicodedata
from typing import Annotated, Any, Literal, NamedTuple, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    Strict,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from agentbill._exceptions import InvalidRequestError

# Lua numbers are doubles: integers are exact up to 2**53 - 1.
MAX_UNITS = 2**53 - 1
MAX_ID_LENGTH = 256
# A TTL up to ~68 years in seconds still fits comfortably in a double of milliseconds.
MAX_TTL_SECONDS = 2**31 - 1
MAX_METADATA_BYTES = 4096
# durability_replicas: more than any primary has; a number past Redis's range would fail at the
# first write, not here.
MAX_REPLICAS = 100


# Characters an id may not hold: control characters (the scripts' field separator among them),
# line and paragraph separators, and lone surrogates (not text).
FORBIDDEN_CATEGORIES = frozenset({"Cc", "Zl", "Zp", "Cs"})
# Characters that show nothing: an id made only of these (" ", "\u200b") names nothing a person
# could read back.
INVISIBLE_CATEGORIES = frozenset({"Zs", "Cf", "Mn", "Me"})


def _printable_id(value: str) -> str:
    visible = False
    for ch in value:
        category = unicodedata.category(ch)
        if category in FORBIDDEN_CATEGORIES:
            raise ValueError(f"must not contain control or line-separator characters ({ch!r})")
        visible = visible or category not in INVISIBLE_CATEGORIES
    if not visible:
        raise ValueError("must contain a visible character")
    return value


Id = Annotated[
    str,
    Strict(),
    StringConstraints(min_length=1, max_length=MAX_ID_LENGTH),
    AfterValidator(_printable_id),
]
"""Any id: a str of 1 to 256 characters, at least one of them visible, with no control or
line-separator character."""

Units = Annotated[int, Strict(), Field(ge=0, le=MAX_UNITS)]
"""Units: an int (not a bool or float) from 0 to 2**53 - 1."""

Seconds = Annotated[int, Strict(), Field(ge=1, le=MAX_TTL_SECONDS)]
"""A TTL in whole seconds, at least 1."""

Timeout = Annotated[float, Field(gt=0, le=300, allow_inf_nan=False)]


def _json_metadata(value: dict[str, Any]) -> dict[str, Any]:
    try:
        encoded = json.dumps(value, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"must be JSON-serialisable without NaN or infinity ({exc})") from None
    if len(encoded.encode()) > MAX_METADATA_BYTES:
        raise ValueError(f"must encode to at most {MAX_METADATA_BYTES} bytes of JSON")
    return value


Metadata = Annotated[dict[str, Any], AfterValidator(_json_metadata)]


class _Request(BaseModel):
    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")


class ClientSettings(_Request):
    """Everything ``AgentBillClient(...)`` accepts besides a ready-made redis client."""

    api_key: SecretStr | None = None
    ceiling: Units | None = None
    redis_url: Annotated[str, Strict(), StringConstraints(min_length=1)] | None = None
    namespace: Id = "agentbill"
    reservation_ttl: Seconds = 3600
    idempotency_ttl: Seconds = 24 * 3600
    outcome_retention: Seconds = 24 * 3600
    task_retention: Seconds = 30 * 24 * 3600
    idle_retention: Seconds = 90 * 24 * 3600
    reap_limit: Annotated[int, Strict(), Field(ge=1, le=10_000)] = 100
    connect_timeout: Timeout = 0.5
    socket_timeout: Timeout = 1.0
    retry_attempts: Annotated[int, Strict(), Field(ge=1, le=10)] = 3
    retry_deadline: Timeout = 1.0
    max_connections: Annotated[int, Strict(), Field(ge=1, le=10_000)] = 50
    on_outage: Literal["fail_closed", "fail_open", "allowance"] = "fail_closed"
    outage_allowance: Units | None = Field(default=None, validate_default=True)
    ledger_max_len: Annotated[int, Strict(), Field(ge=1, le=100_000_000)] = 100_000
    background_settle: Annotated[bool, Strict()] = False
    durability: Literal["primary", "replicated"] = "primary"
    durability_replicas: Annotated[int, Strict(), Field(ge=1, le=MAX_REPLICAS)] = 1

    @field_validator("outcome_retention")
    @classmethod
    def _outcomes_outlive_keys(cls, value: int, info: ValidationInfo) -> int:
        # A preflight key replays its approval while remembered; whether that approval was
        # released (so the key must reserve afresh) is known only while its outcome is.
        if value < info.data.get("idempotency_ttl", 0):
            raise ValueError("must be at least idempotency_ttl")
        return value

    @field_validator("idle_retention")
    @classmethod
    def _customers_outlive_their_parts(cls, value: int, info: ValidationInfo) -> int:
        # A customer's keys expire after idle_retention; outcomes and tasks must not outlive
        # the keys that hold them.
        for part in ("outcome_retention", "task_retention"):
            if value < info.data.get(part, 0):
                raise ValueError(f"must be at least {part}")
        return value

    @field_validator("durability_replicas")
    @classmethod
    def _replicas_go_with_replicated(cls, value: int, info: ValidationInfo) -> int:
        # Under durability="primary" nothing waits: another count would promise what no call
        # does.
        if value != 1 and info.data.get("durability") == "primary":
            raise ValueError("is only used with durability='replicated'")
        return value

    @field_validator("outage_allowance")
    @classmethod
    def _allowance_goes_with_its_mode(cls, value: int | None, info: ValidationInfo) -> int | None:
        mode = info.data.get("on_outage")
        if mode == "allowance" and value is None:
            raise ValueError("is required with on_outage='allowance' (units per process)")
        if mode != "allowance" and value is not None:
            raise ValueError("is only used with on_outage='allowance'")
        return value


class PreflightRequest(_Request):
    agent_id: Id
    estimated_units: Units
    customer_id: Id
    task_ref: Id | None = None
    task_ceiling: Units | None = None
    idempotency_key: Id | None = None
    ttl: Seconds | None = None


class Preflight(NamedTuple):
    """One decision of ``preflight_many``: the arguments of one ``preflight`` call."""

    agent_id: str
    estimated_units: int
    customer_id: str | None = None
    task_ref: str | None = None
    task_ceiling: int | None = None
    idempotency_key: str | None = None
    ttl: int | None = None


class RecordRequest(_Request):
    agent_id: Id
    units: Units
    customer_id: Id | None = None
    reservation_id: Id | None = None
    task_ref: Id | None = None
    success: Annotated[bool, Strict()] = True
    idempotency_key: Id | None = None
    metadata: Metadata | None = None


class ReleaseRequest(_Request):
    """A reservation named by its id, or by the idempotency key of the preflight that made it."""

    reservation_id: Id | None = None
    idempotency_key: Id | None = None
    customer_id: Id | None = None


def _time_zone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            "is not an IANA time zone name (such as 'UTC' or 'Europe/Berlin')"
        ) from None
    return value


TimeZone = Annotated[
    str, Strict(), StringConstraints(min_length=1, max_length=64), AfterValidator(_time_zone)
]
Percent = Annotated[int, Strict(), Field(ge=1, le=1000)]


class BudgetRequest(_Request):
    customer_id: Id
    limit: Units | None = None
    period: Literal["hour", "day", "week", "month"] | None = None
    tz: TimeZone = "UTC"
    agent_id: Id | None = None
    thresholds: tuple[Percent, ...] = Field(default=(), max_length=20)


class RateLimitRequest(_Request):
    customer_id: Id
    units: Annotated[int, Strict(), Field(ge=1, le=MAX_UNITS)] | None
    per_seconds: Seconds | None
    burst: Annotated[int, Strict(), Field(ge=1, le=MAX_UNITS)] | None = None
    agent_id: Id | None = None

    @field_validator("per_seconds")
    @classmethod
    def _window_goes_with_units(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is None and info.data.get("units") is not None:
            raise ValueError("is required with units")
        return value


class ConcurrencyRequest(_Request):
    customer_id: Id
    max_in_flight: Annotated[int, Strict(), Field(ge=0, le=MAX_UNITS)] | None
    agent_id: Id | None = None


class LeaseRequest(_Request):
    agent_id: Id
    customer_id: Id | None = None
    slice_units: Annotated[int, Strict(), Field(ge=1, le=MAX_UNITS)]
    task_ref: Id | None = None
    ttl: Seconds


class ScopeRef(_Request):
    customer_id: Id
    agent_id: Id | None = None


def _stream_id(value: str) -> str:
    parts = [int(part) for part in value.split("-")]
    if any(part >= 2**64 for part in parts):
        raise ValueError("is not a stream id: each part must be below 2**64")
    if parts == [2**64 - 1, 2**64 - 1]:
        raise ValueError("is the largest stream id: no event can follow it")
    return value


StreamId = Annotated[
    str,
    Strict(),
    StringConstraints(pattern=r"^\d{1,20}-\d{1,20}$"),
    AfterValidator(_stream_id),  # 20 digits can exceed Redis's uint64: refused here, by name
]


class EventsRequest(_Request):
    customer_id: Id
    since: StreamId | None = None
    limit: Annotated[int, Strict(), Field(ge=1, le=1_000_000)] | None = None


class TaskRequest(_Request):
    task_ref: Id
    customer_id: Id
    ceiling: Units | None = None


class CustomerRef(_Request):
    customer_id: Id


class UsageRequest(_Request):
    customer_id: Id
    limit: Annotated[int, Strict(), Field(ge=1, le=10_000)] = 100


M = TypeVar("M", bound=BaseModel)


def validate(model: type[M], **values: object) -> M:
    """Build ``model`` from ``values`` or raise InvalidRequestError naming the first bad field."""
    try:
        return model(**values)
    except ValidationError as exc:
        raise _invalid(exc) from None


def _invalid(exc: ValidationError) -> InvalidRequestError:
    err = exc.errors(include_url=False, include_input=False)[0]
    field = ".".join(str(part) for part in err["loc"]) or "request"
    message = err["msg"]
    # Name the offending value's type for wrong-type errors, never the value itself:
    # ids and keys may be secrets (an api_key, say) and must stay out of messages and logs.
    return InvalidRequestError(field, message)


class _UnitsValue(_Request):
    units: Units


def validate_units(field: str, value: object) -> int:
    """``value`` as units, or InvalidRequestError naming ``field``."""
    try:
        return _UnitsValue(units=value).units  # type: ignore[arg-type]
    except ValidationError as exc:
        err = _invalid(exc)
        raise InvalidRequestError(field, err.message) from None
