"""``agentbill exporter`` as a real process, scraped over HTTP and parsed with prometheus-client's
parser: the budgets' values, how it finds customers, what a scrape costs Redis, and a scrape
while Redis is down."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agentbill import AgentBillClient
from tests._cli import cli_env
from tests._servers import RedisServer

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@contextmanager
def exporter(env: dict[str, str], *args: str) -> Iterator[str]:
    """A running exporter on a free port; its /metrics URL. Stopped with SIGTERM (status 0)."""
    with subprocess.Popen(
        [sys.executable, "-m", "agentbill", "exporter", "--port", "0", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as proc:  # fmt: skip
        try:
            assert proc.stderr is not None
            first = proc.stderr.readline()
            found = re.search(r"http://\S+/metrics", first)
            assert found is not None, first + proc.stderr.read()
            yield found[0]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=30) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def budget_series(samples: Samples) -> set[str]:
    return {name for name, _ in samples if name.startswith(("agentbill_budget", "agentbill_runs"))}


@pytest.fixture
def env(redis_server: RedisServer, namespace: str) -> dict[str, str]:
    return cli_env(redis_server.url, namespace)


def test_scrape_shows_every_budget_per_customer_and_agent(
    env: dict[str, str], client: AgentBillClient
) -> None:
    client.set_budget("c1", 100)
    client.set_budget("c1", 50, agent_id="w")
    client.preflight("w", 30, "c1").record(30)
    held = client.preflight("r", 20, "c1")
    assert client.preflight("x", 5, "c2").approved  # unlimited

    with exporter(env, "--customer", "c1", "--customer", "c2", "--customer", "never") as url:
        first = scrape(url)
        assert value(first, "agentbill_up") == 1
        assert value(first, "agentbill_customers") == 3
        c1 = {"customer": "c1"}
        assert value(first, "agentbill_budget_limit_units", **c1) == 100
        assert value(first, "agentbill_budget_spent_units", **c1) == 30
        assert value(first, "agentbill_budget_reserved_units", **c1) == 20
        assert value(first, "agentbill_budget_remaining_units", **c1) == 50
        assert value(first, "agentbill_runs_in_flight", **c1) == 1
        assert value(first, "agentbill_budget_limit_units", customer="c1", agent="w") == 50
        assert value(first, "agentbill_budget_remaining_units", customer="c1", agent="w") == 20
        assert value(first, "agentbill_budget_reserved_units", customer="c1", agent="r") == 20
        # Unlimited: no limit and no remaining series, the rest as usual.
        assert value(first, "agentbill_budget_limit_units", customer="c2") is None
        assert value(first, "agentbill_budget_remaining_units", customer="c2") is None
        assert value(first, "agentbill_budget_reserved_units", customer="c2") == 5
        assert value(first, "agentbill_budget_spent_units", customer="never") == 0

        held.record(18)  # every scrape reads Redis afresh
        second = scrape(url)
        assert value(second, "agentbill_budget_spent_units", **c1) == 48
        assert value(second, "agentbill_runs_in_flight", **c1) == 0


def test_without_customers_it_finds_the_namespaces_by_scan(
    env: dict[str, str], client: AgentBillClient, redis_server: RedisServer
) -> None:
    client.set_budget("a", 10)
    client.preflight("agent", 1, "b")
    with AgentBillClient(redis_url=redis_server.url, namespace=f"{client.namespace}-other") as o:
        o.set_budget("elsewhere", 10)  # another namespace: never exported

    with exporter(env, "--rescan", "1") as url:
        samples = scrape(url)
        customers = {
            dict(labels)["customer"] for name, labels in samples if "customer" in dict(labels)
        }
        assert customers == {"a", "b"}
        assert value(samples, "agentbill_customers") == 2

        client.set_budget("late", 7)  # found by a later SCAN (every --rescan seconds)
        deadline = time.monotonic() + 30
        while value(scrape(url), "agentbill_budget_limit_units", customer="late") != 7:
            assert time.monotonic() < deadline, "the new customer was never found"
            time.sleep(0.2)


def test_a_scrape_costs_one_script_call_per_customer() -> None:
    server = RedisServer().start()
    try:
        env = cli_env(server.url, "cost")
        with AgentBillClient(redis_url=server.url, namespace="cost") as c:
            for name in ("a", "b", "c"):
                c.set_budget(name, 10)
                c.preflight("agent", 1, name)
        with server.client(decode_responses=True) as r, exporter(env) as url:
            scrape(url)  # the first one also SCANs for customers and loads the script
            r.config_resetstat()
            scrape(url)
            stats = r.info("commandstats")
        # One get_usage script call per customer (the commands it runs inside Redis are
        # counted too, under their own names); no SCAN: the list is kept for --rescan seconds.
        assert stats["cmdstat_fcall"]["calls"] == 3
        assert "cmdstat_scan" not in stats
    finally:
        server.stop()


def test_a_scrape_while_redis_is_down_answers_up_0() -> None:
    server = RedisServer().start()
    try:
        env = cli_env(server.url, "down")
        with AgentBillClient(redis_url=server.url, namespace="down") as c:
            c.set_budget("d", 10)
        with exporter(env, "--customer", "d") as url:
            assert value(scrape(url), "agentbill_up") == 1
            server.kill()
            down = scrape(url)
            assert value(down, "agentbill_up") == 0
            assert budget_series(down) == set()
            server.start()  # empty: it kept nothing
            back = scrape(url)
            assert value(back, "agentbill_up") == 1
            assert value(back, "agentbill_budget_spent_units", customer="d") == 0
    finally:
        server.stop()


def test_exporter_needs_the_metrics_extra(env: dict[str, str], tmp_path: Path) -> None:
    shadow = tmp_path / "prometheus_client"
    shadow.mkdir()
    (shadow / "__init__.py").write_text(
        "raise ImportError(\"No module named 'prometheus_client'\", name='prometheus_client')\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "agentbill", "exporter", "--port", "0"],
        env=env | {"PYTHONPATH": str(tmp_path)}, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr == (
        "agentbill: error: agentbill exporter needs prometheus_client: "
        "pip install 'agentbill-redis[metrics]'\n"
    )


def test_a_port_in_use_exits_1_with_one_line(env: dict[str, str]) -> None:
    with exporter(env, "--customer", "x") as url:
        port = url.rsplit(":", 1)[1].split("/")[0]
        done = subprocess.run(
            [sys.executable, "-m", "agentbill", "exporter", "--port", port],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.startswith(f"agentbill: error: cannot listen on 127.0.0.1:{port}")
    assert len(done.stderr.splitlines()) == 1


@pytest.mark.parametrize("bad", ["", "   ", "a\nb", "x" * 257])
def test_a_bad_customer_is_refused_before_serving(env: dict[str, str], bad: str) -> None:
    """A named customer no budget can have would make every scrape fail (agentbill_up 0
    forever): refused at once, exit 2, one line naming the field."""
    done = subprocess.run(
        [sys.executable, "-m", "agentbill", "exporter", "--port", "0", "-c", "ok", "-c", bad],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith("agentbill: error: customer_id: ")


def test_overlapping_scrapes_share_one_read(redis_server: RedisServer, namespace: str) -> None:
    """Scrapes that arrive while another is reading the budgets wait for it and answer what it
    read: one read of Redis for all of them, never one queued behind another (with Redis
    silent, the Nth scrape used to wait N timeouts)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from agentbill.cli._collector import BudgetCollector
    from agentbill.cli._customers import Customers

    with AgentBillClient(redis_url=redis_server.url, namespace=namespace) as client:
        client.set_budget("a", 10)
        client.set_budget("b", 20)
        reading, go_on = threading.Event(), threading.Event()
        calls: list[str] = []
        real = client.get_usage

        def held(customer_id: str) -> Any:  # the first read waits until every scrape is in
            calls.append(customer_id)
            reading.set()
            go_on.wait(30)
            return real(customer_id)

        client.get_usage = held  # type: ignore[method-assign,assignment]
        collector = BudgetCollector(client, Customers(client._redis, namespace, ["a", "b"]))
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        answers: list[str] = []
        first = threading.Thread(target=lambda: answers.append(generate_latest(registry).decode()))
        first.start()
        assert reading.wait(30)
        others = [
            threading.Thread(target=lambda: answers.append(generate_latest(registry).decode()))
            for _ in range(4)
        ]
        for t in others:
            t.start()
        deadline = time.monotonic() + 30
        while collector._waiting < len(others) and time.monotonic() < deadline:
            time.sleep(0.01)
        go_on.set()
        for t in [first, *others]:
            t.join(30)
    assert calls == ["a", "b"]  # one read for the five scrapes
    assert len(answers) == 5
    for text in answers:
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        assert samples[("agentbill_up", ())] == 1
        assert samples[("agentbill_budget_limit_units", (("customer", "b"),))] == 20
