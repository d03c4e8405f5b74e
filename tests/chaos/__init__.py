"""The chaos suite: real processes, real redis-server processes, and faults injected on purpose.

Each scenario asserts the invariants agentbill promises (no overspend, nothing lost, nothing
charged twice) and records what it measured; a full run rewrites RELIABILITY.md from them.
"""
