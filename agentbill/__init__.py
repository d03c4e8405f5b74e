"""agentbill: pre-flight budget enforcement for AI agent runs.

Every worker runs the same atomic Lua functions in one shared Redis: a run is checked against the
ceilings and its estimate reserved before it starts, and its actual units recorded after.
"""

from agentbill._async_client import AsyncAgentBillClient
from agentbill._check import BaseCheck, ThresholdCrossing
from agentbill._client import AgentBillClient
from agentbill._exceptions import (
    AgentBillError,
    AuthenticationError,
    BudgetExhaustedError,
    CeilingExceededError,
    ConcurrencyLimitedError,
    InvalidRequestError,
    LibraryNotLoadedError,
    NodesUnreachableError,
    RateLimitedError,
    RunBlockedError,
    StoreBusyError,
    StoreError,
    StoreUnavailableError,
    TaskCeilingExceededError,
)
from agentbill._key_admin import IssuedKey, KeyAdmin, KeyInfo, LoadedLibrary, RevokedKey
from agentbill._lease import AsyncLease, Lease, LeaseCheck, LeaseStats
from agentbill._models import Preflight
from agentbill._outage import OutageStats
from agentbill._results import (
    AsyncCheck,
    BudgetStatus,
    Check,
    Estimates,
    Event,
    RateLimit,
    Settlement,
    TaskStatus,
    Usage,
)
from agentbill._version import __version__

__all__ = [
    "AgentBillClient",
    "AgentBillError",
    "AsyncAgentBillClient",
    "AsyncCheck",
    "AsyncLease",
    "AuthenticationError",
    "BaseCheck",
    "BudgetExhaustedError",
    "BudgetStatus",
    "CeilingExceededError",
    "Check",
    "ConcurrencyLimitedError",
    "Estimates",
    "Event",
    "InvalidRequestError",
    "IssuedKey",
    "KeyAdmin",
    "KeyInfo",
    "Lease",
    "LeaseCheck",
    "LeaseStats",
    "LibraryNotLoadedError",
    "LoadedLibrary",
    "NodesUnreachableError",
    "OutageStats",
    "Preflight",
    "RateLimit",
    "RateLimitedError",
    "RevokedKey",
    "RunBlockedError",
    "Settlement",
    "StoreBusyError",
    "StoreError",
    "StoreUnavailableError",
    "TaskCeilingExceededError",
    "TaskStatus",
    "ThresholdCrossing",
    "Usage",
    "__version__",
]
