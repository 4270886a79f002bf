"""The package's layers, checked from the source: every module imports on its own, no import cycles, and no
lower layer imports a higher one (ARCHITECTURE.md), counting imports inside functions too.

Layer order: io → physics → tasks (+ recipe) → data/models → diffusion → baselines/evaluation → pipeline →
review → cli.
``medidiff.tracking`` (MLflow) is used by the layers that run and read tracked jobs and imports no layer.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "medidiff"

# rank of each top-level part of the package; a module may import only parts of lower or equal rank
LAYERS: dict[str, int] = {
    "io": 0,
    "physics": 1,
    "tasks": 2,
    "recipe": 2,
    "metrics": 2,
    "data": 3,
    "models": 3,
    "diffusion": 4,
    "baselines": 5,
    "evaluation": 5,
    "pipeline": 6,
    "review": 7,
    "cli": 8,
    "__main__": 8,
}
TRACKING = "tracking"
TRACKING_USERS = {"diffusion", "evaluation", "pipeline", "review", "cli", "__main__"}


def module_names() -> list[str]:
    """Every module of the package, as dotted names (packages by their ``__init__``)."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    return names


def module_path(name: str) -> Path:
    base = ROOT.joinpath(*name.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def imports_of(name: str) -> Iterator[tuple[str, int]]:
    """(imported medidiff module, line) for every import statement in the module, also inside functions.

    ``from pkg import name`` counts as importing ``pkg.name`` when that is a module, else ``pkg``.
    """
    path = module_path(name)
    is_package = path.name == "__init__.py"
    known = set(module_names())
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "medidiff":
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "medidiff":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield (sub if sub in known else base), node.lineno


def part(module: str) -> str:
    """The top-level part of the package a module belongs to ('' for the package itself)."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else ""


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def import_graph() -> dict[str, set[str]]:
    return {name: {target for target, _ in imports_of(name) if target != name} for name in module_names()}


def test_every_part_of_the_package_has_a_layer() -> None:
    parts = {part(name) for name in module_names()} - {"", TRACKING}
    assert not parts - set(LAYERS), f"place these in LAYERS (ARCHITECTURE.md's order): {parts - set(LAYERS)}"


def describe(cycles: list[list[str]], key: Callable[[str], str]) -> str:
    """Each cycle with the import statements (file:line) that close it."""
    lines = []
    for cycle in cycles:
        lines.append(" <-> ".join(cycle))
        for source in module_names():
            for target, line in imports_of(source):
                if key(source) in cycle and key(target) in cycle and key(source) != key(target):
                    lines.append(f"    {module_path(source).relative_to(ROOT)}:{line} imports {target}")
    return "\n".join(dict.fromkeys(lines))


def test_no_import_cycle_between_modules() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles among medidiff's modules:\n" + describe(cycles, lambda m: m)


def test_no_import_cycle_between_layers() -> None:
    graph: dict[str, set[str]] = {}
    for source, targets in import_graph().items():
        graph.setdefault(part(source), set()).update(part(t) for t in targets if part(t) != part(source))
    cycles = find_cycles(graph)
    assert not cycles, "import cycles among medidiff's layers:\n" + describe(cycles, part)


def test_lower_layers_never_import_higher_ones() -> None:
    wrong = []
    for source in module_names():
        src_part = part(source)
        for target, line in imports_of(source):
            dst_part = part(target)
            if dst_part in ("", src_part):
                continue
            if dst_part == TRACKING:
                ok = src_part in TRACKING_USERS
            elif src_part == TRACKING:
                ok = False
            else:
                ok = LAYERS.get(dst_part, -1) <= LAYERS.get(src_part, -1)
            if not ok:
                wrong.append(f"{module_path(source).relative_to(ROOT)}:{line} {source} imports {target}")
    assert not wrong, "imports against the layer order:\n" + "\n".join(dict.fromkeys(wrong))


_IMPORT_EACH = r"""
import ast, importlib, json, os, sys, traceback
from pathlib import Path

root, modules = Path(sys.argv[1]), json.loads(sys.argv[2])
# Third-party libraries the package imports at module level are loaded once here, so that each child below
# (a fork of this interpreter) starts without any medidiff module but does not pay for torch again.
for path in (root / "medidiff").rglob("*.py"):
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
        for top in {n.split(".")[0] for n in names} - {"medidiff", "__future__"}:
            try:
                importlib.import_module(top)
            except Exception:
                pass
assert not [m for m in sys.modules if m == "medidiff" or m.startswith("medidiff.")]
failures = {}
for module in modules:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(module)
            code = 0
        except BaseException:
            os.write(write, traceback.format_exc()[-3000:].encode())
            code = 1
        os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        message = pipe.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if status != 0:
        failures[module] = message or f"exit status {status}"
print(json.dumps(failures))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="imports each module in a forked fresh interpreter")
def test_every_module_imports_in_a_fresh_interpreter() -> None:
    """Each module imports on its own, first of medidiff's modules in its interpreter.

    So no module depends on what was imported before it.
    """
    modules = [m for m in module_names() if m != "medidiff.__main__"]  # __main__ runs the command
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, str(ROOT), json.dumps(modules)],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failures, "modules that fail to import on their own:\n" + "\n\n".join(
        f"{m}:\n{tb}" for m, tb in failures.items()
    )
