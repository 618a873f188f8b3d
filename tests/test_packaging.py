"""Packaging: plugins/, launchers/ and specs/ install under virtex.*, nothing generic at top level."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile

import pytest
from cli import REPO


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_package_directory_is_listed():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    mapping = {"plugins": "virtex.plugins", "launchers": "virtex.launchers", "specs": "virtex.specs",
               "virtex": "virtex"}
    for top, pkg in mapping.items():
        for init in (REPO / top).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / top).parts
            assert ".".join((pkg, *rel)) in listed, f"{init.parent} is not in pyproject packages"


def test_builtin_plugins_use_the_public_entry_point_group():
    eps = _pyproject()["project"]["entry-points"]["virtex"]
    assert eps["models"] == "virtex.plugins.models" and eps["launchers"] == "virtex.launchers"
    assert all(v.startswith("virtex.") for v in eps.values())


@pytest.mark.slow
def test_wheel_has_no_generic_top_level_names(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                          "--no-build-isolation", "-w", str(tmp_path), str(REPO)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    (wheel,) = tmp_path.glob("virtex-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops <= {"virtex", next(t for t in tops if t.endswith(".dist-info"))}, tops
    assert "virtex/plugins/models/__init__.py" in names
    assert "virtex/launchers/local.py" in names
    assert "virtex/specs/pretrain/bicap_r50.gin" in names
    assert "virtex/specs/quickstart.gin" in names
    assert "virtex/specs/runs/transfer.gin" in names  # nested spec dirs are packaged
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[virtex]" in text and "models = virtex.plugins.models" in text
