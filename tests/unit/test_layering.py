"""Dependencies point one way: no import cycle among kwatch's modules nor among its packages, and each side of the
wire in its package.

Every import counts, those inside functions too (a cycle hidden in a function still ties the two modules together).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "kwatch"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module -> the kwatch modules it imports. ``from pkg import sub`` is an edge to ``pkg.sub`` when that is a
    module (importing a submodule is not a dependency on the package's own code)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_bytes())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
                targets = subs if len(subs) == len(node.names) else [base, *subs]
            graph[mod].update(t for t in targets if t in mods and t != mod)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm, iterative)."""
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
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        comp.append(top)
                        if top == node:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_the_checker_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_import_cycle() -> None:
    assert cycles(import_graph()) == []


def package_of(mod: str, mods: dict[str, Path]) -> str:
    """The package a module belongs to: its directory's (``kwatch.protocols.rsync`` for ``...rsync.client``); a
    module directly in ``kwatch/`` (``kwatch.fsutil``) and a package's ``__init__`` stand for themselves."""
    parent = mod.rpartition(".")[0]
    return mod if mods[mod].name == "__init__.py" or parent == "kwatch" else parent


def package_graph(graph: dict[str, set[str]], mods: dict[str, Path]) -> dict[str, set[str]]:
    """Package -> the other packages its modules import."""
    out: dict[str, set[str]] = {}
    for mod, targets in graph.items():
        pkg = package_of(mod, mods)
        out.setdefault(pkg, set()).update(p for p in (package_of(t, mods) for t in targets) if p != pkg)
    return out


def test_the_package_graph_merges_modules() -> None:
    mods = {m: Path(f"/{m.replace('.', '/')}.py") for m in ("kwatch.a.x", "kwatch.a.y", "kwatch.b.z", "kwatch.top")}
    mods["kwatch.a"] = Path("/kwatch/a/__init__.py")
    graph = {"kwatch.a.x": {"kwatch.b.z"}, "kwatch.a.y": set(), "kwatch.b.z": {"kwatch.top"},
             "kwatch.top": set(), "kwatch.a": {"kwatch.a.y"}}
    assert package_graph(graph, mods) == {"kwatch.a": {"kwatch.b"}, "kwatch.b": {"kwatch.top"}, "kwatch.top": set()}
    graph["kwatch.top"] = {"kwatch.a.y"}  # no module cycle, but a -> b -> top -> a
    assert cycles(graph) == []
    assert cycles(package_graph(graph, mods)) == [["kwatch.a", "kwatch.b", "kwatch.top"]]


def test_no_package_import_cycle() -> None:
    """A cycle between packages (``metrics`` importing from ``replicate`` while ``replicate`` imports ``metrics``)
    ties them together as a module cycle does, even when no two modules import each other."""
    graph = import_graph()
    mods = _modules()
    found = cycles(package_graph(graph, mods))
    edges = sorted(f"{m} -> {t}" for comp in found for m, ts in graph.items() for t in ts
                   if package_of(m, mods) in comp and package_of(t, mods) in comp
                   and package_of(m, mods) != package_of(t, mods))
    assert found == [], edges


def _imports_between(graph: dict[str, set[str]], frm: str, to: str) -> list[str]:
    return sorted(f"{m} -> {t}" for m, ts in graph.items() if m.startswith(frm + ".") or m == frm
                  for t in ts if t.startswith(to + ".") or t == to)


def test_the_sending_side_does_not_import_the_mirror_end() -> None:
    # the mirror end may use the pure pieces both sides share (scan, delta); the sender never needs the mirror
    assert _imports_between(import_graph(), "kwatch.replicate", "kwatch.mirror") == []


def test_protocols_import_nothing_from_the_sides_of_the_wire() -> None:
    graph = import_graph()
    assert _imports_between(graph, "kwatch.protocols", "kwatch.replicate") == []
    assert _imports_between(graph, "kwatch.protocols", "kwatch.mirror") == []


def _imported_by(module: str) -> set[str]:
    import subprocess
    import sys

    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)
    return set(out.stdout.split())


def test_the_two_ends_of_a_first_sync_start_without_numpy() -> None:
    # numpy is the delta engine's and the rsync checksums' (imported when a delta or an rsync target needs them):
    # importing it was 0.1-0.2 s of every `kwatch replicate` and every agent, most of a small first sync's start-up
    for module in ("kwatch.replicate.command", "kwatch.mirror.command", "kwatch.mirror.server"):
        assert "numpy" not in _imported_by(module), module


def test_the_delta_frame_bound_is_one_copy_run() -> None:
    from kwatch.replicate import agent_transport, delta

    assert agent_transport.DELTA_COPY_PER_FRAME == delta.COPY_RUN_MAX
