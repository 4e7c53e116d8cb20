"""The package's modules import each other without cycles: every import counts, those inside
functions and under ``TYPE_CHECKING`` too, since an import deferred into a function hides a
cycle rather than removing it."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Source folder → package, as pyproject.toml maps them.
PACKAGES = {"sw": "npugen", "hw": "npugen.hw", "sim": "npugen.sim", "boards": "npugen.boards"}


def package_modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    modules = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def imports_of(name: str, source: str, modules: dict[str, Path], *,
               is_package: bool = False) -> set[str]:
    """The package modules that module ``name`` (``source``) imports: ``from X import y``
    names the submodule X.y where there is one, else X; relative imports resolved."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module
            targets = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in modules else stem
                       for alias in node.names]
        else:
            continue
        for target in targets:
            # ``import npugen.sim.runner`` binds npugen but loads npugen.sim.runner.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imports_of(name, path.read_text(), modules,
                             is_package=path.name == "__init__.py")
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as its modules in import order (first repeated last), or None."""
    state: dict[str, int] = {}   # 1: on the current path, 2: explored, no cycle through it
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_imports_found_everywhere_and_resolved():
    modules = dict.fromkeys(["npugen", "npugen.job", "npugen.hw", "npugen.hw.npu",
                             "npugen.sim", "npugen.sim.runner", "npugen.sim.pysim"])
    source = """
import numpy
import npugen.sim.runner
from . import runner
from .. import hw
from ..hw import Npu
if TYPE_CHECKING:
    from npugen.job import Job

def simulate():
    from ..hw.npu import Npu
"""
    assert imports_of("npugen.sim.pysim", source, modules) == {
        "npugen.sim.runner", "npugen.hw", "npugen.job", "npugen.hw.npu"}
    assert imports_of("npugen.hw", "from .npu import Npu\nfrom . import npu", modules,
                      is_package=True) == {"npugen.hw.npu"}


def test_find_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]


def test_no_import_cycles():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, f"modules import each other in a cycle: {' -> '.join(cycle)}"


#: The modules that may import the driver: the runtime, the one place a target is chosen
#: by name (open_target), and what sits above it (the package's npugen.Device, the command
#: line); the link benchmark and the netlist check drive a Device's link themselves (raw
#: writes, UPTIME, a timeout of their own).
DRIVER_IMPORTERS = {"npugen", "npugen.runtime", "npugen.cli", "npugen.bench.link",
                    "npugen.sim.netlist"}


def test_only_the_runtime_and_what_is_above_it_import_the_driver():
    importers = {name for name, targets in import_graph().items() if "npugen.driver" in targets}
    assert importers <= DRIVER_IMPORTERS, (
        f"{', '.join(sorted(importers - DRIVER_IMPORTERS))} import the driver: open a device "
        f"through npugen.runtime.open_target instead")
