"""Shared pytest fixtures."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from virtex.tools.make_shapes import generate


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic captioned-shapes tree (60 scenes, seed 0) in every dataset format."""
    return generate(tmp_path_factory.mktemp("shapes"), images=60, seed=0)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module: tiny models and images run fastest so, as in a
    DataLoader worker, and do not fight the test's other processes on a small machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``$VIRTEX_CACHE`` in this test's own directory (features, vocabularies, datasets)."""
    monkeypatch.setenv("VIRTEX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
