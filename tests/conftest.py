"""Shared pytest fixtures, and the one rule for tests that need a program or service the
machine may lack (SLURM, Chromium, Java, ...).

``@pytest.mark.requires("PROGRAM", how="how to get it")`` runs the test only when PROGRAM is
on ``PATH``; a test that needs more than a program (a SLURM that answers) calls the
``unavailable`` fixture's function. Either way the test is SKIPPED with a reason saying what
is missing and how to get it, so ``python -m pytest`` passes on a fresh machine; with
``VIRTEX_TEST_REQUIRE=all`` (``.ci/run`` sets it), or a comma-separated list of names
(``VIRTEX_TEST_REQUIRE=sinfo,chromium``), such a skip is a FAILURE instead, so CI runs them.
"""

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest
import torch

from virtex.tools.make_shapes import generate

REQUIRE_ENV = "VIRTEX_TEST_REQUIRE"


def required(name: str) -> bool:
    """Whether a missing ``name`` must fail the test ($VIRTEX_TEST_REQUIRE: 'all' or names)."""
    names = {n.strip() for n in os.environ.get(REQUIRE_ENV, "").split(",") if n.strip()}
    return "all" in names or name in names


def unavailable_here(name: str, why: str) -> NoReturn:
    """Skip the running test because ``name`` is missing (``why``: what and how to get it),
    or fail it where ``name`` is required."""
    if required(name):
        pytest.fail(f"{name} is required ({REQUIRE_ENV}={os.environ[REQUIRE_ENV]}) but "
                    f"unavailable: {why}", pytrace=False)
    pytest.skip(f"{name} unavailable: {why}")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "requires(program, how): needs PROGRAM on PATH; skipped without it (a "
        f"failure under {REQUIRE_ENV}=all), the reason saying how to get it")


@pytest.hookimpl(tryfirst=True)  # before any fixture of the test is set up
def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("requires"):
        program = mark.args[0]
        if shutil.which(program) is None:
            unavailable_here(program, f"'{program}' is not on PATH; {mark.kwargs['how']}")


@pytest.fixture(scope="session")
def unavailable() -> Callable[[str, str], NoReturn]:
    """``unavailable(name, why)``: skip (or, where required, fail) for a missing service."""
    return unavailable_here


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
