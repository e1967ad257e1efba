"""The package's import structure, read from the source with ``ast`` (nothing is imported).

Two rules, for every module under src/stable_async:

- **No import cycle.** Module-level imports (including lazy imports inside functions, which
  only postpone a cycle) form a directed graph that must have no cycle; imports under
  ``if TYPE_CHECKING:`` are left out, they never run.
- **No cross-module private import.** No module imports another module's underscore name
  (``from stable_async.x import _helper``). The adapters and the benchmark
  (``stable_async.integrations``, ``stable_async.bench``) are clients of the core: they import
  only public modules of the core (their own subpackage's private modules are theirs).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "stable_async"
CLIENT_PACKAGES = ("stable_async.integrations", "stable_async.bench")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every runtime import in the module."""
    is_package = path.name == "__init__.py"
    found: list[tuple[str, list[str], int]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, [], child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = module.split(".") if is_package else module.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                found.append((base, [alias.name for alias in child.names], child.lineno))
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return found


def _resolve(target: str, names: list[str], modules: dict[str, Path]) -> list[str]:
    """The package modules an import statement loads: ``from a import b`` loads ``a.b`` if it is a module."""
    if not (target == PACKAGE or target.startswith(PACKAGE + ".")):
        return []
    loaded = [target] if target in modules else []
    loaded += [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
    return loaded


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for target, names, _ in _imports(module, path):
            for dep in _resolve(target, names, modules):
                if dep != module and not module.startswith(dep + "."):  # a package's own __init__ is not a cycle
                    graph[module].add(dep)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return out


def _private_imports() -> list[str]:
    modules = _modules()
    problems = []
    for module, path in modules.items():
        client = next((c for c in CLIENT_PACKAGES if module == c or module.startswith(c + ".")), None)
        for target, names, line in _imports(module, path):
            if not target.startswith(PACKAGE):
                continue
            where = f"{path.relative_to(SRC)}:{line}"
            problems += [f"{where} imports {n} from {target}" for n in names if n.startswith("_") and n != "__version__"]
            private_module = any(part.startswith("_") for part in target.split(".")[1:])
            if client and private_module and not target.startswith(client + "."):
                problems.append(f"{where} ({client} is a client of the core) imports the private module {target}")
    return problems


def test_the_checker_sees_the_package():
    graph = _graph()
    assert "stable_async.losses.ppo" in graph and "stable_async.registry" in graph["stable_async.losses.ppo"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles in src/: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_cross_module_private_import():
    problems = _private_imports()
    assert not problems, "private imports across modules:\n" + "\n".join(problems)
