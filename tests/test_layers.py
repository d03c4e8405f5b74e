"""No import circle inside agentbill/: every module sits on a floor and imports only from below.

The graph counts every import statement of an agentbill module wherever it stands: at the top,
inside a function (a deferred import is still a dependency, merely a late one), and under
``TYPE_CHECKING`` (a type that names a client is an arrow up to the client). An object on a
lower floor that calls back into a client types it with a small Protocol instead (STYLE.md,
"Types and boundaries").

Importing ``a.b.c`` also runs the package ``a.b``'s ``__init__``, so an import counts as an arrow
to each package above the target too, except the packages that already contain the importer
(Python has started those before the importer runs). ``from agentbill import X`` inside the
package is an arrow to ``agentbill/__init__.py``, which imports nearly everything.
"""

from __future__ import annotations

import ast
import itertools
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

from agentbill import AgentBillClient, AsyncAgentBillClient
from agentbill._gate import GateClient, SyncGateClient
from agentbill._learned import EstimatesClient
from agentbill._lease import AsyncLeaseClient, LeaseClient
from agentbill._results import AsyncCheckClient, CheckClient
from agentbill.llm._wrap import SyncWrapClient, WrapClient

PACKAGE = Path(__file__).resolve().parent.parent / "agentbill"
ROOT = PACKAGE.name

Graph = dict[str, dict[str, int]]  # importer -> {imported: line of the first such import}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def imported_modules(
    node: ast.Import | ast.ImportFrom, importer: str, package: bool, modules: Iterable[str]
) -> Iterator[str]:
    """The modules an import statement names, relative imports resolved: ``from p import x``
    names ``p.x`` when that is a module, else ``p`` (x is defined in p's ``__init__``)."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    base = node.module or ""
    if node.level:
        parts = importer.split(".")
        anchor = parts if package else parts[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join([*anchor, base] if base else anchor)
    for alias in node.names:
        submodule = f"{base}.{alias.name}"
        yield submodule if submodule in modules else base


def import_graph() -> Graph:
    modules = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    graph: Graph = {name: {} for name in modules}
    for importer, path in modules.items():
        package = is_package(importer, modules)
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for name in imported_modules(node, importer, package, modules):
                if name not in modules:
                    continue  # a third-party module
                for target in arrows(importer, name):
                    graph[importer].setdefault(target, node.lineno)
    return graph


def arrows(importer: str, name: str) -> list[str]:
    """What ``importer``'s import of module ``name`` runs: ``name``, and the ``__init__`` of
    each package above it, except the packages that contain the importer (Python has started
    those before it; one named outright still counts)."""
    started = {".".join(importer.split(".")[:i]) for i in range(1, importer.count(".") + 1)}
    parts = name.split(".")
    above = [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]
    return [m for m in (name, *above) if m != importer and (m == name or m not in started)]


def strongly_connected(graph: Graph) -> list[list[str]]:
    """Tarjan's algorithm, iterative; only the components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def shortest_cycle(graph: Graph, component: list[str]) -> list[str]:
    """A shortest circle through the component's first module, as a list that ends where it
    starts."""
    start = component[0]
    inside = set(component)
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(graph[node]):
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if nxt in inside and nxt not in came_from:
                came_from[nxt] = node
                queue.append(nxt)
    raise AssertionError(f"no circle through {start}")  # cannot happen in a component


def describe(graph: Graph, component: list[str]) -> str:
    cycle = shortest_cycle(graph, component)
    steps = "\n".join(
        f"    {a} imports {b} (line {graph[a][b]})" for a, b in itertools.pairwise(cycle)
    )
    return (
        f"{len(component)} modules in one circle: {', '.join(component)}\n  for example:\n{steps}"
    )


def test_the_checker_sees_every_kind_of_import() -> None:
    graph = import_graph()
    # at the top of a module
    assert f"{ROOT}._core" in graph[f"{ROOT}._client"]
    # a package's __init__ re-exporting its submodules
    assert f"{ROOT}._client" in graph[ROOT]
    assert ROOT not in graph[f"{ROOT}._client"]  # agentbill/__init__ started before _client
    # an import of a submodule also runs its package's __init__ ...
    assert arrows(f"{ROOT}._client", f"{ROOT}.llm._wrap") == [f"{ROOT}.llm._wrap", f"{ROOT}.llm"]
    # ... but not the packages that contain the importer: they have started already
    assert arrows(f"{ROOT}.llm._wrap", f"{ROOT}.llm._plan") == [f"{ROOT}.llm._plan"]
    assert arrows(f"{ROOT}.llm._wrap", ROOT) == [ROOT]  # named outright: the arrow counts


def test_no_import_circle_in_the_package() -> None:
    graph = import_graph()
    circles = strongly_connected(graph)
    assert not circles, "import circle in agentbill/:\n" + "\n".join(
        describe(graph, c) for c in circles
    )


def test_the_checker_finds_a_circle_through_a_deferred_import() -> None:
    """The checker must be able to fail: a circle closed only by an import inside a function, or
    only under TYPE_CHECKING, is found."""
    graph: Graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert shortest_cycle(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]

    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from agentbill._client import AgentBillClient\n"
        "def f():\n    from . import _core\n"
    )
    tree = ast.parse(source)
    modules = {f"{ROOT}._client", f"{ROOT}._core"}
    names = [
        name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for name in imported_modules(node, f"{ROOT}._results", False, modules)
    ]
    assert f"{ROOT}._client" in names
    assert f"{ROOT}._core" in names


def _the_clients_fit_the_protocols(sync: AgentBillClient, aio: AsyncAgentBillClient) -> None:
    """Never called: mypy checks that each client has what the floors below call on it (those
    floors name the methods in Protocols instead of importing the client classes)."""
    check: CheckClient = sync
    async_check: AsyncCheckClient = aio
    lease: LeaseClient = sync
    async_lease: AsyncLeaseClient = aio
    sync_gate: SyncGateClient = sync
    gates: list[GateClient] = [sync, aio]
    learners: list[EstimatesClient] = [sync, aio]
    sync_wrap: SyncWrapClient = sync
    wraps: list[WrapClient] = [sync, aio]
    del check, async_check, lease, async_lease, sync_gate, gates, learners, sync_wrap, wraps
