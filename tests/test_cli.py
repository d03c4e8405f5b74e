"""The ``agentbill`` command line: budgets, limits, usage, events, errors and help.

Fast cases go through typer's runner (the same ``main`` as the console script); the rest run
``python -m agentbill`` (or the console script) as a subprocess against the suite's server.
"""

from __future__ import annotations

import csv
import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import types
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO

import pytest
import redis
import typer

from agentbill import AgentBillClient
from agentbill.cli._main import app
from tests._cli import AGENTBILL, Ran, cli_env, invoke, run
from tests._servers import AclRedisServer, RedisServer, free_port
from tests.conftest import namespace_keys


@pytest.fixture
def env(redis_server: RedisServer, namespace: str) -> dict[str, str]:
    return cli_env(redis_server.url, namespace)


def one_error_line(ran: Ran) -> str:
    """The command failed with exactly one line on stderr, and no traceback."""
    assert "Traceback" not in ran.stderr + ran.stdout
    assert len(ran.error_lines) == 1, ran.stderr
    line = ran.error_lines[0]
    assert line.startswith("agentbill: error: ")
    return line


# -- budgets, limits, usage ----------------------------------------------------------------------


def test_budget_set_and_get_agree_with_the_library(
    env: dict[str, str], client: AgentBillClient
) -> None:
    ran = invoke(
        "budget", "set", "cust 1", "1000", "--period", "month", "--tz", "Europe/Paris",
        "--threshold", "80", "--threshold", "50", "--json", env=env,
    )  # fmt: skip
    assert ran.code == 0, ran.stderr
    shown = json.loads(ran.stdout)
    status = client.get_budget("cust 1")
    assert shown["limit"] == status.limit == 1000
    assert shown["period"] == status.period == "month"
    assert shown["thresholds"] == list(status.thresholds) == [50, 80]
    assert shown["period_end"] == status.period_end.isoformat()  # type: ignore[union-attr]

    invoke("budget", "set", "cust 1", "200", "--agent", "summariser", env=env)
    assert client.get_budget("cust 1", agent_id="summariser").limit == 200

    client.preflight("summariser", 30, "cust 1").record(12)
    got = invoke("budget", "get", "cust 1", "--agent", "summariser", "--json", env=env)
    assert got.code == 0
    assert json.loads(got.stdout) | {"resets_in": None} == {
        "customer_id": "cust 1",
        "agent_id": "summariser",
        "limit": 200,
        "spent": 12,
        "reserved": 0,
        "remaining": 188,
        "open_reservations": 0,
        "period": "month",
        "period_start": json.loads(got.stdout)["period_start"],
        "period_end": json.loads(got.stdout)["period_end"],
        "resets_in": None,
        "thresholds": [],
        "rate_limit": None,
        "max_in_flight": None,
    }
    table = invoke("budget", "get", "cust 1", env=env)
    assert table.code == 0
    assert "1,000" in table.stdout
    assert "80%" in table.stdout

    unlimited = invoke("budget", "set", "cust 1", "none", "--json", env=env)
    assert json.loads(unlimited.stdout)["limit"] is None
    assert client.get_budget("cust 1").limit is None


def test_limits_are_set_and_removed(env: dict[str, str], client: AgentBillClient) -> None:
    rate = invoke("limit", "rate", "c", "600", "60", "--burst", "100", "--json", env=env)
    assert rate.code == 0, rate.stderr
    assert json.loads(rate.stdout)["rate_limit"] == {"units": 600, "per_seconds": 60, "burst": 100}
    assert invoke("limit", "concurrency", "c", "3", "--agent", "a", env=env).code == 0
    assert client.get_budget("c", agent_id="a").max_in_flight == 3

    assert invoke("limit", "rate", "c", "--remove", env=env).code == 0
    assert invoke("limit", "concurrency", "c", "--agent", "a", "--remove", env=env).code == 0
    assert client.get_budget("c").rate_limit is None
    assert client.get_budget("c", agent_id="a").max_in_flight is None


