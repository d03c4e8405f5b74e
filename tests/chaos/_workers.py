"""What one chaos worker process does: its own client, one loop, a journal of every step.

Workers are processes of their own (tests/_processes.py), each importing this module afresh, so
it imports only agentbill and the standard library. Every call is journaled before it is sent
and after it returns, one JSON array per line on a line-buffered file (each line reaches the OS
in one write), so for a worker SIGKILLed at any point the test can tell which calls were
acknowledged and which are in doubt.

The workers share no lock with the test: a worker killed while holding one would stall the
others. They read their start and stop signals from, and report their progress in, a shared
array of plain integers.
"""

from __future__ import annotations

import json
import random
import time
import traceback
from collections.abc import Callable, MutableSequence
from dataclasses import dataclass
from typing import IO, Any, TypeVar

from agentbill import AgentBillClient, Check, Settlement, StoreUnavailableError, _core

T = TypeVar("T")

# The first field of every journal line.
READY = "ready"  # [ready]
PREFLIGHT = "pf"  # [pf, customer, estimate, idempotency key | null]
APPROVED = "ok"  # [ok, rid, customer, estimate, committed, limit, remaining, replayed]
REFUSED = "no"  # [no, customer, estimate, reason]
SETTLING = "st"  # [st, rid, how, units]
SETTLED = "done"  # [done, rid, closed rid, how, units, status, charged, released, replayed,
#                  committed, limit, monotonic time]
DOWN = "down"  # [down, "preflight" | "settle", seconds the failed call took]
END = "end"  # [end]
ERROR = "error"  # [error, traceback]

# How a worker settles an approved run.
BY_ID = "record"  # check.record(units): closes this reservation by its id
OLDEST = "oldest"  # client.record(agent, units, customer): closes the agent's oldest open one
RELEASE = "release"  # check.release(): closes it, charging nothing

# Slot 0 of the shared array: what the test tells every worker. Slot 1 + i: worker i's
# progress (-1 until it is connected and ready, then the number of runs it finished).
CONTROL = 0
WAIT, GO, STOP = 0, 1, 2
GO_TIMEOUT = 180.0
RETRY_PAUSE = 0.05

Shared = MutableSequence[int]


@dataclass(frozen=True, slots=True)
class Spec:
    """One worker's orders. Picklable: it crosses into the worker process."""

    index: int
    url: str
    namespace: str
    journal: str
    seed: int
    customers: tuple[str, ...]
    overshoot: tuple[str, ...] = ()
    """Customers whose records may exceed the estimate by up to 3 units (charged in full)."""
    ops: int = 0
    """Runs to make; 0: until told to stop, or killed."""
    ttl: int | None = None
    max_estimate: int = 8
    work_ms: float = 0.0
    """Longest pause between an approval and its settlement (the run's "work")."""
    how: tuple[str, ...] = (BY_ID, OLDEST, RELEASE)
    keys: bool = False
    """Every preflight, and every record without a reservation id, carries an idempotency key."""
    retry_for: float = 0.0
    """How long a call that raised StoreUnavailableError is sent again (as the same request:
    the same reservation id or idempotency key); 0: it is not, and the worker fails."""
    durability: str = "primary"
    """The client's ``durability``."""
    api_key: str | None = None
    """A tenant key for the worker's client (its namespace must be ``namespace``)."""

    def __post_init__(self) -> None:
        # A record without a reservation id, sent again without a key, is a new request.
        if self.retry_for and OLDEST in self.how and not self.keys:
            raise ValueError("retrying records without a reservation id needs keys")


def main(spec: Spec, shared: Shared) -> None:
    """The process entry point: run ``spec``, journaling every step."""
    with open(spec.journal, "a", buffering=1, encoding="utf-8") as stream:
        journal = Journal(stream)
        try:
            with AgentBillClient(
                spec.api_key,
                redis_url=spec.url,
                namespace=spec.namespace,
                durability=spec.durability,  # type: ignore[arg-type]
            ) as client:
                Worker(spec, client, journal, shared).run()
        except BaseException:
            journal(ERROR, traceback.format_exc())
            raise
        journal(END)


class Journal:
    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def __call__(self, *fields: object) -> None:
        self._stream.write(json.dumps(fields) + "\n")


