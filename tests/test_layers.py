"""The import layers: commands above the stages, no stage importing a later one.

Every import of the package's own modules counts, at module level or inside a function (a lazy import
is still a dependency), so moving a command into a stage, or a stage reaching up into a command or a
later stage, fails here with the file and line to change.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LAYERS: list[tuple[str, set[str]]] = [
    (
        "base",
        {
            "retro_platform",
            "errors",
            "typed",
            "output",
            "storage",
            "node_cache",
            "config",
            "ray_utils",
            "overlap",
        },
    ),
    ("database", {"db"}),
    ("pool, checkpoints, tracking", {"neighbors", "checkpoints", "tracking"}),
    ("training and generation", {"train", "generation"}),
    ("model service", {"serve"}),
    ("commands", {"commands", "cli"}),
]
"""Bottom first: a module may import its own layer and the layers below. Within a layer, the parts
do not import one another, except in the layers of ``SHARED``."""

SHARED = {"base", "commands"}
"""Layers whose parts may import one another: the base helpers, and the commands (the demo runs the
other commands)."""


def part_of(module: str) -> str:
    """'retro_platform.db.store' -> 'db'; the package itself -> 'retro_platform'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def layer_of(module: str) -> int:
    """Index in LAYERS of the module's part."""
    part = part_of(module)
    for index, (_, parts) in enumerate(LAYERS):
        if part in parts:
            return index
    raise AssertionError(f"{module} belongs to no layer: add {part!r} to LAYERS in tests/test_layers.py")


def module_name(path: Path) -> str:
    """The dotted module name of a file under ROOT."""
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def imported_modules(path: Path) -> list[tuple[str, int]]:
    """(module, line) of every retro_platform / retro_model import in the file, lazy ones included;
    ``from retro_platform import storage`` names the submodule when there is one."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                as_file = ROOT / Path(*candidate.split("."))
                is_module = as_file.with_suffix(".py").exists() or (as_file / "__init__.py").exists()
                found.append((candidate if is_module else node.module, node.lineno))
    return [(m, line) for m, line in found if m.split(".")[0] in ("retro_platform", "retro_model")]


def package_files(package: str) -> list[Path]:
    """The package's Python files."""
    return sorted((ROOT / package).rglob("*.py"))


def test_every_part_of_the_platform_has_a_layer():
    parts = {part_of(module_name(path)) for path in package_files("retro_platform")}
    for part in sorted(parts):
        layer_of(f"retro_platform.{part}")


def layer_violations(path: Path) -> list[str]:
    """Imports of ``path`` that go up a layer, or sideways between parts of a layer other than the
    commands."""
    me = module_name(path)
    mine = layer_of(me)
    problems = []
    for module, line in imported_modules(path):
        if module.startswith("retro_model"):
            continue  # the model package sits below the whole platform
        theirs = layer_of(module)
        sideways = theirs == mine and part_of(module) != part_of(me) and LAYERS[mine][0] not in SHARED
        if theirs > mine or sideways:
            problems.append(
                f"{path.relative_to(ROOT)}:{line}: {me} ({LAYERS[mine][0]}) imports {module} "
                f"({LAYERS[theirs][0]})"
            )
    return problems


@pytest.mark.parametrize("path", package_files("retro_platform"), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_a_later_layer(path):
    assert not layer_violations(path)


def test_the_model_package_needs_only_torch():
    problems = [
        f"{path.relative_to(ROOT)}:{line}: imports {module}"
        for path in package_files("retro_model")
        for module, line in imported_modules(path)
        if module.startswith("retro_platform")
    ]
    assert not problems


def test_the_check_sees_a_lazy_upward_import(tmp_path, monkeypatch):
    """A stage that imports a command inside a function is caught (the check can fail)."""
    fake_root = tmp_path
    (fake_root / "retro_platform" / "db").mkdir(parents=True)
    (fake_root / "retro_platform" / "commands").mkdir()
    for folder in ("retro_platform", "retro_platform/db", "retro_platform/commands"):
        (fake_root / folder / "__init__.py").write_text("")
    (fake_root / "retro_platform" / "commands" / "train.py").write_text("")
    stage = fake_root / "retro_platform" / "db" / "store.py"
    stage.write_text("def f():\n    from retro_platform.commands import train\n")
    monkeypatch.setitem(globals(), "ROOT", fake_root)
    (problem,) = layer_violations(stage)
    assert "retro_platform/db/store.py:2" in problem and "retro_platform.commands.train" in problem
