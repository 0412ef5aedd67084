"""The package's shape, read from its import graph: the layers stay layers.

Each test walks every module of the package once and names every offender in its message.
"""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "raydistill"
MAX_LINES = 400
# From the bottom up: a package may import the packages before it, never one after it.
LAYERS = ["config", "compat", "memory", "filesystems", "runtime", "data", "models", "methods", "synset", "setup",
          "plan", "storage", "watch", "evaluate", "engine", "tune", "cli"]
# Layers that hold the algorithm and the data: plain PyTorch, testable in one process, no Ray.
PURE = ("raydistill.methods", "raydistill.synset", "raydistill.models", "raydistill.data", "raydistill.config")
RAY_DATA_PIPELINE = "raydistill.data.prepare"  # `raydistill prepare` runs on Ray Data: the one Ray module of data/


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text()) for name, path in MODULES.items()}


def _type_checking(node: ast.If) -> bool:
    return isinstance(node.test, (ast.Name, ast.Attribute)) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(name: str) -> list[tuple[str, bool]]:
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

    visit(TREES[name], False)
    return found


GRAPH = {name: sorted({m for m, _ in imports(name) if m in MODULES}) for name in MODULES}


def layer(module: str) -> str:
    """raydistill.engine.driver -> engine; raydistill.setup -> setup."""
    return module.split(".")[1] if module.count(".") else ""


