"""The package's import structure: no import cycles, no private names taken from another module.

Every import statement counts, at module level or inside a function (a deferred import still ties two modules
together: checkpoint.py and consolidate.py once imported each other that way), except those under
`if TYPE_CHECKING:`.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import mpnet_dist

PACKAGE = Path(mpnet_dist.__file__).parent
ROOT = PACKAGE.name


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
EXTENSIONS = {_module_name(p).split(".cpython")[0] for p in PACKAGE.rglob("*.so")}


def _is_module(name: str) -> bool:
    return name in MODULES or name in EXTENSIONS


def _package_of(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    return skipped


@functools.cache
def _tree(module: str) -> ast.Module:
    return ast.parse(MODULES[module].read_text())


@functools.cache
def imports(module: str) -> list[tuple[str, str | None, int]]:
    """(imported module, name taken from it or None, line) for every import of this package's modules."""
    tree = _tree(module)
    skipped = _type_checking_nodes(tree)
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == ROOT]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing module's package, `level - 1` packages up
                package = _package_of(module).split(".")
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != ROOT:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub, None, node.lineno) if _is_module(sub) else (base, alias.name, node.lineno))
    return found


def import_graph() -> dict[str, set[str]]:
    return {m: {target for target, _, _ in imports(m) if target in MODULES and target != m} for m in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    assert len(MODULES) > 30  # the walk found the package
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_private_name_is_imported_from_another_module():
    """`from m import _x` and `m._x` on an imported module of this package (a private submodule, such as the
    Cython extension, may be imported by the modules of its own package)."""
    offences = []
    for module, path in MODULES.items():
        own_package = _package_of(module)
        aliases = {}
        for target, name, line in imports(module):
            leaf = target.rpartition(".")[2]
            if name is not None and _private(name):
                offences.append(f"{path.name}:{line} imports {name} from {target}")
            elif name is None and _private(leaf) and target.rpartition(".")[0] != own_package:
                offences.append(f"{path.name}:{line} imports the private module {target}")
            if name is None:
                aliases[leaf] = target
        for node in ast.walk(_tree(module)):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and _private(node.attr)
                and aliases[node.value.id].rpartition(".")[0] != own_package
            ):
                offences.append(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not offences, "\n".join(offences)