def test_usage_shows_the_customer_and_every_agent(
    env: dict[str, str], client: AgentBillClient
) -> None:
    client.set_budget("u", 100)
    client.preflight("writer", 10, "u").record(4)
    held = client.preflight("reader", 7, "u")
    assert held.approved

    ran = invoke("usage", "u", "--json", env=env)
    assert ran.code == 0
    usage = json.loads(ran.stdout)
    assert (usage["customer"]["spent"], usage["customer"]["reserved"]) == (4, 7)
    assert usage["customer"]["open_reservations"] == 1
    assert [(a["agent_id"], a["spent"], a["reserved"]) for a in usage["agents"]] == [
        ("reader", 0, 7),
        ("writer", 4, 0),
    ]

    table = invoke("usage", "u", env=env).stdout.splitlines()
    assert table[0].split() == [
        "SCOPE", "LIMIT", "SPENT", "RESERVED", "REMAINING", "IN", "FLIGHT", "PERIOD", "END",
    ]  # fmt: skip
    assert table[1].split()[:6] == ["u", "100", "4", "7", "89", "1"]
    assert table[2].split()[:5] == ["agent", "reader", "unlimited", "0", "7"]


# -- events --------------------------------------------------------------------------------------


def test_tables_in_a_pipe_cut_nothing(env: dict[str, str], client: AgentBillClient) -> None:
    """A table printed to a pipe (a log, a file) takes the width it needs: no id and no number
    is cut short, as a terminal's width would."""
    agent, top = "a" * 200, 2**53 - 1
    client.set_budget("big", top)
    client.preflight(agent, 2**52, "big").record(2**52)
    usage = invoke("usage", "big", env=env)
    assert usage.code == 0
    assert "…" not in usage.stdout
    assert f"agent {agent}" in usage.stdout
    assert f"{top:,}" in usage.stdout
    assert f"{top - 2**52:,}" in usage.stdout
    budget = invoke("budget", "get", "big", "--agent", agent, env=env)
    assert "…" not in budget.stdout
    assert agent in budget.stdout


def test_events_in_json_csv_and_text(env: dict[str, str], client: AgentBillClient) -> None:
    client.set_budget("e", 10)
    client.preflight("a", 6, "e", task_ref="t1").record(5)
    client.preflight("a", 20, "e")
    events = client.events("e")

    lines = invoke("events", "e", "--json", env=env).stdout.splitlines()
    parsed = [json.loads(line) for line in lines]
    assert [(e["type"], e["units"]) for e in parsed] == [
        ("approved", 6),
        ("recorded", 5),
        ("refused", 20),
    ]
    assert parsed[0] == {
        "id": events[0].id,
        "type": "approved",
        "time": events[0].time.isoformat(),
        "customer_id": "e",
        "agent_id": "a",
        "task_ref": "t1",
        "units": 6,
        "released": 0,
        "reservation_id": events[0].reservation_id,
        "reason": None,
        "scope": None,
        "period": events[0].period,
    }
    assert parsed[2]["reason"] == "budget_exhausted"

    rows = list(csv.DictReader(io.StringIO(invoke("events", "e", "--csv", env=env).stdout)))
    assert [r["type"] for r in rows] == ["approved", "recorded", "refused"]
    assert rows[1]["released"] == "6"
    assert rows[2]["task_ref"] == ""

    after = invoke("events", "e", "--since", events[0].id, "--limit", "1", "--json", env=env)
    assert [json.loads(line)["id"] for line in after.stdout.splitlines()] == [events[1].id]

    text = invoke("events", "e", env=env).stdout.splitlines()
    assert text[0].split()[:3] == ["TIME", "TYPE", "AGENT"]
    assert text[3].split()[2:9] == ["refused", "a", "-", "20", "0", "budget_exhausted", "customer"]


def test_events_pages_through_a_long_ledger(env: dict[str, str], client: AgentBillClient) -> None:
    for _ in range(1100):
        client.preflight("a", 1, "long")  # 1,100 approvals: more than one page of 1,000
    lines = invoke("events", "long", "--json", env=env).stdout.splitlines()
    assert len(lines) == 1100
    assert len({json.loads(line)["id"] for line in lines}) == 1100
    assert len(invoke("events", "long", "--json", "--limit", "1050", env=env).stdout.splitlines())


class Lines:
    """A subprocess's output, line by line, read by a thread (a blocking readline never
    holds the test past its deadline)."""

    def __init__(self, stream: IO[str]) -> None:
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line)

    def next(self, timeout: float = 30) -> str:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line within {timeout} s") from None


