"""Shared pytest fixtures."""

from pathlib import Path

import pytest

from virtex.tools.make_shapes import generate


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic captioned-shapes tree (60 scenes, seed 0) in every dataset format."""
    return generate(tmp_path_factory.mktemp("shapes"), images=60, seed=0)
