"""The package's shape (issue 15): small modules, and a runtime that never loads the benchmarks."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "daemon"
MAX_LINES = 400
# Beside the runtime's modules: the CLI, the config (schema apart from loading), the benchmarks
# (which the runtime never imports) and the `kioskd web` service.
SUBPACKAGES = {"bench", "cli", "config", "web"}
# The one way into the benchmarks: `kioskd bench`, importing them inside its handlers only.
BENCH_COMMAND = PACKAGE / "cli" / "bench.py"


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _bench_imports(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            names.add(node.module)
    return {name for name in names if name == "daemon.bench" or name.startswith("daemon.bench.")}


def test_no_module_is_over_the_line_budget() -> None:
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in _modules()}
    assert {path: n for path, n in sizes.items() if n > MAX_LINES} == {}


def test_the_package_holds_runtime_modules_and_its_subpackages_only() -> None:
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == SUBPACKAGES
    assert not [p.name for p in PACKAGE.glob("*.py") if p.stem.startswith(("bench", "localbroker"))]


def test_the_runtime_never_imports_the_benchmarks() -> None:
    importers = {
        str(path.relative_to(PACKAGE)): sorted(found)
        for path in _modules()
        if path.parent != PACKAGE / "bench" and path != BENCH_COMMAND
        if (found := _bench_imports(ast.parse(path.read_text())))
    }
    assert importers == {}


def test_kioskd_bench_imports_the_benchmarks_inside_its_handlers_only() -> None:
    tree = ast.parse(BENCH_COMMAND.read_text())
    top_level = ast.Module(body=[n for n in tree.body if not isinstance(n, ast.FunctionDef)])
    assert _bench_imports(top_level) == set()
    assert _bench_imports(tree), "kioskd bench runs the benchmarks of daemon/bench"


def test_the_readme_layout_map_names_every_module() -> None:
    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme[readme.index("- Package layout:") :].split("\n\n")[0]
    named = {p.name for p in _modules() if p.name != "__init__.py" and f"`{p.name}`" in section}
    every = {p.name for p in _modules() if p.name != "__init__.py"}
    assert every - named == set()
    assert {f"`{name}/`" for name in SUBPACKAGES if f"`{name}/`" not in section} == set()
