"""The package's import graph, parsed with :mod:`ast` (nothing imported): no cycle, and no
module imports another's ``_private`` name.

Every ``import`` / ``from ... import`` statement counts, at module level or inside a function
(a function-level import is a cycle that only waits for its first call). ``from P import n``
is an edge to the module ``P.n`` where that is a module of the package, else to ``P``.
A ``_private`` component of a dotted name (a module or a name in it; dunders such as
``__version__`` are public) is visible only inside what holds it: ``allennlp_analyze._lapack``
to the modules of ``allennlp_analyze``, ``sources._common`` to those of ``sources``, a
module's ``_widen`` to that module alone.
"""
import ast
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import pytest

import allennlp_analyze

PACKAGE_DIR = Path(allennlp_analyze.__file__).parent


def package_modules(root: Path) -> Dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the package at ``root``."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imports_of(module: str, path: Path) -> List[Tuple[str, Optional[str]]]:
    """``(module imported, name taken from it or None)`` for each import in ``path``, relative
    ones resolved against ``module``."""
    is_package = path.name == "__init__.py"
    found: List[Tuple[str, Optional[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.extend((alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                keep = len(parts) - node.level + (1 if is_package else 0)
                base = ".".join(parts[:keep] + ([base] if base else []))
            found.extend((base, alias.name) for alias in node.names)
    return found


def _private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def check_package(root: Path) -> Tuple[List[List[str]], List[str]]:
    """The import cycles (each as its modules, first repeated last) and the private imports
    (``"importer: from X import _name"``) of the package at ``root``."""
    modules = package_modules(root)
    graph: Dict[str, Set[str]] = {m: set() for m in modules}
    private: List[str] = []
    for module, path in modules.items():
        for target, name in imports_of(module, path):
            if target not in modules and (name is None or f"{target}.{name}" not in modules):
                continue  # outside the package
            full = target.split(".") + ([name] if name and name != "*" else [])
            for k, part in enumerate(full):
                owner = ".".join(full[:k])
                if _private(part) and not (module == owner or module.startswith(owner + ".")):
                    private.append(f"{module}: imports {'.'.join(full)}")
                    break
            graph[module].add(f"{target}.{name}" if f"{target}.{name}" in modules else target)
    return find_cycles(graph), private


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """One cycle through each strongly connected set of modules that has one (depth first)."""
    cycles: List[List[str]] = []
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    stack: List[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_the_package_has_no_import_cycle_and_no_private_import():
    cycles, private = check_package(PACKAGE_DIR)
    assert len(package_modules(PACKAGE_DIR)) > 30  # the walk found the package
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
    assert not private, "imports of private names: " + "; ".join(private)


def _write(root: Path, files: Dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


#: Synthetic packages and their cycles: one through a function-level import (with an
#: absolute import beside it), one of three modules through a package's ``__init__``.
CYCLES = [
    ({"__init__.py": "",
      "a.py": "from .b import g\n\ndef f():\n    return g()\n",
      "b.py": "def g():\n    from . import a\n    return a\n",
      "c.py": "import pkg.a\n"},
     [["pkg.a", "pkg.b", "pkg.a"]]),
    ({"__init__.py": "from .sub import x\n",
      "sub/__init__.py": "from pkg.sub.x import X\n",
      "sub/x.py": "from ..y import Y\nX = 1\n",
      "y.py": "import pkg.sub\nY = 2\n"},
     [["pkg.sub.x", "pkg.y", "pkg.sub", "pkg.sub.x"]]),
]


@pytest.mark.parametrize("files, cycles", CYCLES)
def test_cycles_are_found(tmp_path, files, cycles):
    assert check_package(_write(tmp_path, files)) == (cycles, [])


def test_private_names_are_visible_only_inside_their_owner(tmp_path):
    pkg = _write(tmp_path, {
        "__init__.py": "from .a import __version__\n",
        "_core.py": "def helper():\n    pass\n",
        "a.py": "from ._core import helper\nfrom .sub._common import one\n__version__ = '1'\n",
        "sub/__init__.py": "",
        "sub/_common.py": "def one():\n    pass\n\ndef _two():\n    pass\n",
        "sub/reader.py": "from ._common import one\nfrom . import _common\n",
        "sub/other.py": "from ._common import _two\n",
    })
    cycles, private = check_package(pkg)
    assert cycles == []
    assert sorted(private) == ["pkg.a: imports pkg.sub._common.one",
                               "pkg.sub.other: imports pkg.sub._common._two"]


def test_relative_imports_resolve_from_a_package_and_from_a_module():
    modules = package_modules(PACKAGE_DIR)
    folder = "allennlp_analyze.sources.folder"
    assert ("allennlp_analyze.errors", "AnalyzeError") in imports_of(folder, modules[folder])
    sources = "allennlp_analyze.sources"
    assert ("allennlp_analyze.sources.local", "open_path") in imports_of(sources, modules[sources])
