"""The package's layers (docs/explanation/architecture.md): who may import whom, and no cycles.

Every import counts, those inside functions too: a function-level import is still a dependency,
and hiding a cycle in one is how cycles creep in.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "fedq"
# Lower layers never import higher ones. The foundation (errors, settings, clitools) is shared by all.
RANK = {"foundation": 0, "protocol": 1, "learning": 2, "roles": 3, "ops": 4, "entry": 5}
FOUNDATION = {"fedq.errors", "fedq.settings", "fedq.clitools"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    if module in FOUNDATION:
        return "foundation"
    parts = module.split(".")
    return parts[1] if len(parts) >= 2 and parts[1] in RANK else "entry"


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _resolve(name: str, known: set[str]) -> str | None:
    """The fedq module an import names (the longest known prefix: `from x import y` may name a module y)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        for name in names:
            if name.startswith("fedq"):
                target = _resolve(name, known)
                if target and target != module and target != "fedq":
                    out.add(target)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(m, p, known) for m, p in mods.items()}


def test_no_module_imports_a_higher_layer() -> None:
    bad = []
    for module, deps in sorted(_graph().items()):
        for dep in sorted(deps):
            if RANK[_layer(dep)] > RANK[_layer(module)]:
                bad.append(f"{module} ({_layer(module)}) imports {dep} ({_layer(dep)})")
    assert not bad, "\n".join(bad)


def test_the_foundation_imports_only_the_foundation() -> None:
    graph = _graph()
    for module in FOUNDATION:
        assert graph[module] <= FOUNDATION, (module, graph[module] - FOUNDATION)


def test_there_are_no_import_cycles() -> None:
    graph = _graph()
    # Packages import their own modules (strategies/__init__ re-exports): a package's edge to its
    # own submodule and back is how packages work, not a cycle between concepts.
    edges = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep):], dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_protocol_layer_loads_neither_pandas_nor_tensorflow_nor_keras() -> None:
    modules = sorted(m for m in _modules() if _layer(m) in ("protocol", "foundation"))
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted(n for n in ('pandas', 'tensorflow', 'keras', 'sklearn') if n in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def test_the_layer_map_knows_every_module() -> None:
    """A new module lands in a layer package (or is a deliberate entry point)."""
    entry = {m for m in _modules() if _layer(m) == "entry"}
    assert entry == {"fedq", "fedq.__main__", "fedq.cli", "fedq.reference",
                     *(f"fedq.cli.{m}" for m in ("access", "launch", "options", "panels", "parsing", "views",
                                                 "workers"))}, entry
