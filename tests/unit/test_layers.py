"""The layout's promise, read from the source: every arrow points down, and no module imports one
that imports it back (function-level imports included, so a cycle cannot hide in one).

  tools, bench           the `cloudach` command, the launcher, benchmarks
  edge, inference_svc,   the services, and triton_model (our Triton model): each imports the
  auth_svc, billing_svc, library and itself, never another
  triton_model
  cloudach               the library (and the generated stubs): imports nothing above it
"""

from __future__ import annotations

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[2]
LIBRARY = "cloudach"
SERVICES = ("edge", "inference_svc", "auth_svc", "billing_svc", "triton_model")
TOOLS = ("tools", "bench")
GENERATED = ("cloudach.inference", "cloudach.auth", "cloudach.billing")


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for package in (LIBRARY, *SERVICES, *TOOLS):
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            if not name.startswith(GENERATED):
                found[name] = path
    return found


def _imports(path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
    """The project modules path imports, anywhere in it."""
    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out |= {m for m in map(resolve, names) if m is not None and m.split(".")[0] in (LIBRARY, *SERVICES, *TOOLS)}
    return out


GRAPH = {name: _imports(path, _modules()) for name, path in _modules().items()}


def _package(module: str) -> str:
    return module.split(".")[0]


def test_the_library_imports_nothing_above_it():
    upward = {m: sorted(i for i in imports if _package(i) != LIBRARY)
              for m, imports in GRAPH.items() if _package(m) == LIBRARY}
    assert {m: i for m, i in upward.items() if i} == {}


def test_a_service_imports_the_library_and_itself_only():
    crossing = {m: sorted(i for i in imports if _package(i) not in (LIBRARY, _package(m)))
                for m, imports in GRAPH.items() if _package(m) in SERVICES}
    assert {m: i for m, i in crossing.items() if i} == {}


def test_no_module_imports_one_that_imports_it_back():
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in GRAPH.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in GRAPH.get(node, ()):
                cycles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    assert cycles == []


def test_the_checks_see_the_imports():
    # Guards the three tests above against passing on an empty or misread graph.
    assert "edge.errors" in GRAPH["edge.chat"]
    assert "cloudach.rpc.errors" in GRAPH["edge.errors"]
    assert "tools.launcher.stack" in GRAPH["tools.cli"]  # a function-level import counts
