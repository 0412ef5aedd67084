"""The package's shape, read from its import graph: the layers stay layers."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "raydistill"
MAX_LINES = 400
# Layers that hold the algorithm and the data: plain PyTorch, testable in one process, no Ray.
PURE = ("raydistill.methods", "raydistill.synset", "raydistill.models", "raydistill.data")
FORBIDDEN_IN_PURE = ("raydistill.distributed", "raydistill.tune", "ray")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking(node: ast.If) -> bool:
    return isinstance(node.test, (ast.Name, ast.Attribute)) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, imported inside a function) for every import outside `if TYPE_CHECKING:` blocks."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                continue
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                for alias in child.names:  # `from pkg import submodule` depends on the submodule itself
                    sub = f"{child.module}.{alias.name}"
                    found.append((sub if sub in MODULES else child.module, in_function))
            visit(child, nested)

    visit(ast.parse(path.read_text()), False)
    return found


GRAPH = {name: sorted({m for m, _ in imports(p) if m in MODULES}) for name, p in MODULES.items()}


def test_the_package_has_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for dep in GRAPH[name]:
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[name] = 2

    for name in GRAPH:
        if name not in state:
            visit(name)


@pytest.mark.parametrize("name", [n for n in MODULES if n.startswith(PURE)])
def test_algorithm_and_data_layers_import_nothing_from_ray_tune_or_the_distributed_layer(name):
    bad = [m for m, _ in imports(MODULES[name]) if m.startswith(FORBIDDEN_IN_PURE) and
           (m in FORBIDDEN_IN_PURE or m.startswith(tuple(f + "." for f in FORBIDDEN_IN_PURE)))]
    assert not bad, f"{name} imports {bad}"


@pytest.mark.parametrize("name", list(MODULES))
def test_no_function_local_import_of_the_package(name):
    local = [m for m, in_function in imports(MODULES[name]) if in_function and m.startswith("raydistill")]
    assert not local, f"{name} imports {local} inside a function; import at the top (a cycle means a layer is wrong)"


@pytest.mark.parametrize("name", list(MODULES))
def test_no_module_is_longer_than_the_limit(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it by job (limit {MAX_LINES})"


def test_the_graph_sees_the_layers():
    """A guard for the guards above: the parser finds the imports the layers are known to have."""
    assert "raydistill.methods.base" in GRAPH["raydistill.methods.ratbptt.method"]
    assert "raydistill.distributed.driver" in GRAPH["raydistill.cli"]
    assert any(m == "ray" for m, _ in imports(MODULES["raydistill.distributed.backend"]))
