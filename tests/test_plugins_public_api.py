"""Plugins and launchers use the kernel's public API only: no ``virtex.*`` name that starts
with ``_`` is imported (or read as a module attribute) by a module under plugins/,
launchers/ or examples/ (the third-party plugin example)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p for folder in ("plugins", "launchers", "examples") for p in (ROOT / folder).rglob("*.py"))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_kernel_names(source: str) -> list[str]:
    """``module.name`` for each private name of ``virtex.*`` the source imports or reads
    off an imported ``virtex`` module (relative imports, a plugin's own code, are fine)."""
    found: list[str] = []
    modules: dict[str, str] = {}  # local name -> virtex module it is bound to
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
                node.module == "virtex" or node.module.startswith("virtex.")):
            if any(_private(part) for part in node.module.split(".")):
                found.append(node.module)
            for alias in node.names:
                if _private(alias.name):
                    found.append(f"{node.module}.{alias.name}")
                else:
                    modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "virtex":
                    if any(_private(p) for p in parts):
                        found.append(alias.name)
                    modules[alias.asname or parts[0]] = alias.name if alias.asname else "virtex"
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in modules and _private(node.attr)):
            found.append(f"{modules[node.value.id]}.{node.attr}")
    return found


@pytest.mark.parametrize("source, expected", [
    ("from virtex.data.readers import load_json, _field", ["virtex.data.readers._field"]),
    ("from virtex.data.readers import _categories as cats", ["virtex.data.readers._categories"]),
    ("from virtex._private import thing", ["virtex._private"]),
    ("import virtex.data._impl as impl", ["virtex.data._impl"]),
    ("from virtex.data import readers\nreaders._field({}, 'k', int, 'w')",
     ["virtex.data.readers._field"]),
    ("import virtex\nvirtex._STOP.set()", ["virtex._STOP"]),
    ("from virtex.data.readers import json_field\nfrom .datasets import _polygons", []),
    ("from submitit.slurm.slurm import _make_sbatch_string", []),
    ("from virtex import __version__, hookimpl", []),
])
def test_the_check_finds_private_kernel_names(source, expected):
    assert private_kernel_names(source) == expected


def test_modules_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in MODULES}
    assert {"plugins/detection/datasets.py", "plugins/models/__init__.py",
            "launchers/__init__.py", "examples/third_party_plugin/virtex_knn/__init__.py"} <= names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_plugin_or_launcher_imports_a_private_kernel_name(path):
    assert private_kernel_names(path.read_text(encoding="utf-8")) == [], (
        f"{path.relative_to(ROOT)} uses private kernel names: make them public in the kernel")
