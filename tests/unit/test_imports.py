"""The package's import graph is a DAG (the data flow has no way back), counting imports inside
functions too, and no module imports another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "pggeolearn"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    """Module -> the package modules it imports (anywhere in the file); and private imports."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    private: list[str] = []
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in mods:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    if sub in mods:
                        graph[name].add(sub)  # `from package import module`
                    else:
                        graph[name].add(node.module)
                        if (alias.name.startswith("_") and not alias.name.startswith("__")
                                and not node.module.startswith(name)):
                            private.append(f"{name}: from {node.module} import {alias.name}")
    for name in graph:
        graph[name].discard(name)
        # a package's __init__ re-exporting its own modules is not an arrow back
        graph[name] = {m for m in graph[name] if not (m.startswith(name + ".") and
                                                        mods[name].name == "__init__.py")}
    return graph, private


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_import_graph_is_a_dag():
    graph, _ = _graph()
    assert len(graph) > 40  # the whole package was read
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_another_modules_private_names():
    _, private = _graph()
    assert private == []


def test_the_checker_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_the_package_that_re_exports_it():
    """The graph above leaves out a package's ``__init__`` importing its own modules; one of
    those modules importing names from its package would close a cycle the graph cannot see."""
    graph, _ = _graph()
    mods = _modules()
    reexporting = {m for m, path in mods.items() if path.name == "__init__.py" and any(
        isinstance(n, ast.ImportFrom) and n.level == 0 and (n.module == m or (n.module or "").startswith(m + "."))
        for n in ast.walk(ast.parse(path.read_text())))}
    assert "pggeolearn.predict" in reexporting
    bad = sorted(f"{m} imports {pkg}" for m, deps in graph.items() for pkg in deps & reexporting
                 if m.startswith(pkg + "."))
    assert bad == []



# the CLI starts fast: schema machinery (Alembic, SQLAlchemy, GeoAlchemy2) only for db init/upgrade,
# the frameworks only for training and prediction, numpy only for commands that use it
# (benchmarks/bench_startup.py times it)
HEAVY = ("alembic", "sqlalchemy", "geoalchemy2", "mxnet", "torch", "numpy")
_PROBE = """import sys
{preload}
from pggeolearn.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("heavy:" + ",".join(sorted({{m.split(".")[0] for m in sys.modules}} & set({heavy!r}))), file=sys.stderr)
"""


def _heavy_imports(*args: str, preload: str = "") -> list[str]:
    """The heavy top-level modules a fresh process loaded running ``pggeolearn ARGS``."""
    import os
    import subprocess
    import sys

    path = os.pathsep.join(filter(None, [str(PKG.parent), os.environ.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", _PROBE.format(preload=preload, heavy=HEAVY), *args],
                         env=os.environ | {"PYTHONPATH": path}, check=True, capture_output=True, text=True)
    line = [x for x in out.stderr.splitlines() if x.startswith("heavy:")][-1]
    return [m for m in line.removeprefix("heavy:").split(",") if m]


def test_cli_help_imports_no_schema_machinery_or_framework():
    for args in ([], ["--help"], ["db", "--help"], ["dataset", "--help"], ["train", "--help"],
                 ["predict", "--help"], ["chips", "--help"], ["chips", "split", "--help"]):
        assert _heavy_imports(*args) == [], args


def test_the_probe_sees_heavy_imports():
    """The check above can fail: SQLAlchemy imported before the CLI is seen."""
    assert _heavy_imports("--help", preload="import sqlalchemy") == ["sqlalchemy"]
