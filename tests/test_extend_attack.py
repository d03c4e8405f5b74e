"""check.extend, run.extend, estimates and "learned", from outside: a tenant key's ACL, lease
runs, and a retried extend.

- A tenant key (an ACL user confined to its namespace) extends, learns, reads ``estimates``
  and makes learned runs: every key these touch is within its grant.
- A lease's run has no reservation of its own to extend: ``extend`` is a typed
  ``InvalidRequestError`` naming ``reservation_id``, nothing written (before: AttributeError).
"""

from __future__ import annotations

import pytest

from agentbill import AgentBillClient, InvalidRequestError, _learned
from agentbill._results import LEARN_AFTER
from tests._servers import AclRedisServer
from tests.test_tenants import Make, Tenant, admin, make_client, server, tenant_a

__all__ = ["admin", "make_client", "server", "tenant_a"]


def test_a_tenant_key_extends_learns_and_reads_its_estimates(
    make_client: Make, server: AclRedisServer, tenant_a: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_learned, "REFRESH", 0.0)
    client = make_client(api_key=tenant_a.key, redis_url=server.url)
    client.set_budget("cust", 10_000)
    check = client.preflight("agent", 30, "cust", task_ref="t1", task_ceiling=500)
    bigger = check.extend(20)
    assert bigger.estimated_units == 50
    assert client.get_budget("cust").reserved == 50
    assert check.record(40).charged == 40
    for _ in range(LEARN_AFTER):
        client.preflight("agent", 100, "cust").record(10)
    stats = client.estimates("agent", "cust")
    assert stats.samples == LEARN_AFTER + 1
    if not isinstance(client, AgentBillClient):  # the async facade has no `with` blocks
        learned = client.preflight("agent", stats.learned(100), "cust")
        learned.extend(5)
        learned.record(12)
    else:
        with client.run("agent", "learned", "cust", bound=100) as block:
            assert block.check.estimated_units < 100
            block.extend(5)
            block.record(12)
    budget = client.get_budget("cust")
    assert (budget.spent, budget.reserved) == (40 + 10 * LEARN_AFTER + 12, 0)


def test_a_lease_run_cannot_be_extended(client: AgentBillClient) -> None:
    client.set_budget("cust", 1_000)
    with client.lease("agent", "cust", slice_units=100) as lease:
        run = lease.preflight(10)
        assert run.approved
        before = client.get_budget("cust")
        with pytest.raises(InvalidRequestError) as info:
            run.extend(5)
        assert info.value.field == "reservation_id"
        after = client.get_budget("cust")
        assert (after.spent, after.reserved) == (before.spent, before.reserved)
        run.record(10)
