"""The exporter's collector: the budgets as Prometheus metrics (needs prometheus-client).

Each scrape reads every customer's budget at that moment: one ``get_usage`` script call per
customer (the customer's and its agents' scopes in one round trip; like every call, it first
returns up to ``reap_limit`` expired reservations). Customers are the ``--customer`` ones, else
those a SCAN finds, kept for ``--rescan`` seconds (see ``_customers``). Nothing is cached
between scrapes, so two Prometheus servers scraping in turn cost twice; scrapes that overlap
share one read.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agentbill._client import AgentBillClient
from agentbill._exceptions import AgentBillError
from agentbill._results import BudgetStatus
from agentbill.cli._common import Failed
from agentbill.cli._customers import Customers

BUDGET_METRICS = (
    ("agentbill_budget_limit_units", "The budget's limit in units (absent when unlimited)."),
    ("agentbill_budget_spent_units", "Units charged in the current period."),
    ("agentbill_budget_reserved_units", "Units held by open reservations (runs in flight)."),
    ("agentbill_budget_remaining_units", "limit - spent - reserved, at least 0 (absent when "
     "unlimited)."),
    ("agentbill_runs_in_flight", "Open reservations: runs preflighted and not yet settled."),
)  # fmt: skip


def _values(status: BudgetStatus) -> tuple[int | None, ...]:
    return (
        status.limit,
        status.spent,
        status.reserved,
        status.remaining,
        status.open_reservations,
    )


class BudgetCollector(Collector):
    """The customers' budgets, read from Redis at every scrape.

    Series carry ``customer``; an agent's carry ``agent`` as well. A scrape that cannot reach
    Redis answers ``agentbill_up 0`` and no budget series (Prometheus marks them stale) rather
    than failing the scrape. Scrapes that arrive while another one is reading wait for it and
    answer what it read: concurrent scrapes cost Redis one read, and never queue one behind
    another (which, with Redis silent, made the Nth wait N timeouts).
    """

    def __init__(self, client: AgentBillClient, customers: Customers) -> None:
        self._client = client
        self._customers = customers
        self._turn = threading.Condition()
        self._reading = False
        self._reads = 0
        self._waiting = 0
        self._last: list[Metric] = []

    def collect(self) -> Iterator[Metric]:
        with self._turn:
            if self._reading:
                read = self._reads
                self._waiting += 1
                while self._reads == read:
                    self._turn.wait()
                self._waiting -= 1
                return iter(self._last)
            self._reading = True
        families: list[Metric] = []
        try:
            families = self._read()
        finally:
            with self._turn:
                self._last, self._reading = families, False
                self._reads += 1
                self._turn.notify_all()
        return iter(families)

    def _read(self) -> list[Metric]:
        started = time.perf_counter()
        families = [Metric(name, text, "gauge") for name, text in BUDGET_METRICS]
        up, found = 1, 0
        try:
            for customer in self._customers.current():
                usage = self._client.get_usage(customer)
                found += 1
                for status in (usage.customer, *usage.agents):
                    labels = {"customer": usage.customer.customer_id}
                    if status.agent_id is not None:
                        labels["agent"] = status.agent_id
                    for family, value in zip(families, _values(status), strict=True):
                        if value is not None:
                            family.add_sample(family.name, labels, value)
        except (AgentBillError, Failed) as exc:
            print(f"agentbill exporter: scrape failed: {exc}", file=sys.stderr)
            up, families = 0, []
        return [
            *families,
            GaugeMetricFamily(
                "agentbill_up", "1 when the last scrape read every budget from Redis.", value=up
            ),
            GaugeMetricFamily(
                "agentbill_customers", "Customers read by the last scrape.", value=found
            ),
            GaugeMetricFamily(
                "agentbill_scrape_duration_seconds",
                "Seconds the last scrape took to read the budgets.",
                value=time.perf_counter() - started,
            ),
        ]

    def describe(self) -> Iterator[Metric]:
        return iter(())  # registering must not read Redis


def serve(client: AgentBillClient, customers: Customers, addr: str, port: int) -> Any:
    """Start serving /metrics in a thread; the HTTP server (``server_port`` is the port)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BudgetCollector(client, customers))
    try:
        server, _ = start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        raise Failed(f"cannot listen on {addr}:{port}: {exc.strerror or exc}") from None
    return server
