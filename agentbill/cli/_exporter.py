"""``agentbill exporter``: the budgets as Prometheus metrics, on ``/metrics``.

Each scrape reads every customer's budget at that moment: one ``get_usage`` script call per
customer (see ``_collector``). prometheus-client (extra ``metrics``) is imported only here, when
the command runs.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Annotated

import typer

from agentbill._install import pip_install
from agentbill.cli._common import Failed, Namespace, RedisUrl, example, session
from agentbill.cli._customers import Customers


def _stop(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def exporter(
    port: Annotated[int, typer.Option(min=0, max=65535, help="the port of /metrics")] = 9464,
    addr: Annotated[
        str,
        typer.Option(help="the address to listen on (0.0.0.0 for a Prometheus on another machine)"),
    ] = "127.0.0.1",
    customer: Annotated[
        list[str] | None,
        typer.Option(
            "--customer",
            "-c",
            metavar="C",
            help="export this customer (repeat it); default: every customer found by SCAN",
        ),
    ] = None,
    rescan: Annotated[
        float, typer.Option(min=1, help="seconds between SCANs for customers")
    ] = 60.0,
    redis_url: RedisUrl = None,
    namespace: Namespace = "agentbill",
) -> None:
    """Serve the budgets as Prometheus metrics on http://ADDR:PORT/metrics until stopped:
    agentbill_budget_{limit,spent,reserved,remaining}_units and agentbill_runs_in_flight,
    labelled customer (and agent). Each scrape costs one get_usage call per customer."""
    try:
        from agentbill.cli import _collector as collector
    except ImportError as exc:
        raise Failed(f"agentbill exporter needs {exc.name}: {pip_install('metrics')}") from None
    with session(redis_url, namespace) as s:
        customers = Customers(s.redis, s.namespace, customer or (), rescan)
        server = collector.serve(s.client, customers, addr, port)
        which = (
            f"{len(customers.current())} customers"
            if not customers.discovered
            else f"customers found by SCAN every {rescan:g} s"
        )
        print(
            f"agentbill exporter: serving http://{addr}:{server.server_port}/metrics "
            f"({which}, namespace {s.namespace!r}, {s.where})",
            file=sys.stderr,
            flush=True,
        )
        signal.signal(signal.SIGTERM, _stop)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
        finally:
            server.shutdown()
            server.server_close()


EXPORTER_EXAMPLE = example(
    "agentbill exporter --port 9464 --customer cust_42 --customer cust_7",
    "agentbill exporter --addr 0.0.0.0 --rescan 300   # every customer, found by SCAN",
)
