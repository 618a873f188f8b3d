"""conftest's rule for tests that need a program or service: skipped with a reason saying
how to get it, a failure under VIRTEX_TEST_REQUIRE. Checked by running real tests of this
suite in a child pytest whose PATH lacks Chromium and SLURM."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli import REPO

CHROMIUM_TEST = "tests/test_caption_folder.py::test_browser_chromium_shows_images_beside_captions"
SLURM_TEST = "tests/test_slurm.py::test_checkpoint_directory_and_a_sweep_become_a_job_array"


def _pytest(path_dir: Path, require: str | None) -> subprocess.CompletedProcess:
    """The two tests in a child pytest with ``PATH=path_dir`` only."""
    env = {k: v for k, v in os.environ.items() if k != "VIRTEX_TEST_REQUIRE"}
    env["PATH"] = str(path_dir)
    if require is not None:
        env["VIRTEX_TEST_REQUIRE"] = require
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rsE", "-p", "no:cacheprovider",
                           CHROMIUM_TEST, SLURM_TEST], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def test_missing_programs_skip_with_how_to_get_them(tmp_path):
    bare = tmp_path / "bin"
    bare.mkdir()
    # a SLURM client whose controller is down: on PATH, but the service does not answer
    sinfo = bare / "sinfo"
    sinfo.write_text("#!/bin/sh\necho 'slurm_load_partitions: Unable to contact slurm "
                     "controller' >&2\nexit 1\n")
    sinfo.chmod(0o755)
    res = _pytest(bare, require=None)
    out = res.stdout
    assert res.returncode == 0 and "2 skipped" in out, out[-3000:]
    assert "chromium unavailable: 'chromium' is not on PATH; install Chromium " \
           "(apt-get install -y chromium)" in out
    assert "sinfo unavailable: SLURM does not answer" in out and "Unable to contact" in out
    assert "bash .ci/slurm.sh start" in out


@pytest.mark.slow
def test_required_programs_fail_instead(tmp_path):
    bare = tmp_path / "empty"
    bare.mkdir()
    res = _pytest(bare, require="all")  # what .ci/run sets
    out = res.stdout
    assert res.returncode == 1 and "2 errors" in out, out[-3000:]  # failed in setup
    assert "chromium is required (VIRTEX_TEST_REQUIRE=all) but unavailable: 'chromium' is " \
           "not on PATH" in out
    assert "sinfo is required (VIRTEX_TEST_REQUIRE=all) but unavailable: 'sinfo' is not on " \
           "PATH; `bash .ci/slurm.sh start`" in out

    res = _pytest(bare, require="sinfo")  # only the named ones
    out = res.stdout
    assert res.returncode == 1 and "1 skipped, 1 error" in out, out[-3000:]
    assert "sinfo is required (VIRTEX_TEST_REQUIRE=sinfo)" in out
    assert "chromium unavailable" in out


def test_ci_requires_every_test_to_run():
    script = (REPO / ".ci" / "run").read_text()
    assert "export VIRTEX_TEST_REQUIRE=all" in script
