"""The package version, on the ground floor: modules inside agentbill read it from here, never
from ``agentbill`` itself (whose ``__init__`` imports them)."""

__version__ = "0.1.0"
