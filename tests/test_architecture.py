"""The package layout: imports run one way between subpackages and no modules import each other.

Every import statement counts, also those inside functions or under ``TYPE_CHECKING``: a circle
that only a late import keeps from failing is still a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import batchnorm

PACKAGE_ROOT = Path(batchnorm.__file__).parent
# Lower ranks are imported by higher ones, never the reverse. The root's public Keras-object
# modules re-export from layers; the package itself and __main__ stand above everything.
SUBPACKAGES = {
    "kernels": 0,
    "functional": 1,
    "layers": 2,
    "interop": 4,
    "keras": 5,
    "tools": 5,
    "bench": 6,
    "demo": 6,
    "cli": 7,
}
RANKS = {
    **SUBPACKAGES,
    "initializers": 3,
    "regularizers": 3,
    "constraints": 3,
    "": 8,
    "__main__": 8,
}
ROOT_FILES = {"__init__.py", "__main__.py", "initializers.py", "regularizers.py", "constraints.py"}


def _module_name(path: Path) -> str:
    parts = ["batchnorm", *path.relative_to(PACKAGE_ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE_ROOT.rglob("*.py")}


def _imports(name: str) -> set[str]:
    """The package modules ``name`` imports; ``from package import submodule`` names the submodule."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], base]
                )
            for alias in node.names:
                candidate = f"{base.rstrip('.')}.{alias.name}"
                found.add(candidate if candidate in MODULES else base.rstrip("."))
    return {module for module in found if module in MODULES and module != name}


GRAPH = {name: _imports(name) for name in MODULES}


def _subpackage(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_graph_sees_known_imports():
    assert "batchnorm.functional._backend" in GRAPH["batchnorm.functional._torch_ops"]
    assert "batchnorm.kernels" in GRAPH["batchnorm.functional._cpu_plan"]
    assert "batchnorm.layers._batch_normalization" in GRAPH["batchnorm.layers"]


def test_no_import_circles():
    # Tarjan's strongly connected components: any component of two or more modules is a circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in GRAPH[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    assert circles == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_run_one_way(name):
    own = RANKS[_subpackage(name)]
    upward = [
        target
        for target in GRAPH[name]
        if _subpackage(target) != _subpackage(name) and RANKS[_subpackage(target)] >= own
    ]
    assert upward == [], f"{name} imports modules at its level or above"


def test_the_root_holds_only_the_public_modules():
    files = {path.name for path in PACKAGE_ROOT.iterdir() if path.is_file()}
    assert files - {"py.typed"} == ROOT_FILES
    folders = {
        path.name for path in PACKAGE_ROOT.iterdir() if path.is_dir() and path.name[0].isalpha()
    }
    assert folders == set(SUBPACKAGES)
    for folder in folders:
        docstring = ast.get_docstring(
            ast.parse((PACKAGE_ROOT / folder / "__init__.py").read_text())
        )
        assert docstring, f"{folder}/__init__.py says what lives there"


def test_importing_the_package_leaves_torchs_heavy_subsystems_alone():
    """``import batchnorm`` costs what the layer needs: a ``torch.compiler.disable`` decorator
    at module level imported ``torch._dynamo`` with the package (0.65 s of a 0.5 s budget for a
    first call from a warm cache). Neither it nor ``torch._inductor`` comes in unless used."""
    import subprocess
    import sys

    code = (
        "import sys, torch; before = set(sys.modules); import batchnorm; "
        "print(sorted(m for m in set(sys.modules) - before "
        "if m.split('.')[:2] in (['torch', '_dynamo'], ['torch', '_inductor'])))"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert found == "[]", found
