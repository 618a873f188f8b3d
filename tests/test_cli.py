"""``python -m virtex.run``: each mistake a user makes gets one clear line and exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli import REPO, run_cli


def _spec(tmp_path: Path, text: str, name: str = "s.gin") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _one_line_error(res, *needles: str) -> str:
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("virtex: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in res.stderr
    return lines[0]


BASE = """
ckpt = %gin.REQUIRED
experiment.backbone = @backbones.resnet18
experiment.ckpt = %ckpt
"""


def test_unknown_spec(tmp_path):
    _one_line_error(run_cli("specs/nope/missing.gin", cwd=tmp_path), "unknown spec", "missing.gin")


def test_spec_syntax_error_names_file_and_line(tmp_path):
    spec = _spec(tmp_path, "experiment.seed_list = [1, 2\nexperiment.ckpt = None\n")
    _one_line_error(run_cli(str(spec), cwd=tmp_path), "syntax error", str(spec))


def test_unknown_component_lists_close_matches_and_available(tmp_path):
    spec = _spec(tmp_path, "experiment.backbone = @backbones.resnt18\n")
    line = _one_line_error(run_cli(str(spec), cwd=tmp_path), "unknown backbones 'resnt18'",
                           "Did you mean: resnet18", "Available backbones:")
    assert "resnet50" in line and f"{spec}:1" in line


def test_missing_required_value_is_named(tmp_path):
    spec = _spec(tmp_path, BASE)
    _one_line_error(run_cli(str(spec), cwd=tmp_path), "ckpt", "--gin_param ckpt=")


def test_gin_param_for_an_unknown_macro(tmp_path):
    spec = _spec(tmp_path, BASE)
    _one_line_error(run_cli(str(spec), "--gin_param", "ckp=a.pt", cwd=tmp_path),
                    "unknown binding 'ckp'", "Did you mean: ckpt")


def test_gin_param_for_an_unknown_parameter(tmp_path):
    spec = _spec(tmp_path, BASE)
    _one_line_error(
        run_cli(str(spec), "--gin_param", "ckpt=a.pt", "--gin_param", "backbones.resnet18.depth=3",
                cwd=tmp_path),
        "backbones.resnet18.depth=3", "doesn't have a parameter named 'depth'")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04 truncated"])
def test_unreadable_checkpoint(tmp_path, content):
    (tmp_path / "bad.pt").write_bytes(content)
    spec = _spec(tmp_path, BASE)
    _one_line_error(run_cli(str(spec), "--gin_param", "ckpt=bad.pt", cwd=tmp_path),
                    "bad.pt", "unreadable")


def test_missing_checkpoint(tmp_path):
    spec = _spec(tmp_path, BASE)
    _one_line_error(run_cli(str(spec), "--gin_param", "ckpt=runs/none.pt", cwd=tmp_path),
                    "runs/none.pt", "does not exist")


def test_unknown_launcher(tmp_path):
    spec = _spec(tmp_path, BASE)
    _one_line_error(run_cli(str(spec), "--launcher", "lokal", cwd=tmp_path),
                    "unknown launchers 'lokal'", "Did you mean: local")


def test_unknown_flag_of_the_local_launcher(tmp_path):
    spec = _spec(tmp_path, BASE)
    _one_line_error(run_cli(str(spec), "--slurm_partition", "gpu", cwd=tmp_path),
                    "unrecognized arguments: --slurm_partition gpu")


def test_a_spec_runs_again_where_its_first_run_was_written(tmp_path):
    """The working directory's run folder ``runs/`` (a namespace package to Python) does not
    break the paper specs' ``include 'runs/....gin'`` (the quickstart's second run did)."""
    (tmp_path / "runs" / "quickstart").mkdir(parents=True)
    res = run_cli(str(REPO / "specs" / "quickstart.gin"), "--print_config", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "experiment.backbone" in res.stdout


def test_print_config_runs_nothing(tmp_path):
    spec = _spec(tmp_path, BASE)
    res = run_cli(str(spec), "--gin_param", "ckpt=runs/a.pt", "--print_config", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "ckpt = 'runs/a.pt'" in res.stdout
    assert "experiment.backbone = @backbones.resnet18" in res.stdout
    assert not (tmp_path / "runs").exists()
