"""This project's name on PyPI, and the command that installs it: every "install this" hint in
the package says it from here.

The import name is ``agentbill``, but on PyPI ``agentbill`` is another project (an OpenTelemetry
SDK), and so is ``agentbill-sdk``: a hint naming the bare ``agentbill`` with an extra would install
the wrong package (README: Package names). ``tests/test_install_hints.py`` checks that this is
pyproject.toml's name and that no stale hint is left anywhere.
"""

from __future__ import annotations

DISTRIBUTION = "agentbill-redis"
"""The distribution name (pyproject.toml's ``name``; the npm package has the same)."""


def pip_install(extra: str | None = None) -> str:
    """``pip install agentbill-redis``, or with ``extra``: ``pip install 'agentbill-redis[x]'``."""
    if extra is None:
        return f"pip install {DISTRIBUTION}"
    return f"pip install '{DISTRIBUTION}[{extra}]'"
