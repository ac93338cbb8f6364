"""Which modules may import which: the pipeline's stage order, and no import cycles.

Stages, lowest first (a module imports only from its own stage or lower ones):
foundations (file formats, metrics, losses, allocator, classical deconvolution) -> physics (optics,
phantoms, noise) -> data, networks, stability, simulation, sharp domain -> training (engine,
handlers) -> inference, distributed training -> front ends (evaluate, out-of-core, own data, napari).
Imports inside functions count too.
"""

from __future__ import annotations

import ast

from conftest import ROOT

STAGES = [
    {"errors", "flags", "allocator", "ops", "io", "metrics", "losses", "image_pool", "sampling", "classical"},
    {"physics"},
    {"data", "networks", "stability", "simulate", "sharp_domain"},
    {"engine", "handlers"},
    {"inference", "distributed"},
    {"evaluate", "ooc", "own_data", "viewer"},
]


def _unit(module: str) -> str:
    """``bundle.inference.windows`` -> ``inference`` (a sub-package is one unit)."""
    return module.split(".")[1]


def _imports() -> dict[str, set[str]]:
    """``{file's module: bundle modules it imports}``, from every import statement in ``bundle/``."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / "bundle").rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bundle"):
                targets.add(node.module)
                targets.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("bundle"))
        found[module] = {t for t in targets if t.count(".") >= 1}
    return found


def test_every_bundle_module_has_a_stage():
    units = {_unit(m) for m in _imports() if m != "bundle"}
    staged = set().union(*STAGES)
    assert units <= staged, f"modules without a stage: {sorted(units - staged)}"


def test_modules_import_only_from_their_stage_or_below():
    stage = {u: i for i, units in enumerate(STAGES) for u in units}
    upward = []
    for module, targets in _imports().items():
        if module == "bundle":  # the package's face imports everything
            continue
        for t in targets:
            unit = _unit(t)
            if unit in stage and stage[unit] > stage[_unit(module)]:
                upward.append(f"{module} -> {t}")
    assert not upward, "imports that run up the stages:\n" + "\n".join(sorted(upward))


def test_no_import_cycles_between_units():
    edges: dict[str, set[str]] = {}
    for module, targets in _imports().items():
        if module == "bundle":
            continue
        edges.setdefault(_unit(module), set()).update(_unit(t) for t in targets if _unit(t) != _unit(module))

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(u for u in edges if u in reach(u))
    assert not cycles, f"units on an import cycle: {cycles}"


def test_no_module_is_over_300_lines():
    """A module that outgrows one job is split by job (docs/architecture.md, "Conventions")."""
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in (ROOT / "bundle").rglob("*.py")}
    assert sizes, "no modules found"
    too_long = {name: n for name, n in sizes.items() if n > 300}
    assert not too_long, f"modules over 300 lines: {too_long}"
