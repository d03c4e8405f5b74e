"""The chaos suite's fixtures: its sizes, its report, and the hook that writes RELIABILITY.md."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos import _report
from tests.chaos._sizes import Sizes

REPORT = pytest.StashKey[_report.Report]()


@pytest.fixture(scope="session")
def chaos_report(request: pytest.FixtureRequest) -> _report.Report:
    """The session's collector; every scenario records its figures here once it has passed."""
    stash = request.config.stash
    if REPORT not in stash:
        stash[REPORT] = _report.Report(Sizes.from_env())
    return stash[REPORT]


@pytest.fixture(scope="session")
def sizes(chaos_report: _report.Report) -> Sizes:
    return chaos_report.sizes


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory for the workers' journals, of this test alone.

    Not pytest's tmp_path: on a machine shared with other test sessions, their clean-up of old
    base directories may delete it while the scenario runs. ``AGENTBILL_CHAOS_KEEP=1`` keeps it.
    """
    path = Path(tempfile.mkdtemp(prefix="ab-chaos-"))
    yield path
    if not os.environ.get("AGENTBILL_CHAOS_KEEP"):
        shutil.rmtree(path, ignore_errors=True)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Rewrite RELIABILITY.md, but only from a run in which every scenario passed."""
    report = session.config.stash.get(REPORT, None)
    path = _report.target()
    if report is not None and report.complete() and path is not None:
        _report.write(report, path)
