"""``python -m virtex.report RUN_DIR``: the paper's table and the curves of real runs."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from browser import chromium, probed_dom
from cli import REPO, run_cli, tiny_pretrain
from PIL import Image

from virtex import report

pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def workflow(tmp_path_factory, shapes_root) -> Path:
    """A pretraining run with checkpoints at steps 2, 4, 6 and a VOC07 sweep over them."""
    root = tmp_path_factory.mktemp("workflow")
    env = {"VIRTEX_CACHE": str(root / "cache")}
    spec, params = tiny_pretrain(root, shapes_root / "coco", max_steps=6, warmup_steps=1,
                                 checkpoint_every=2, keep_every=2, log_every=1)
    res = run_cli(str(spec), *params, "--run_dir", str(root / "pretrain"), env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    voc = [f"data_root={shapes_root / 'VOC2007'}", "backbone=@backbones.resnet18",
           "image_size=32", "resize=37", "num_workers=0", f"ckpt={root / 'pretrain/checkpoints'}"]
    res = run_cli("downstream/voc07", "--run_dir", str(root / "voc07"),
                  *[a for p in voc for a in ("--gin_param", p)], env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    return root


@pytest.mark.slow
def test_report_of_a_pretraining_run_and_its_sweep(workflow):
    res = subprocess.run([sys.executable, "-m", "virtex.report", str(workflow)],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr
    with open(workflow / "voc07" / "sweep.csv", newline="") as f:
        sweep = {int(r["step"]): float(r["voc07/mAP"]) for r in csv.DictReader(f)}
    assert sorted(sweep) == [2, 4, 6]
    best = max(sweep.items(), key=lambda kv: (kv[1], kv[0]))
    md = (workflow / "report.md").read_text()
    assert md in res.stdout
    assert f"Chosen checkpoint: step {best[0]} (best VOC07 mAP)" in md
    assert f"| VOC07 linear SVM, mAP | {best[1]:.2f} | — |" in md  # no published L1_H64 model
    assert "backbone resnet18" in md and "textual_size L1_H64_A2_F128" in md
    for name in ("loss", "lr", "voc07_map"):
        with Image.open(workflow / "report" / f"{name}.png") as image:
            assert image.size == (600, 320)
            assert len(image.convert("RGB").getcolors(1 << 16)) > 20  # lines drawn, not blank


def test_paper_numbers_come_from_the_published_model_of_the_same_architecture(tmp_path):
    res = run_cli("pretrain/width/bicap_r50_L1_H1024", "--print_config")
    assert res.returncode == 0, res.stderr
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.gin").write_text(res.stdout)
    (run / "metrics.json").write_text(json.dumps({"imagenet/top1": 49.5, "imagenet/top5": 75.0}))
    rows = report.table(report.collect(tmp_path))
    assert ("ImageNet linear, top-1", "49.50", "50.6") in rows
    assert ("imagenet/top5", "75.00", "—") in rows
    assert report.collect(tmp_path).model.name == "bicaptioning_R_50_L1_H1024"


def test_a_directory_without_runs_is_one_error(tmp_path):
    res = subprocess.run([sys.executable, "-m", "virtex.report", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip() == (f"virtex: error: report: '{tmp_path}' holds no run (no "
                                  "config.gin, metrics.json or sweep.csv under it)")


@pytest.mark.slow
@pytest.mark.requires("chromium", how="install Chromium (apt-get install -y chromium) to run "
                                     "the report rendering test")
def test_browser_chromium_shows_the_table_and_figures(workflow, tmp_path):
    """BROWSER TEST: renders report.html in headless Chromium (``chromium`` on PATH)."""
    report.write(workflow)
    page = workflow / "report.html"
    dom = probed_dom(page, tmp_path / "profile")
    assert 'data-probed="3"' in dom, dom[-2000:]
    widths = [int(w) for w in re.findall(r'data-natural-width="(\d+)"', dom)]
    assert widths == [600, 600, 600]
    assert "VOC07 linear SVM, mAP" in dom and "<table id=\"results\">" in dom
    shot = tmp_path / "report.png"
    chromium(tmp_path / "profile", f"--screenshot={shot}", page.as_uri(), window="1200,1400")
    with Image.open(shot) as image:
        assert image.size == (1200, 1400)
        assert len(image.convert("RGB").resize((120, 140)).getcolors(20000)) > 50  # not blank
