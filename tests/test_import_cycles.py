"""No import circles in lfm2audio/, server/ (lfm2audio_server) or clients/python/ (lfm2audio_client).

Every import statement counts: module level, under ``if TYPE_CHECKING:``, and inside functions (a
function-local import hides a circle, it does not remove it). Each is resolved, from the source text
(nothing is imported here), to the most specific module of the three packages it names:
``from a.b import c`` is an edge to ``a.b.c`` when that is a module, else to ``a.b``.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Import name -> folder, as pyproject.toml installs them.
PACKAGES = {
    "lfm2audio": REPO / "lfm2audio",
    "lfm2audio_server": REPO / "server",
    "lfm2audio_client": REPO / "clients" / "python" / "lfm2audio_client",
}

# Known circles inside lfm2audio/, being removed on the engine branch: removed when the engine branch
# merges. Each entry is the set of modules of one circle; the test fails on any other circle, and on an
# entry here that no longer is one (delete it then).
KNOWN_CIRCLES: list[frozenset[str]] = []  # none: a circle found is a failure


def _modules() -> dict[str, Path]:
    out = {}
    for name, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([name, *parts])] = path
    return out


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``module`` imports, anywhere in its file."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [f"{prefix}.{alias.name}" for alias in node.names] + [prefix]
            # ``from a.b import c``: a.b.c when c is a module, else a.b itself.
            targets = [t for t in targets[:-1] if t in known] or [prefix]
        else:
            continue
        for target in targets:
            while target and target not in known:  # ``import a.b.c`` where c is a name: the nearest module
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
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
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(frozenset(component))
    return found


def describe(component: frozenset[str], graph: dict[str, set[str]]) -> str:
    """One circle through the component, ``a -> b -> a``, for the failure message."""
    start = min(component)
    path, seen = [start], {start}
    while True:
        nxt = sorted(graph[path[-1]] & component)
        back = [n for n in nxt if n == start]
        if back and len(path) > 1:
            return " -> ".join([*path, start]) + f"  (component: {', '.join(sorted(component))})"
        fresh = [n for n in nxt if n not in seen]
        if not fresh:
            return f"component: {', '.join(sorted(component))}"
        path.append(fresh[0])
        seen.add(fresh[0])


def test_the_walk_sees_the_imports():
    graph = import_graph()
    assert {"lfm2audio_server.app", "lfm2audio_client.cli", "lfm2audio.engine.engine"} <= set(graph)
    # A module-level, a typing-only and a function-local import are all edges.
    assert "lfm2audio_server.connection" in graph["lfm2audio_server.app"]
    assert "lfm2audio.processor" in graph["lfm2audio.chat"]  # under ``if TYPE_CHECKING:``
    assert "lfm2audio.wav" in graph["lfm2audio.cli"]  # inside a function
    # ``from package import name`` is an edge to the package (its __init__), not to a guessed module.
    assert "lfm2audio.engine" in graph["lfm2audio_server.app"]
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]


def test_no_import_circles():
    graph = import_graph()
    found = circles(graph)
    unexpected = [c for c in found if c not in KNOWN_CIRCLES]
    assert not unexpected, "import circles:\n" + "\n".join(describe(c, graph) for c in unexpected)
    stale = [sorted(c) for c in KNOWN_CIRCLES if c not in found]
    assert not stale, f"no longer circles, delete them from KNOWN_CIRCLES: {stale}"