def find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in graph.get(node, []):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in list(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_modules_and_packages_have_no_import_cycles():
    assert find_cycle(GRAPH) is None, "module import cycle: " + " -> ".join(find_cycle(GRAPH))
    packages: dict[str, set[str]] = {}
    for name, deps in GRAPH.items():
        packages.setdefault(layer(name), set()).update(layer(d) for d in deps if layer(d) != layer(name))
    cycle = find_cycle({k: sorted(v) for k, v in packages.items()})
    assert cycle is None, "package import cycle: " + " -> ".join(cycle)


def test_every_package_imports_only_the_layers_below_it():
    assert set(map(layer, MODULES)) - {""} == set(LAYERS), "a package was added or removed: place it in LAYERS"
    upward = [f"{name} imports {dep}" for name, deps in GRAPH.items() for dep in deps
              if layer(name) and layer(dep) and LAYERS.index(layer(dep)) > LAYERS.index(layer(name))]
    assert not upward, "imports against the layers: " + "; ".join(upward)


def test_config_is_a_leaf():
    outside = [f"{name} imports {dep}" for name, deps in GRAPH.items() if layer(name) == "config"
               for dep in deps if layer(dep) != "config"]
    assert not outside, "config must import nothing else of raydistill: " + "; ".join(outside)


def test_algorithm_and_data_layers_know_nothing_of_ray():
    bad = [f"{name} imports {m}" for name in MODULES if name.startswith(PURE) and name != RAY_DATA_PIPELINE
           for m, _ in imports(name) if m == "ray" or m.startswith("ray.")]
    assert not bad, "; ".join(bad)


def test_only_the_engine_makes_ray_actors():
    """An actor is a class given to ray.remote (called or as a decorator); the engine alone starts and restarts them
    (and the prepare pipeline its own log of skipped files, on Ray Data)."""
    def is_ray_remote(node: ast.AST) -> bool:
        return isinstance(node, ast.Attribute) and node.attr == "remote" and ast.unparse(node.value) == "ray"

    bad = []
    for name, tree in TREES.items():
        if layer(name) == "engine" or name == RAY_DATA_PIPELINE:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any(is_ray_remote(d) or isinstance(d, ast.Call) and
                                                      is_ray_remote(d.func) for d in node.decorator_list):
                bad.append(f"{name}: @ray.remote class {node.name}")
            if (isinstance(node, ast.Call) and is_ray_remote(node.func) and node.args and
                    isinstance(node.args[0], ast.Name) and node.args[0].id[:1].isupper()):
                bad.append(f"{name}: ray.remote({node.args[0].id})")
    assert not bad, "actors outside raydistill.engine: " + "; ".join(bad)


def test_no_function_local_import_of_the_package():
    local = [f"{name} imports {m}" for name in MODULES for m, inside in imports(name)
             if inside and m.startswith("raydistill")]
    assert not local, "imports inside functions (import at the top; a cycle means a layer is wrong): " + "; ".join(local)


def test_no_module_is_longer_than_the_limit():
    long = [f"{name} ({n} lines)" for name, path in MODULES.items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES]
    assert not long, f"split these by job (limit {MAX_LINES} lines): " + ", ".join(long)


def test_the_graph_sees_the_layers():
    """A guard for the guards above: the parser finds the imports the layers are known to have."""
    assert "raydistill.methods.base" in GRAPH["raydistill.methods.ratbptt.method"]
    assert "raydistill.engine.driver" in GRAPH["raydistill.cli"]
    assert any(m == "ray" for m, _ in imports("raydistill.engine.backend"))
    assert find_cycle({"a": ["b"], "b": ["a"]}) == ["a", "b", "a"]


MAX_PARAMETERS = 7
# Thin wrappers that pass an ATen op's own argument list through unchanged: their signature is torch's, not ours.
ATEN_SIGNATURES = {"raydistill.compat.native_group_norm", "raydistill.compat.native_group_norm_backward"}


def test_no_function_takes_more_than_seven_parameters():
    """Every parameter counts (self/cls, keyword-only, *args, **kwargs): past seven, group them in a value object."""
    long = []
    for name, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                a = node.args
                n = len(a.posonlyargs + a.args + a.kwonlyargs) + (a.vararg is not None) + (a.kwarg is not None)
                where = f"{name}.{getattr(node, 'name', '<lambda>')}"
                if n > MAX_PARAMETERS and where not in ATEN_SIGNATURES:
                    long.append(f"{where} (line {node.lineno}: {n} parameters)")
    assert not long, f"more than {MAX_PARAMETERS} parameters (group them in a value object): " + ", ".join(long)


PRIVATE_INTERNALS = ("._private", "._internal", "torch._C", "torch.ops.aten", "_node_ip_address")


def test_private_internals_are_named_in_compat_alone():
    """Ray's and torch's private internals are fenced in raydistill/compat.py, which test_compat.py checks against
    the installed versions: no other module of the package, and no other test file, names one."""
    compat, tests = PACKAGE / "compat.py", PACKAGE.parent / "tests"
    files = [p for p in sorted(PACKAGE.rglob("*.py")) if p != compat]
    files += [p for p in sorted(tests.rglob("*.py")) if p.name not in ("test_layout.py", "test_compat.py")]
    assert compat.exists() and len(files) > len(MODULES)
    found = [f"{p.relative_to(PACKAGE.parent)}:{i} names {word}" for p in files
             for i, line in enumerate(p.read_text().splitlines(), 1) for word in PRIVATE_INTERNALS if word in line]
    assert not found, "use raydistill.compat instead: " + "; ".join(found)


def test_tests_share_helpers_only_and_leave_the_benchmarks_alone():
    """Tests share code through tests/helpers/ alone: no file under tests/ imports conftest (fixtures only) or a test
    module, and no test file reaches into benchmarks/ (by name or on sys.path); scripts/ and helpers/ are fair game."""
    tests = PACKAGE.parent / "tests"
    files = sorted(tests.rglob("*.py"))
    assert len([p for p in files if p.name.startswith("test_")]) > 20 and (tests / "helpers" / "__init__.py").exists()
    imports, benchmarks = [], []
    for path in files:
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                if name.split(".")[0] == "conftest" or any(part.startswith("test_") for part in name.split(".")):
                    imports.append(f"{path.relative_to(tests)}:{node.lineno} imports {name}")
        if path.name != "test_layout.py" and ("benchmarks/" in text or re.search(r"[\"']benchmarks[\"']", text)):
            benchmarks.append(str(path.relative_to(tests)))
    assert not imports, "import shared code from helpers instead: " + "; ".join(imports)
    assert not benchmarks, "tests must not reach into benchmarks/ (move what they need to helpers/ or scripts/): " \
        + ", ".join(benchmarks)
