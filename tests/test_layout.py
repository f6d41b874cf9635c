"""The module map in ARCHITECTURE.md is the code's: every module listed and no other, the import
rule between layers, no import cycle (imports inside functions count), a module over 400 lines
a warning and none over 600: a gate that fails at the size a module should be split at shapes
files by their length (code moved by size, formatting packed), not by what belongs together."""

from __future__ import annotations

import ast
import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "segray"
WARN_LINES, MAX_LINES = 400, 600


def _block(name: str) -> list[str]:
    text = (ROOT / "ARCHITECTURE.md").read_text()
    match = re.search(rf"```{name}\n(.*?)```", text, re.S)
    assert match, f"ARCHITECTURE.md has no ```{name} block"
    return [line for line in match.group(1).splitlines() if line.strip()]


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """segray modules ``path`` imports, at module level, inside functions or only for type
    checkers (``TYPE_CHECKING``: a type in the wrong module is a cycle all the same); ``from pkg
    import mod`` counts as importing ``pkg.mod``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("segray"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("segray"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    names = set(modules)
    return {name: imports_of(path, names) - {name} for name, path in modules.items()}


def _unit(module: str, layers: list[tuple[str, list[str]]]) -> tuple[int, str]:
    """``(layer index, unit)`` of a module: the layer listing it or its package."""
    for index, (_, units) in enumerate(layers):
        for unit in units:
            if module == unit or module.startswith(unit + "."):
                return index, unit
    raise AssertionError(f"{module} is in no layer of ARCHITECTURE.md")


def test_module_map_lists_every_module_and_only_those():
    listed = {line.split()[0] for line in _block("modules")}
    actual = set(_modules()) - {"segray", "segray.io", "segray.inference", "segray.train"}
    actual -= {"segray.bulk", "segray.serve", "segray.evaluate", "segray.devtools"}
    actual -= {"segray.devtools.bench", "segray.models", "segray.datasets"}
    assert listed == actual, (sorted(actual - listed), sorted(listed - actual))


def test_imports_follow_the_layers():
    layers = [(line.split(":")[0], line.split(":")[1].split()) for line in _block("layers")]
    bad = []
    for module, targets in _graph().items():
        if module == "segray":
            continue
        layer, unit = _unit(module, layers)
        for target in targets:
            if target == "segray":
                bad.append(f"{module} imports the segray package itself")
                continue
            t_layer, t_unit = _unit(target, layers)
            if t_unit != unit and t_layer >= layer:
                bad.append(f"{module} ({layers[layer][0]}) imports {target} ({layers[t_layer][0]})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                walk(nxt, [*stack, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    # a package's __init__ that re-exports its modules is no cycle: its modules never import it
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.name)
def test_module_size(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines (> {MAX_LINES})"
    if lines > WARN_LINES:
        warnings.warn(f"{path.relative_to(ROOT)} has {lines} lines: split it", stacklevel=1)


def test_the_checker_sees_imports_inside_functions_and_for_type_checkers(tmp_path):
    # the graph must count what a function imports, and what only type checkers read
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from segray.bulk import job\n"
        "def f():\n    from segray.io import storage\n    import segray.train.loop\n"
    )
    found = imports_of(source, {"segray.io.storage", "segray.bulk.job", "segray.train.loop"})
    assert found == {"segray.io.storage", "segray.train.loop", "segray.bulk.job"}
