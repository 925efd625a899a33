"""The package's import graph: no cycles, the demo and the fixtures on the edges.

Every `import` / `from ... import` statement of every module counts, the lazy ones inside functions included (a
lazy import is still a dependency; it only moves the failure to run time). Imports spelled as strings
(`importlib.import_module`, the lazy exports of `opsd_trl/__init__.py`) are not seen.
"""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

import opsd_trl

PACKAGE_DIR = Path(opsd_trl.__file__).parent

# Modules outside `opsd_trl.quickstart` that may import it, with the reason.
QUICKSTART_IMPORTERS = {
    "opsd_trl.cli": "the CLI front end dispatches `opsd-trl quickstart`; nothing in the package imports the CLI",
    "opsd_trl.models.loading": "the name `tiny:quickstart` builds the quickstart's policy (`quickstart.policy`, "
                               "imported only when that name is loaded)",
}
# Modules (or packages, with everything under them) outside `opsd_trl.testing` that may import it, with the reason.
TESTING_IMPORTERS: dict[str, str] = {}


def module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every `.py` file under `package_dir` (packages by their `__init__.py`)."""
    root = package_dir.parent
    names = {}
    for file in sorted(package_dir.rglob("*.py")):
        parts = list(file.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = file
    return names


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its file. `from X import Y` counts as an import of
    `X.Y` when that is a module, else of `X`; an import of a name below a module counts as that module."""
    modules = module_names(package_dir)
    top = package_dir.name

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, file in modules.items():
        is_package = file.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the module's package, one level up per extra dot
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                           for alias in node.names]
            else:
                continue
            for target in targets:
                if target == top or target.startswith(top + "."):
                    resolved = resolve(target)
                    if resolved is not None and resolved != name:
                        edges.add(resolved)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def imports_into(graph: dict[str, set[str]], target: str, allowed: dict[str, str]) -> list[str]:
    """`importer -> imported` for every import of `target` (or below it) from a module outside it, except from the
    modules (or packages) named in `allowed`."""
    return sorted(
        f"{m} -> {t}" for m, targets in graph.items() for t in targets
        if _within(t, target) and not _within(m, target) and not any(_within(m, a) for a in allowed)
    )


# ----------------------------------------------------------------------------------------------- the package
def test_no_import_cycles():
    assert find_cycles(import_graph(PACKAGE_DIR)) == []


def test_only_the_cli_imports_the_quickstart():
    assert imports_into(import_graph(PACKAGE_DIR), "opsd_trl.quickstart", QUICKSTART_IMPORTERS) == []


def test_the_runtime_reaches_fixtures_only_through_the_declared_modules():
    graph = import_graph(PACKAGE_DIR)
    assert imports_into(graph, "opsd_trl.testing", TESTING_IMPORTERS) == []
    for module in (*QUICKSTART_IMPORTERS, *TESTING_IMPORTERS):  # an exception that no longer applies goes
        assert any(_within(m, module) for m in graph), f"declared importer {module} is not a module of the package"


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph(PACKAGE_DIR)
    assert "opsd_trl.models.adapters" in graph["opsd_trl.models.bagel.adapter"]  # from ..adapters import ...
    assert "opsd_trl.models.loading" in graph["opsd_trl.vt_cache.encoders"]  # inside load_encoder
    assert "opsd_trl.quickstart.policy" in graph["opsd_trl.models.loading"]  # from ..quickstart.policy import ...


# ----------------------------------------------------------------------------------------------- model families
# Family knowledge (the Qwen-VL family, a list of vision families, the vision tower's attribute) outside the family
# adapters and ports (docs/models.md "Adding a family"). Text files only: the shipped warm-start's tensor names
# (`model.visual.*`) are weights, not code.
FAMILY_KNOWLEDGE = re.compile(r"qwen_vl|VISION_FAMILIES|\.visual\b")


def test_family_knowledge_lives_under_models():
    found = []
    for file in sorted(PACKAGE_DIR.rglob("*")):
        rel = file.relative_to(PACKAGE_DIR)
        if not file.is_file() or rel.parts[0] == "models" or file.suffix in (".safetensors", ".pyc"):
            continue
        for number, line in enumerate(file.read_text().splitlines(), 1):
            if FAMILY_KNOWLEDGE.search(line):
                found.append(f"{rel}:{number}: {line.strip()}")
    assert found == []


def test_the_loader_and_the_registry_import_no_port():
    graph = import_graph(PACKAGE_DIR)
    ports = [m for m in graph if m.startswith("opsd_trl.models.") and m.count(".") >= 3]  # models/<port>/...
    assert "opsd_trl.models.bagel.adapter" in ports
    for module in ("opsd_trl.models.loading", "opsd_trl.models.adapters"):
        assert not [p for p in ports if p in graph[module]], module


# ----------------------------------------------------------------------------------------------- the checker
def _write_package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root / "pkg"


def test_checker_finds_a_cycle_through_a_lazy_import(tmp_path):
    pkg = _write_package(tmp_path, {
        "__init__.py": "",
        "a.py": "from . import b\n",
        "b.py": "import os\n\ndef f():\n    from pkg.sub.c import g\n    return g\n",
        "sub/__init__.py": "",
        "sub/c.py": "def g():\n    from ..a import b\n",
        "d.py": "from .sub import c\n",  # depends on the cycle without being part of it
    })
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.sub.c"} and graph["pkg.sub.c"] == {"pkg.a"}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"]]


def test_checker_accepts_an_acyclic_package(tmp_path):
    pkg = _write_package(tmp_path, {
        "__init__.py": "from .a import x\n",  # a package importing its own submodule is no cycle
        "a.py": "from .b import y as x\n",
        "b.py": "y = 1\n",
    })
    assert find_cycles(import_graph(pkg)) == []


def test_checker_finds_imports_into_a_package(tmp_path):
    pkg = _write_package(tmp_path, {
        "__init__.py": "",
        "core.py": "def run():\n    from pkg.demo.model import build\n",
        "cli.py": "from .demo import main\n",
        "demo/__init__.py": "from .model import build\n\ndef main():\n    pass\n",
        "demo/model.py": "from ..core import run\n\ndef build():\n    pass\n",
    })
    graph = import_graph(pkg)
    assert imports_into(graph, "pkg.demo", {"pkg.cli": "front end"}) == ["pkg.core -> pkg.demo.model"]
    assert imports_into(graph, "pkg.demo", {}) == ["pkg.cli -> pkg.demo", "pkg.core -> pkg.demo.model"]
    assert find_cycles(graph) == [["pkg.core", "pkg.demo.model"]]
