"""``agentbill top``: one frame rendered and checked, its JSON, its rates from the ledger, that it
writes nothing, and the live view driven in a real terminal (tmux)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from agentbill import AgentBillClient
from agentbill.cli import _top
from agentbill.cli._top import RateWindow, redis_time_ms
from tests._cli import cli_env, invoke, run
from tests._servers import RedisServer
from tests.conftest import namespace_keys

WINDOW = 600  # seconds: every event of a test falls inside it, however slow the machine


@pytest.fixture
def env(redis_server: RedisServer, namespace: str) -> dict[str, str]:
    return cli_env(redis_server.url, namespace)


@pytest.fixture
def burning(client: AgentBillClient) -> AgentBillClient:
    """Customer "burn": limit 100, spent 30, 20 reserved by one run in flight; 60 approvals
    and 120 refusals in its ledger. Customer "free": unlimited, 5 reserved."""
    client.set_budget("burn", 100)
    client.preflight("writer", 30, "burn").record(30)
    assert client.preflight("reader", 20, "burn").approved  # held: in flight
    for _ in range(58):
        client.preflight("writer", 1, "burn").release()
    for _ in range(120):
        assert not client.preflight("writer", 60, "burn").approved
    assert client.preflight("other", 5, "free").approved
    return client


def test_once_renders_the_burn_down(env: dict[str, str], burning: AgentBillClient) -> None:
    ran = run("top", "--once", "--window", str(WINDOW), env=env)
    assert ran.code == 0, ran.stderr
    lines = ran.stdout.splitlines()
    assert lines[0].startswith("agentbill top")
    assert f"namespace {env['AGENTBILL_NAMESPACE']}" in lines[0]
    assert f"rates over {WINDOW} s" in lines[0]
    assert lines[2].split() == [
        "CUSTOMER", "BUDGET", "SPENT", "RESERVED", "LIMIT", "REMAINING", "APPROVED/s",
        "REFUSED/s", "IN", "FLIGHT", "RESETS", "IN",
    ]  # fmt: skip
    # Found by SCAN, nearest to its limit first: 30 spent (5 of 16 cells), 20 reserved (3).
    assert lines[3].split() == [
        "burn", "█████▒▒▒········", "50%", "30", "20", "100", "50",
        f"{60 / WINDOW:.1f}", f"{120 / WINDOW:.1f}", "1", "-",
    ]  # fmt: skip
    assert lines[4].split() == [
        "free",
        "unlimited",
        "0",
        "5",
        "unlimited",
        "-",
        "0.0",
        "0.0",
        "1",
        "-",
    ]
    assert lines[-1] == "2 of 2 customers"


def test_once_with_agents_and_named_customers(
    env: dict[str, str], burning: AgentBillClient
) -> None:
    ran = invoke(
        "top", "--once", "--agents", "-c", "free", "-c", "burn", "--window", "600", env=env
    )
    assert ran.code == 0
    rows = [line.split()[:2] for line in ran.stdout.splitlines()[3:-2]]
    # Named customers keep their order; each agent under its customer.
    assert rows == [
        ["free", "unlimited"],
        ["└", "other"],
        ["burn", "█████▒▒▒········"],
        ["└", "reader"],
        ["└", "writer"],
    ]


def test_long_ids_and_big_numbers_cut_no_column(
    env: dict[str, str], client: AgentBillClient
) -> None:
    """Ids run to 256 characters and units to 2**53 - 1: a long id is cut short (…), and in a
    pipe every column is shown in full, however wide that makes the frame."""
    long, top = "L" * 256, 2**53 - 1
    client.set_budget(long, top)
    client.preflight("a" * 256, 2**52, long).record(2**52)
    client.preflight("b", 7, long)
    ran = invoke("top", "--once", "--agents", "-c", long, env=env)
    assert ran.code == 0, ran.stderr
    table = ran.stdout.splitlines()[2:-2]
    assert table[0].split() == [
        "CUSTOMER", "BUDGET", "SPENT", "RESERVED", "LIMIT", "REMAINING", "APPROVED/s",
        "REFUSED/s", "IN", "FLIGHT", "RESETS", "IN",
    ]  # fmt: skip
    customer, agent = table[1].split(), table[2].split()
    assert customer[0].startswith("LLLL")
    assert customer[0].endswith("…")
    assert customer[3:7] == [f"{2**52:,}", "7", f"{top:,}", f"{top - 2**52 - 7:,}"]
    assert agent[1].startswith("aaaa")
    assert agent[1].endswith("…")
    assert agent[3:5] == [f"{2**52:,}", "0"]
    assert "…" not in " ".join(customer[1:] + agent[2:])


def test_once_as_json_has_exact_rates(env: dict[str, str], burning: AgentBillClient) -> None:
    ran = invoke("top", "--once", "--json", "--window", str(WINDOW), env=env)
    assert ran.code == 0
    frame = json.loads(ran.stdout)
    assert frame["namespace"] == env["AGENTBILL_NAMESPACE"]
    burn, free = frame["customers"]
    assert (burn["customer_id"], burn["spent"], burn["reserved"]) == ("burn", 30, 20)
    assert burn["open_reservations"] == 1
    assert round(burn["approved_per_second"] * WINDOW) == 60
    assert round(burn["refused_per_second"] * WINDOW) == 120
    assert burn["rates_complete"] is True
    assert [a["agent_id"] for a in burn["agents"]] == ["reader", "writer"]
    assert (free["customer_id"], free["limit"], free["reserved"]) == ("free", None, 5)


def test_top_writes_nothing(
    env: dict[str, str], burning: AgentBillClient, raw: redis.Redis, namespace: str
) -> None:
    before = namespace_keys(raw, namespace, ledger=True)
    assert invoke("top", "--once", "--agents", env=env).code == 0
    assert invoke("top", "--once", "-c", "burn", "-c", "never-seen", env=env).code == 0
    assert namespace_keys(raw, namespace, ledger=True) == before


def test_no_customers_says_so(env: dict[str, str]) -> None:
    ran = invoke("top", "--once", env=env)
    assert ran.code == 0
    assert ran.stdout.splitlines()[-1] == "0 of 0 customers: none found in this namespace"


def test_rates_are_read_incrementally_and_age_out(
    client: AgentBillClient, redis_server: RedisServer
) -> None:
    with redis_server.client() as r:
        window = RateWindow(window_ms=WINDOW * 1000)
        client.set_budget("w", 5)
        client.preflight("a", 1, "w")
        window.update(client, "w", redis_time_ms(r))
        client.preflight("a", 1, "w").release()
        assert not client.preflight("a", 10**9, "w").approved
        window.update(client, "w", redis_time_ms(r))
        assert window.rates() == (2 / WINDOW, 1 / WINDOW)  # each event counted once
        # A window that ended after all of them: they age out.
        window.update(client, "w", redis_time_ms(r) + WINDOW * 1000 + 1)
        assert window.rates() == (0.0, 0.0)


def test_a_capped_read_is_a_lower_bound(
    env: dict[str, str], client: AgentBillClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    for _ in range(30):
        client.preflight("a", 1, "busy")
    monkeypatch.setattr(_top, "PAGE", 10)
    monkeypatch.setattr(_top, "MAX_EVENTS", 20)
    frame = json.loads(invoke("top", "--once", "--json", "--window", "600", env=env).stdout)
    (busy,) = frame["customers"]
    assert busy["rates_complete"] is False
    assert round(busy["approved_per_second"] * 600) == 20
    text = invoke("top", "--once", "--window", "600", env=env).stdout.splitlines()[3].split()
    assert text[6] == f"≥{20 / 600:.1f}"


# -- the live view, in a real terminal -----------------------------------------------------------

TMUX = shutil.which("tmux")


class Terminal:
    """A detached tmux session on its own server socket: type into it, read its screen."""

    def __init__(self, tmux: str, config: Path) -> None:
        self._tmux = tmux
        self._config = config
        self._socket = f"agentbill-test-{uuid.uuid4().hex[:8]}"

    def __call__(self, *args: str) -> str:
        # An explicit environment: the server (and so the pane) must not inherit COLUMNS and
        # LINES, which something in a pytest process exports to its children as 80x24.
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        done = subprocess.run(
            [self._tmux, "-L", self._socket, "-f", str(self._config), *args],
            capture_output=True, text=True, timeout=30, check=True, env=env,
        )  # fmt: skip
        return done.stdout

    def screen(self, history: int = 0) -> str:
        """What the pane shows, and ``history`` lines scrolled off above it."""
        return self("capture-pane", "-p", "-t", "top", "-S", str(-history))

    def wait_for(
        self, ready: Callable[[str], bool], what: str, timeout: float = 30, history: int = 0
    ) -> str:
        """The screen once ``ready`` holds for it (a bounded wait, not a timing assertion)."""
        deadline = time.monotonic() + timeout
        while True:
            shown = self.screen(history)
            if ready(shown):
                return shown
            if time.monotonic() > deadline:
                state = self(
                    "display-message", "-p", "-t", "top",
                    "#{window_width}x#{window_height}, pane dead: #{pane_dead}",
                )  # fmt: skip
                raise AssertionError(f"the screen ({state.strip()}) never showed {what}:\n{shown}")
            time.sleep(0.1)

    def close(self) -> None:
        """Stop the server and remove its socket file."""
        found = subprocess.run(
            [self._tmux, "-L", self._socket, "display-message", "-p", "#{socket_path}"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        subprocess.run(
            [self._tmux, "-L", self._socket, "kill-server"], capture_output=True, check=False
        )
        if found.returncode == 0 and found.stdout.strip():
            Path(found.stdout.strip()).unlink(missing_ok=True)


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[Terminal]:
    if TMUX is None:
        pytest.skip("tmux is not installed: the live view is driven in a real terminal only "
                    "where tmux exists (apt-get install tmux)")  # fmt: skip
    config = tmp_path / "tmux.conf"
    config.write_text("set -g remain-on-exit on\n")  # keep the pane, to read its exit status
    term = Terminal(TMUX, config)
    yield term
    term.close()


def _row(screen: str, customer: str) -> list[str]:
    for line in screen.splitlines():
        if line.split()[:1] == [customer]:
            return line.split()
    return []


def test_live_top_refreshes_and_quits_on_q(
    terminal: Terminal, env: dict[str, str], client: AgentBillClient
) -> None:
    client.set_budget("live", 100)
    client.preflight("writer", 10, "live").record(10)
    wanted = {k: v for k, v in env.items() if k.startswith("AGENTBILL_")}
    top = shlex.join(
        ["env", *(f"{k}={v}" for k, v in wanted.items()), sys.executable, "-m", "agentbill",
         "top", "--customer", "live", "--interval", "0.2"]
    )  # fmt: skip
    command = f"{top}; echo agentbill-exit=$?"  # the pane stays (remain-on-exit) to show it
    terminal("new-session", "-d", "-s", "top", "-x", "150", "-y", "20", command)

    first = terminal.wait_for(lambda s: _row(s, "live")[2:4] == ["10%", "10"], "spent 10")
    assert "agentbill top" in first
    assert "q quits" in first

    client.preflight("writer", 25, "live").record(25)
    held = client.preflight("reader", 15, "live")
    shown = terminal.wait_for(lambda s: _row(s, "live")[2:4] == ["50%", "35"], "spent 35")
    # 35 spent: 6 of 16 cells; 15 reserved: 2; one run in flight.
    assert _row(shown, "live")[1:7] == ["██████▒▒········", "50%", "35", "15", "100", "50"]
    assert _row(shown, "live")[9] == "1"
    held.release()

    terminal("send-keys", "-t", "top", "q")
    # The shell's line may scroll off the screen once top leaves its alternate screen.
    ended = terminal.wait_for(lambda s: "agentbill-exit=" in s, "top's exit", history=100)
    assert "agentbill-exit=0" in ended
    assert "Traceback" not in ended
