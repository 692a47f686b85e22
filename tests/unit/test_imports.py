"""The house rules that can be checked by reading the code: imports only go down.

Walks every module's imports (the AST, nothing is imported): no import
circle among ``rayattr`` modules, every import goes to the same or a lower
layer, and the compute core never imports Ray.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "rayattr"
RAY_FREE = ("rayattr.grads", "rayattr.hessian", "rayattr.score", "rayattr.config", "rayattr.chat", "rayattr.data", "rayattr.model",
            "rayattr.tokenizer", "rayattr.storage", "rayattr.space", "rayattr.codec", "rayattr.store", "rayattr.lease",
            "rayattr.commands", "rayattr.train", "rayattr.lds", "rayattr.report")
# The layers, bottom first; a module (or package) may import its own layer and those below.
LAYERS = (
    ("rayattr", "rayattr.config"),
    ("rayattr.storage", "rayattr.chat", "rayattr.data", "rayattr.model", "rayattr.tokenizer", "rayattr.space",
     "rayattr.fixtures"),
    ("rayattr.configfile", "rayattr.codec", "rayattr.grads"),
    ("rayattr.hessian",),
    ("rayattr.score", "rayattr.topk", "rayattr.lds"),  # lds: the recipe, metagradients, the LDS itself
    ("rayattr.store", "rayattr.commands", "rayattr.lease"),  # lease: one writer per run path
    ("rayattr.search", "rayattr.verify", "rayattr.doctor", "rayattr.train", "rayattr.lds.bank", "rayattr.lds.validate",
     "rayattr.report"),
    ("rayattr.ray",),
    ("rayattr.trackstar",),
    ("rayattr.api", "rayattr.runconfig"),
    ("rayattr.cli", "rayattr.__main__"),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of the file (a function-level import counts)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while (top := stack.pop()) != node:
                component.append(top)
            if component:
                found.append(sorted(component + [node]))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_sees_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_among_rayattr_modules() -> None:
    graph = import_graph()
    assert len(graph) > 30  # the walk found the package
    assert cycles(graph) == []


def layer_of(module: str) -> int:
    """The layer of the longest ``LAYERS`` entry that is ``module`` or a package above it."""
    matches = [(len(name), level) for level, names in enumerate(LAYERS) for name in names
               if module == name or module.startswith(name + ".")]
    assert matches, f"{module} is in no layer: add it to LAYERS"
    return max(matches)[1]


def test_imports_only_go_down() -> None:
    assert layer_of("rayattr.grads.engine") < layer_of("rayattr.store") < layer_of("rayattr.ray.fit") < layer_of("rayattr.cli")
    upward = sorted(f"{module} -> {other}" for module, imported in import_graph().items()
                    for other in imported if layer_of(other) > layer_of(module))
    assert upward == []


def test_compute_core_never_imports_ray() -> None:
    offenders = {
        module: sorted(m for m in imports_of(path) if m == "ray" or m.startswith(("ray.", "rayattr.ray")))
        for path in PACKAGE.rglob("*.py")
        if (module := module_name(path)).startswith(RAY_FREE)
    }
    assert {m: found for m, found in offenders.items() if found} == {}


def test_no_function_level_import_of_rayattr_outside_the_cli() -> None:
    """A lazy import of the project's own code is a circle in disguise; the CLI defers them to start fast."""
    nested = []
    for path in PACKAGE.rglob("*.py"):
        module = module_name(path)
        if module.startswith("rayattr.cli"):
            continue
        tree = ast.parse(path.read_text())
        for function in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(function):
                names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else
                         [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
                nested += [f"{module}:{node.lineno} {name}" for name in names if name.split(".")[0] == "rayattr"]
    assert nested == []