class Tap:
    """Keeps the raw reply of the client's last preflight function call.

    ``Check.remaining`` is clamped at 0, so an approval that left spent + reserved above the
    limit would read the same as one that left exactly nothing; the function's own reply
    carries the counters as the approval left them. The two ways a client's calls reach Redis
    are wrapped to see it: ``_call_alone`` (a single call) and ``_pipeline`` (batches, and a
    write followed by WAIT).
    """

    def __init__(self, client: AgentBillClient) -> None:
        self._alone, self._pipeline = client._call_alone, client._pipeline
        self._function = client._library.function("preflight")
        client._call_alone = self.alone  # type: ignore[method-assign]
        client._pipeline = self.pipeline  # type: ignore[method-assign]
        self.reply: Any = None

    def alone(self, call: _core.Call) -> Any:
        if call.script != "preflight":
            return self._alone(call)
        self.reply = None
        self.reply = self._alone(call)
        return self.reply

    def pipeline(self, commands: list[list[Any]], wait: bool) -> Any:
        preflights = [i for i, command in enumerate(commands) if command[1] == self._function]
        if preflights:
            self.reply = None
        answered, acks = self._pipeline(commands, wait)
        for i in preflights:
            if not isinstance(answered[i], Exception):
                self.reply = answered[i]
        return answered, acks

    def committed(self) -> tuple[int, int | None]:
        """spent + reserved and the limit, as the last preflight left them ((0, None) when it
        got no reply)."""
        if self.reply is None:
            return 0, None
        reply = _core.PREFLIGHT.unpack(self.reply)  # by name (lua/contract.json)
        limit = None if reply.limit is None else int(reply.limit)
        return int(reply.spent or 0) + int(reply.reserved or 0), limit


class Worker:
    def __init__(
        self, spec: Spec, client: AgentBillClient, journal: Journal, shared: Shared
    ) -> None:
        self.spec = spec
        self.client = client
        self.journal = journal
        self.shared = shared
        self.rng = random.Random(spec.seed)
        self.agent = f"agent-{spec.index}"
        self.tap = Tap(client)

    def run(self) -> None:
        self.client.get_budget(self.spec.customers[0])  # connected, before the start signal
        self.journal(READY)
        self.shared[1 + self.spec.index] = 0
        deadline = time.monotonic() + GO_TIMEOUT
        while self.shared[CONTROL] == WAIT:
            if time.monotonic() > deadline:
                raise RuntimeError("never told to go")
            time.sleep(0.005)
        done = 0
        while self.shared[CONTROL] != STOP and (not self.spec.ops or done < self.spec.ops):
            self.one(done)
            done += 1
            self.shared[1 + self.spec.index] = done

    def one(self, n: int) -> None:
        spec, rng = self.spec, self.rng
        if spec.overshoot and rng.random() < 0.2:
            customer = rng.choice(spec.overshoot)
        else:
            customer = rng.choice(spec.customers)
        estimate = rng.randint(1, spec.max_estimate)
        key = f"{self.agent}-{n}" if spec.keys else None
        self.journal(PREFLIGHT, customer, estimate, key)
        check = self.call(
            "preflight",
            lambda: self.client.preflight(
                self.agent, estimate, customer, idempotency_key=key, ttl=spec.ttl
            ),
        )
        if not check.approved:
            self.journal(REFUSED, customer, estimate, check.reason)
            return
        committed, limit = self.tap.committed()
        rid = check.reservation_id
        self.journal(
            APPROVED, rid, customer, estimate, committed, limit, check.remaining, check.replayed
        )
        if spec.work_ms:
            time.sleep(rng.uniform(0, spec.work_ms) / 1000)
        units = rng.randint(0, estimate + 3 if customer in spec.overshoot else estimate)
        how = rng.choice(spec.how)
        self.journal(SETTLING, rid, how, units)
        settled = self.call("settle", lambda: self.settle(check, how, units, key))
        after = (
            settled.spent + settled.reserved
            if settled.spent is not None and settled.reserved is not None
            else None
        )
        self.journal(
            SETTLED,
            rid,
            settled.reservation_id,
            how,
            units,
            settled.status,
            settled.charged,
            settled.released,
            settled.replayed,
            after,
            settled.limit,
            time.monotonic(),
        )

    def settle(self, check: Check, how: str, units: int, key: str | None) -> Settlement:
        if how == BY_ID:
            return check.record(units)
        if how == RELEASE:
            return check.release()
        return self.client.record(
            self.agent,
            units,
            check.customer_id,
            idempotency_key=None if key is None else f"{key}-record",
        )

    def call(self, operation: str, send: Callable[[], T]) -> T:
        """``send()``; after a StoreUnavailableError, the same request again for ``retry_for``."""
        first = time.monotonic()
        while True:
            started = time.monotonic()
            try:
                return send()
            except StoreUnavailableError:
                now = time.monotonic()
                self.journal(DOWN, operation, round(now - started, 4))
                if now - first > self.spec.retry_for:
                    raise
            time.sleep(RETRY_PAUSE)
