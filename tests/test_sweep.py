"""Checkpoint sweeps: ``ckpt=<directory>`` is one run per checkpoint (virtex.plan), each new
one evaluated once; the curve goes to sweep.csv and tensorboard."""

from __future__ import annotations

import csv
import json

import pytest
from cli import tiny_pretrain
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from virtex.evaluation import features
from virtex.run import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_sweep_evaluates_each_checkpoint_once_and_writes_the_curve(shapes_root, tmp_path,
                                                                   monkeypatch, capsys):
    monkeypatch.setenv("VIRTEX_CACHE", str(tmp_path / "cache"))
    spec, params = tiny_pretrain(tmp_path, shapes_root / "coco", batch_size=4, max_steps=6,
                                 warmup_steps=1, checkpoint_every=2, keep_last=10, cpu_threads=1)
    pretrain = [str(spec), "--run_dir", str(tmp_path / "pretrain"), *params]
    assert main(pretrain) == 0
    ckpts = tmp_path / "pretrain" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "step_0000002.pt", "step_0000004.pt", "step_0000006.pt"]

    extracted = []
    real_extract = features.extract_features

    def counting_extract(backbone, paths, *args, **kwargs):
        extracted.append(len(paths))
        return real_extract(backbone, paths, *args, **kwargs)

    monkeypatch.setattr(features, "extract_features", counting_extract)
    out = tmp_path / "sweep"
    sweep = ["downstream/voc07", "--run_dir", str(out), "--gin_param", f"ckpt={ckpts}/",
             "--gin_param", "backbone=@backbones.resnet18", "--gin_param", "image_size=32",
             "--gin_param", "num_workers=0", "--gin_param", f"data_root={shapes_root / 'VOC2007'}"]
    assert main(sweep) == 0
    rows = _rows(out / "sweep.csv")
    assert list(rows[0])[:3] == ["run", "step", "checkpoint"]
    assert [r["run"] for r in rows] == ["step_0000002", "step_0000004", "step_0000006"]
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert [r["checkpoint"] for r in rows] == [str(ckpts / f"step_000000{s}.pt") for s in (2, 4, 6)]
    maps = [float(r["voc07/mAP"]) for r in rows]
    assert all(0 < m <= 100 for m in maps) and len(set(maps)) == 3  # three different backbones
    assert extracted == [48, 12] * 3  # trainval and test features of each checkpoint
    for row, m in zip(rows, maps):  # each checkpoint is a run of its own
        assert json.loads((out / row["run"] / "metrics.json").read_text())["voc07/mAP"] == m
    assert "| step_0000006 | 6 |" in (out / "summary.md").read_text()
    capsys.readouterr()

    extracted.clear()  # the same command again: nothing left to evaluate
    assert main(sweep) == 0
    assert extracted == [] and _rows(out / "sweep.csv") == rows
    assert capsys.readouterr().out.count("finished already, skipped") == 3

    # training goes on: a fourth checkpoint appears, and only it is evaluated
    assert main([*pretrain, "--gin_param", "trainer.max_steps=8"]) == 0
    assert main(sweep) == 0
    assert extracted == [48, 12]
    new_rows = _rows(out / "sweep.csv")
    assert new_rows[:3] == rows and int(new_rows[3]["step"]) == 8

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    curve = [(e.step, e.value) for e in events.Scalars("voc07/mAP")]
    assert [s for s, _ in curve] == [2, 4, 6, 8]
    expected = [float(r["voc07/mAP"]) for r in new_rows]
    assert [v for _, v in curve] == pytest.approx(expected, rel=1e-6)
