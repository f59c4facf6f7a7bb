"""The structure the code promises (docs/architecture.md): the router loads no torch, and the
services' packages import each other only downwards, through the layers of the module map."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_router_imports_no_torch():
    """Its image has no torch (tests/deploy/test_dockerfiles.py); `--help` imports what serving
    imports at the top of every router module, and neither torch nor transformers (which would
    import torch when it is installed) is among them."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "services.router", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "services.router.server" in imported and "services.engine.config" in imported  # the check sees them
    assert not {m for m in imported if m.split(".")[0] in ("torch", "transformers", "triton")}


def _module_name(path: str) -> str:
    name = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".")
    return name.removesuffix(".__init__")


def _imports(path: str, module: str, modules: set[str]) -> set[str]:
    """The project modules `module` imports anywhere in its body (function-level imports included),
    except those under `if TYPE_CHECKING:` (never executed)."""
    tree = ast.parse(open(path).read())
    skipped = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
        for child in node.body
        for n in ast.walk(child)
    }
    is_package = path.endswith("__init__.py")
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - (node.level - (1 if is_package else 0))]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names = [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(n for n in names if n in modules and n != module)
    return found


# docs/architecture.md's module map, top to bottom: a package imports only its own layer's modules
# and those of layers below it (the workers, in one layer, not each other).
LAYERS = [
    ["services.cli"],
    ["services.launcher"],
    ["services.router"],
    ["services.prefill", "services.decode", "services.colocated"],
    ["services.planner"],
    ["services.runtime"],
    ["services.kvstore"],
    ["services.engine"],
    ["services.tiny_models"],
    ["services.common"],
]


def _layer(module: str) -> tuple[int, str]:
    for index, packages in enumerate(LAYERS):
        for package in packages:
            if module == package or module.startswith(package + "."):
                return index, package
    raise AssertionError(f"{module} is in no layer of the module map")


def _graph() -> dict[str, set[str]]:
    paths = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "services")):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(folder, file)
                paths[_module_name(path)] = path
    return {module: _imports(path, module, set(paths)) for module, path in paths.items()}


def test_packages_import_only_downwards():
    graph = _graph()
    assert graph["services.cli.main"] >= {"services.cli.up", "services.planner.cli"}  # the graph is real
    wrong = []
    for module, deps in graph.items():
        if module == "services":
            continue
        (layer, package) = _layer(module)
        for dep in deps:
            dep_layer, dep_package = _layer(dep)
            if dep_layer < layer or (dep_layer == layer and dep_package != package):
                wrong.append(f"{module} imports {dep}")
    assert not wrong, "imports against the module map:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles_between_the_services_modules():
    graph = _graph()
    state: dict[str, str] = {}  # module -> "open" while on the path, "done" after

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                cycle = path[path.index(dep) :] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
