"""The worked third-party plugin: pip-installed, found through its entry point, run by spec name."""

from __future__ import annotations

import json
import subprocess
import sys

from cli import REPO, run_cli


def test_third_party_evaluator_installs_and_runs(tmp_path):
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(REPO / "examples" / "third_party_plugin")],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stderr
    env = {"VIRTEX_CACHE": str(tmp_path / "cache")}

    listed = run_cli("--list", pythonpath=[site], env=env)
    assert listed.returncode == 0, listed.stderr
    assert "evaluators.knn" in listed.stdout and "(plugin: knn)" in listed.stdout
    assert "knn_shapes" in listed.stdout  # its spec dir is registered too

    run_dir = tmp_path / "run"
    res = run_cli("knn_shapes", "--run_dir", str(run_dir), "--gin_param", "evaluators.knn.k=5",
                  cwd=tmp_path, pythonpath=[site], env=env)
    assert res.returncode == 0, res.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # 20 classes: chance is 5%; even random features of coloured shapes do better
    assert 5.0 < metrics["knn/top1"] <= 100.0
    assert "knn/top1" in res.stdout
    assert "knn.k = 5" in (run_dir / "operative_config.gin").read_text()