def test_events_follow_streams_new_events_until_interrupted(
    env: dict[str, str], client: AgentBillClient
) -> None:
    client.preflight("a", 1, "f")
    with subprocess.Popen(
        [sys.executable, "-m", "agentbill", "events", "f", "--follow", "--json", "--interval",
         "0.1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as proc:  # fmt: skip
        try:
            assert proc.stdout is not None
            assert proc.stderr is not None
            out = Lines(proc.stdout)
            assert json.loads(out.next())["units"] == 1
            client.preflight("a", 2, "f")
            client.preflight("a", 3, "f")
            assert json.loads(out.next())["units"] == 2
            assert json.loads(out.next())["units"] == 3
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 0
            assert proc.stderr.read() == ""
        finally:
            if proc.poll() is None:
                proc.kill()


def test_events_follow_keeps_following_across_a_redis_restart(namespace: str) -> None:
    """Like tail -F: an outage after the stream started is said once on stderr, and the
    stream goes on from where it was when Redis answers again; Ctrl-C still ends it with 0."""
    server = RedisServer().start()
    try:
        env = cli_env(server.url, namespace)
        with AgentBillClient(redis_url=server.url, namespace=namespace) as c:
            c.preflight("a", 1, "f")
        with subprocess.Popen(
            [sys.executable, "-m", "agentbill", "events", "f", "--follow", "--json",
             "--interval", "0.1"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ) as proc:  # fmt: skip
            try:
                assert proc.stdout is not None
                assert proc.stderr is not None
                out, err = Lines(proc.stdout), Lines(proc.stderr)
                assert json.loads(out.next())["units"] == 1
                server.kill()
                assert "Redis is unavailable" in err.next()
                assert proc.poll() is None
                server.start()  # empty: it kept nothing
                with AgentBillClient(redis_url=server.url, namespace=namespace) as c:
                    c.preflight("a", 2, "f")
                assert "again" in err.next()
                assert json.loads(out.next())["units"] == 2
                proc.send_signal(signal.SIGINT)
                assert proc.wait(timeout=30) == 0
                assert "Traceback" not in proc.stderr.read()
            finally:
                if proc.poll() is None:
                    proc.kill()
    finally:
        server.stop()


# -- errors and exit statuses --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("budget", "set", "b", str(2**60)), "limit"),
        (("budget", "set", "b", "-5"), "limit"),
        (("budget", "set", "b", "1__0_"), "LIMIT"),
        (("limit", "rate", "b", "10", "-1"), "per_seconds"),
        (("limit", "rate", "b", "-10", "60"), "units"),
        (("limit", "concurrency", "b", "-1"), "max_in_flight"),
        (("budget", "set", "b", "10", "--tz", "Mars/Olympus"), "tz"),
        (("budget", "set", "b", "ten"), "LIMIT"),
        (("budget", "set", "b", "10", "--period", "year"), "--period"),
        (("budget", "set", "b", "10", "--threshold", "0"), "thresholds"),
        (("budget", "set", "", "10"), "customer_id"),
        (("limit", "rate", "b", "10"), "PER_SECONDS"),
        (("limit", "rate", "b", "10", "60", "--remove"), "--remove"),
        (("limit", "concurrency", "b"), "N"),
        (("events", "b", "--since", "yesterday"), "since"),
        (("events", "b", "--json", "--csv"), "--csv"),
        (("events", "b", "--csv", "--since", "yesterday"), "since"),
        (("events", "b", "--since", f"{2**64}-0"), "since"),  # a stream id is two uint64s
        (("events", "b", "--since", f"{2**64 - 1}-{2**64 - 1}"), "since"),  # nothing after it
        (("events", "b", "--follow", "--limit", "3"), "--limit"),
        (("top", "--json"), "--once"),
        (("top",), "needs a terminal"),
        (("budget", "sett", "b", "10"), "sett"),
        (("budget", "set", "b", "10", "--nope"), "--nope"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    env: dict[str, str], raw: redis.Redis, namespace: str, args: tuple[str, ...], says: str
) -> None:
    ran = invoke(*args, env=env)
    assert ran.code == 2, (ran.stdout, ran.stderr)
    assert says in one_error_line(ran)
    assert ran.stdout == ""  # not even a table's or a CSV's header
    assert namespace_keys(raw, namespace, ledger=True) == {}


def test_bad_input_through_the_console_script(env: dict[str, str]) -> None:
    ran = run("budget", "set", "b", "-1", env=env)
    assert ran.code == 2
    one_error_line(ran)


def test_redis_unavailable_exits_3_with_one_line(env: dict[str, str]) -> None:
    down = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    commands = [
        ("usage", "u"),
        ("budget", "set", "u", "5"),
        ("top", "--once", "-c", "u"),
        ("events", "u", "--csv"),
        ("events", "u"),
    ]
    # All at once: each command's interpreter start-up and retries overlap the others'.
    with ThreadPoolExecutor(len(commands)) as pool:
        done = list(pool.map(lambda args: run(*args, "--redis-url", down, env=env), commands))
    for args, ran in zip(commands, done, strict=True):
        assert ran.code == 3, (args, ran.stderr)
        assert "Redis is unavailable" in one_error_line(ran)
        assert ran.stdout == ""


def test_a_redis_that_never_answers_exits_3_within_the_clients_bound(env: dict[str, str]) -> None:
    server = RedisServer().start()
    try:
        server.pause()  # accepts connections, never answers
        ran = run("usage", "u", "--redis-url", server.url, env=env, timeout=30)
    finally:
        server.resume()
        server.stop()
    assert ran.code == 3
    one_error_line(ran)


def test_a_url_redis_py_cannot_use_is_bad_input(env: dict[str, str]) -> None:
    """redis-py passes a URL's unknown query parameters to its connections, which refuse them
    only when the first call connects: a raw TypeError, exit 1. It is bad input, named."""
    for url in ("redis://127.0.0.1:1/0?nosuch=1", "redis://127.0.0.1:1/0?Password=x"):
        ran = run("usage", "u", "--redis-url", url, env=env)
        assert ran.code == 2, ran.stderr
        line = one_error_line(ran)
        assert "redis_url" in line
        assert "Password=x" not in line


def test_no_password_is_ever_shown(namespace: str, tmp_path: Path) -> None:
    """The places that show where the command is connected (top's header, the exporter's
    first line) hide a password, in the URL's userinfo or in its query string alike."""
    server = AclRedisServer(admin_password="hunter2").start()
    try:
        env = cli_env(None, namespace)
        for url in (
            f"redis://:hunter2@127.0.0.1:{server.port}/0",
            f"redis://default:hunter2@127.0.0.1:{server.port}/0",
            f"redis://127.0.0.1:{server.port}/0?password=hunter2",
            f"redis://127.0.0.1:{server.port}/0?socket_timeout=2&password=hunter2",
        ):
            ran = run("top", "--once", "-c", "x", "--redis-url", url, env=env)
            assert ran.code == 0, ran.stderr
            assert f"127.0.0.1:{server.port}" in ran.stdout
            assert "hunter2" not in ran.stdout + ran.stderr
    finally:
        server.stop()


def test_other_failures_exit_1_with_one_line(
    env: dict[str, str], redis_server: RedisServer, raw: redis.Redis, namespace: str
) -> None:
    user = f"cli-{namespace}"
    raw.acl_setuser(user, enabled=True, passwords=["+right"], commands=["+@all"], keys=["*"])
    try:
        wrong = redis_server.url.replace("//", f"//{user}:wrong@")
        denied = run("usage", "u", "--redis-url", wrong, env=env)
    finally:
        raw.acl_deluser(user)
    assert denied.code == 1
    assert "refused the credentials" in one_error_line(denied)
    assert "wrong" not in denied.stderr


def test_a_tenant_key_in_the_environment_sets_the_namespace(
    redis_server: RedisServer, env: dict[str, str]
) -> None:
    ran = run("usage", "u", env=env | {"AGENTBILL_API_KEY": "agb_bad.key"})
    assert ran.code == 2
    assert "api_key" in one_error_line(ran)
    assert "agb_bad.key" not in ran.stderr


# -- help, the console script, the extra ---------------------------------------------------------


def _commands(
    command: typer.core.TyperGroup | typer.core.TyperCommand, path: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    sub = getattr(command, "commands", None)
    if sub is None:
        yield path
        return
    for name, child in sub.items():
        yield from _commands(child, (*path, name))


ALL_COMMANDS = sorted(_commands(typer.main.get_command(app)))  # type: ignore[arg-type]


def test_the_command_tree_is_the_issues() -> None:
    issue = sorted(
        [
            ("budget", "set"), ("budget", "get"), ("limit", "rate"), ("limit", "concurrency"),
            ("usage",), ("events",), ("top",), ("exporter",), ("mcp",),
            ("local", "start"), ("local", "status"), ("local", "stop"), ("local", "url"),
            ("keys", "create"), ("keys", "list"), ("keys", "revoke"), ("keys", "load-library"),
        ]
    )  # fmt: skip
    assert issue == ALL_COMMANDS


GROUPS = sorted({path[:1] for path in ALL_COMMANDS if len(path) > 1})


@pytest.mark.parametrize("path", ALL_COMMANDS + GROUPS + [()], ids=" ".join)
def test_help_on_every_command_shows_an_example(path: tuple[str, ...]) -> None:
    ran = invoke(*path, "--help", env={"COLUMNS": "200"})
    assert ran.code == 0
    example = ran.stdout.split("Example", 1)[1]
    assert f"agentbill {' '.join(path)}" in example
    assert "Exit status" in ran.stdout


def test_the_console_script_is_the_same_command_line(env: dict[str, str]) -> None:
    assert AGENTBILL.exists()
    done = subprocess.run(
        [str(AGENTBILL), "budget", "set", "s", "5", "--json"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["limit"] == 5
    assert json.loads(run("budget", "get", "s", "--json", env=env).stdout)["limit"] == 5


def test_the_console_script_names_the_extra_when_typer_is_missing(
    tmp_path: Path, env: dict[str, str]
) -> None:
    shadow = tmp_path / "typer"
    shadow.mkdir()
    (shadow / "__init__.py").write_text(
        "raise ImportError(\"No module named 'typer'\", name='typer')\n"
    )
    done = subprocess.run(
        [str(AGENTBILL), "usage", "u"],
        env=env | {"PYTHONPATH": str(tmp_path)}, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert (
        done.stderr
        == "agentbill: the command line needs typer: pip install 'agentbill-redis[cli]'\n"
    )


# -- local and mcp -------------------------------------------------------------------------------


def test_local_start_url_status_stop(tmp_path: Path) -> None:
    home = Path(os.environ.get("TMPDIR", "/tmp")) / f"ab-cli-{os.getpid()}"
    env = cli_env(None, None, home=home)
    try:
        url = run("local", "url", env=env)
        assert url.code == 0
        assert url.stdout.strip() == f"unix://{home}/server.sock"
        assert run("local", "status", env=env).code == 3

        started = run("local", "start", "--json", env=env)
        assert started.code == 0, started.stderr
        assert json.loads(started.stdout) == {"url": url.stdout.strip()}
        status = json.loads(run("local", "status", "--json", env=env).stdout)
        assert status["running"] is True
        assert status["data_dir"] == str(home)

        with AgentBillClient(redis_url=url.stdout.strip()) as c:
            c.set_budget("x", 3)
        assert json.loads(run("usage", "x", "--json", env=env).stdout)["customer"]["limit"] == 3
    finally:
        stopped = run("local", "stop", "--json", env=env)
    assert stopped.code == 0
    assert json.loads(stopped.stdout)["stopped"] is True


def test_mcp_calls_the_server_of_issue_15(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, object]] = []
    fake = types.ModuleType("agentbill.mcp_server")
    fake.serve = lambda **kwargs: calls.append(kwargs)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "agentbill.mcp_server", fake)

    assert invoke("mcp").code == 0
    assert invoke("mcp", "--http", "127.0.0.1:8765", "--allow-admin").code == 0
    assert calls == [
        {"http": None, "allow_admin": False},
        {"http": "127.0.0.1:8765", "allow_admin": True},
    ]
    bad = invoke("mcp", "--http", "localhost")
    assert bad.code == 2
    assert "HOST:PORT" in one_error_line(bad)


def test_mcp_without_the_server_module_exits_1(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "agentbill.mcp_server", None)  # as if not installed
    ran = invoke("mcp")
    assert ran.code == 1
    assert "no MCP server" in one_error_line(ran)


# -- the README ----------------------------------------------------------------------------------

README = Path(__file__).resolve().parent.parent / "README.md"


def operator_commands() -> list[str]:
    """The commands of the README's first shell block under "Operate" (the ones that end)."""
    section = README.read_text().split("## Operate", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.startswith("agentbill ")]


def test_the_readmes_operator_commands_run(env: dict[str, str], tmp_path: Path) -> None:
    commands = operator_commands()
    assert len(commands) >= 10
    path = f"{AGENTBILL.parent}{os.pathsep}{env.get('PATH', '')}"
    for line in commands:
        done = subprocess.run(
            ["bash", "-c", line], cwd=tmp_path, env=env | {"PATH": path, "AGENTBILL_HOME": str(
                tmp_path / "home")}, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        # `local status` answers 3 here: the embedded server is not running.
        assert done.returncode == (3 if "local status" in line else 0), (line, done.stderr)
        assert done.stderr == "", line
    assert (tmp_path / "ledger.csv").read_text().startswith("id,type,time,")
