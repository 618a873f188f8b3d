"""VOC07 linear SVMs (specs/downstream/voc07.gin) and the frozen-feature cache."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from virtex.plugins.voc07 import VOC07SVM

from virtex.context import RunLogger
from virtex.data.readers import read_voc_classification
from virtex.data.transforms import eval_transform, load_image
from virtex.evaluation import features
from virtex.evaluation.api import EvalRequest, EvalResult
from virtex.models.visual import ResNetBackbone
from virtex.run import main

pytestmark = pytest.mark.usefixtures("one_thread", "private_cache")

SPEC = "downstream/voc07"


def _counted(backbone: torch.nn.Module) -> list[int]:
    """Images through ``backbone.forward``, one entry per call."""
    calls: list[int] = []
    backbone.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    return calls


def _ctx(tmp_path, backbone) -> EvalRequest:
    return EvalRequest(backbone=backbone, device=torch.device("cpu"), run_dir=tmp_path,
                       logger=RunLogger(tmp_path), step=7)


def test_second_run_reads_the_cache_and_never_calls_the_backbone(shapes_root, tmp_path):
    torch.manual_seed(0)
    backbone = ResNetBackbone("resnet18")
    calls = _counted(backbone)
    evaluator = VOC07SVM(str(shapes_root / "VOC2007"), image_size=32, num_workers=0)
    result = evaluator(_ctx(tmp_path, backbone))
    assert isinstance(result, EvalResult) and result.files == [tmp_path / "voc07_svm.json"]
    first = result.metrics
    assert sum(calls) == 60  # 48 trainval + 12 test images, once each
    calls.clear()
    second = evaluator(_ctx(tmp_path, backbone)).metrics
    assert calls == [] and second == first
    assert set(first) == {"voc07/mAP"} | {f"voc07/AP/{c}" for c in
                                          read_voc_classification(shapes_root / "VOC2007")[2]}
    aps = [v for k, v in first.items() if k.startswith("voc07/AP/")]
    assert len(aps) == 20 and first["voc07/mAP"] == pytest.approx(sum(aps) / 20)
    detail = json.loads((tmp_path / "voc07_svm.json").read_text())
    assert [c["ap"] for c in detail["classes"]] == aps
    assert detail["step"] == 7 and detail["checkpoint"] is None
    assert {c["cost"] for c in detail["classes"]} <= {0.01, 0.1, 1.0, 10.0}


def test_cache_key_follows_weights_transform_and_image_files(shapes_root, tmp_path):
    torch.manual_seed(0)
    backbone = ResNetBackbone("resnet18")
    calls = _counted(backbone)
    root = tmp_path / "VOC2007"
    shutil.copytree(shapes_root / "VOC2007", root)
    evaluator = VOC07SVM(str(root), image_size=32, num_workers=0)
    ctx = _ctx(tmp_path, backbone)
    reference, _, _ = evaluator.features(ctx, "test")
    assert sum(calls) == 12
    calls.clear()
    with torch.no_grad():
        backbone.cnn.conv1.weight.mul_(1.1)  # another checkpoint
    changed, _, _ = evaluator.features(ctx, "test")
    assert sum(calls) == 12 and not torch.equal(changed, reference)
    calls.clear()
    VOC07SVM(str(root), image_size=40, num_workers=0).features(ctx, "test")  # another transform
    assert sum(calls) == 12
    calls.clear()
    image = read_voc_classification(root, "test")[0][0]
    os.utime(image, ns=(0, 0))  # an image file rewritten in place
    same, _, _ = evaluator.features(ctx, "test")
    assert sum(calls) == 12 and torch.equal(same, changed)
    calls.clear()
    for entry in (tmp_path / "cache" / "features").iterdir():  # damaged cache entries
        entry.write_bytes(b"truncated")
    again, _, _ = evaluator.features(ctx, "test")
    assert sum(calls) == 12 and torch.equal(again, changed)


def test_features_are_pooled_layer4_of_the_eval_transform(shapes_root, tmp_path):
    torch.manual_seed(0)
    backbone = ResNetBackbone("resnet18").eval()
    paths, _, _ = read_voc_classification(shapes_root / "VOC2007", "test")
    transform = eval_transform(32, 32)
    feats = features.extract_features(backbone, paths, transform, torch.device("cpu"),
                                      batch_size=5, num_workers=0, min_side=32)
    with torch.no_grad():
        expected = torch.cat([
            backbone.pooled(transform({"image": load_image(p, 32)})["image"][None])
            for p in paths])
    assert feats.shape == (12, 512)
    assert torch.allclose(feats, expected, atol=1e-5)


def _args(root, run_dir, *params: str) -> list[str]:
    out = [SPEC, "--run_dir", str(run_dir)]
    for p in [f"data_root={root}", "backbone=@backbones.resnet18", "image_size=32", "resize=37",
              "num_workers=0", *params]:
        out += ["--gin_param", p]
    return out


@pytest.mark.parametrize("weight_init", ["random", "torchvision", "virtex"])
def test_spec_runs_with_each_weight_init(weight_init, shapes_root, tmp_path):
    torch.manual_seed(5)
    cnn = ResNetBackbone("resnet18").cnn.state_dict()
    if weight_init == "torchvision":
        torch.save(cnn, tmp_path / "init.pth")
    else:
        torch.save({"model": {f"visual.cnn.{k}": v for k, v in cnn.items()}}, tmp_path / "init.pth")
    ckpt = "ckpt=None" if weight_init == "random" else f"ckpt={tmp_path / 'init.pth'}"
    run = tmp_path / "run"
    assert main(_args(shapes_root / "VOC2007", run, ckpt, f"weight_init={weight_init}")) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics) == 21 and 0 < metrics["voc07/mAP"] <= 100
    assert "voc07/mAP" in (run / "summary.md").read_text()
    if weight_init != "random":  # the same weights through the evaluator directly
        backbone = ResNetBackbone("resnet18")
        backbone.cnn.load_state_dict(cnn)
        direct = VOC07SVM(str(shapes_root / "VOC2007"), image_size=32, resize=37,
                          num_workers=0)(
            _ctx(tmp_path, backbone)).metrics
        assert direct["voc07/mAP"] == pytest.approx(metrics["voc07/mAP"], abs=1e-9)


def _one_line(capsys, *needles: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("virtex: error: "), err
    for needle in needles:
        assert needle in err[0], err[0]


def test_bad_inputs_are_one_line(shapes_root, tmp_path, capsys):
    assert main(_args(shapes_root / "imagenet", tmp_path / "a", "ckpt=None", "weight_init=random")) == 2
    _one_line(capsys, "VOC folder not found", "imagenet/ImageSets/Main")
    root = tmp_path / "VOC2007"
    shutil.copytree(shapes_root / "VOC2007", root)
    (root / "ImageSets" / "Main" / "test.txt").unlink()
    assert main(_args(root, tmp_path / "b", "ckpt=None", "weight_init=random")) == 2
    _one_line(capsys, "VOC split file not found", "ImageSets/Main/test.txt")
    (root / "ImageSets" / "Main" / "test.txt").write_text(
        (shapes_root / "VOC2007" / "ImageSets" / "Main" / "test.txt").read_text())
    (root / "ImageSets" / "Main" / "red_circle_test.txt").unlink()
    assert main(_args(root, tmp_path / "d", "ckpt=None", "weight_init=random")) == 2
    _one_line(capsys, "the classes of 'trainval' and 'test' differ (red_circle)")
    torch.save({"state_dict": {"module.encoder_q.conv1.weight": torch.zeros(1)}},
               tmp_path / "moco.pth")
    assert main(_args(root, tmp_path / "c", f"ckpt={tmp_path / 'moco.pth'}")) == 2
    _one_line(capsys, "is not a VirTex checkpoint", "use weight_init='moco'")
