"""Detection transfer, detectron2 backend (real detectron2 code: an official build or
``.ci/detectron2.sh``): the three specs end to end, weights carried into detectron2's
models, resume, and the VOC metric of the torchvision backend against detectron2's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_detection import _finite, _virtex_checkpoint, run_spec
from virtex.plugins.detection.datasets import read_voc_instances, voc_classes
from virtex.plugins.detection.evaluate import VOC_IOUS, Prediction, voc_class_ap, voc_metrics
from virtex.plugins.detection.settings import DetectionSettings

pytest.importorskip("detectron2", reason="detectron2 is not installed (bash .ci/detectron2.sh)")


def test_voc_metric_matches_detectron2_voc_eval(shapes_root, tmp_path):
    from detectron2.evaluation.pascal_voc_evaluation import voc_eval

    root = shapes_root / "VOC2007"
    classes = voc_classes(root, "trainval")
    test = read_voc_instances(root, "test", classes)
    rng = np.random.default_rng(0)
    preds, lines = [], {c: [] for c in range(len(classes))}
    scores = iter(rng.permutation(np.arange(1, 1000)) / 1000)  # distinct, 3 decimals
    for i, r in enumerate(test.records):
        boxes, labels = [], []
        for box, label in zip(r.boxes, r.labels):  # a jittered hit, sometimes a wrong class
            boxes.append(np.round(box + rng.normal(0, 3, 4), 1))
            labels.append(label if rng.random() < 0.8 else rng.integers(len(classes)))
        for _ in range(3):  # and some clutter
            x, y = rng.uniform(0, 50, 2)
            boxes.append(np.round([x, y, x + rng.uniform(5, 40), y + rng.uniform(5, 40)], 1))
            labels.append(rng.integers(len(classes)))
        s = np.array([next(scores) for _ in boxes])
        preds.append(Prediction(i, np.array(boxes), s, np.array(labels)))
        for b, sc, lab in zip(boxes, s, labels):  # detectron2's result files: 1-based x0, y0
            lines[int(lab)].append(f"{r.name} {sc:.3f} {b[0] + 1:.1f} {b[1] + 1:.1f} "
                                   f"{b[2]:.1f} {b[3]:.1f}")
    template = str(tmp_path / "{}.txt")
    for c, name in enumerate(classes):
        (tmp_path / f"{name}.txt").write_text("\n".join(lines[c]))
    ann = str(root / "Annotations" / "{}.xml")
    image_set = str(root / "ImageSets" / "Main" / "test.txt")
    ours = voc_metrics(test, preds)
    per_iou = []
    for iou in VOC_IOUS:
        aps = []
        for c, name in enumerate(classes):
            gt = {}
            for i, r in enumerate(test.records):
                sel = r.labels == c
                gt[i] = (r.boxes[sel].astype(np.float64) + [1, 1, 0, 0], r.difficult[sel])
            dets = [(float(p.scores[k]), p.index, p.boxes[k] + [1, 1, 0, 0])
                    for p in preds for k in range(len(p.labels)) if p.labels[k] == c]
            mine = voc_class_ap(gt, dets, iou)
            with np.errstate(divide="ignore", invalid="ignore"):
                _, _, theirs = voc_eval(template, ann, image_set, name, ovthresh=iou,
                                        use_07_metric=True)
            if mine is not None:  # classes without objects: we leave them out
                assert mine == pytest.approx(theirs, abs=1e-12), (name, iou)
                aps.append(theirs)
        per_iou.append(100 * np.mean(aps))
    assert ours["AP50"] == pytest.approx(per_iou[0])
    assert ours["AP75"] == pytest.approx(per_iou[5])
    assert ours["AP"] == pytest.approx(np.mean(per_iou))
    assert 5 < ours["AP50"] < 95  # a non-trivial case


@pytest.mark.parametrize("arch,backbone", [("mask_rcnn_fpn", "resnet18"),
                                           ("faster_rcnn_c4", "resnet50")])
def test_backbone_weights_fill_detectron2_model(tmp_path, arch, backbone):
    from detectron2.modeling import build_model
    from virtex.plugins.detection.detectron2_backend import build_config, d2_state, load_backbone

    cnn = _virtex_checkpoint(tmp_path / "x.pt", backbone)
    s = DetectionSettings(arch=arch, num_classes=5, norm="BN", fpn_norm="BN", extra_norm=True)
    cfg = build_config(s, backbone, tmp_path, torch.device("cpu"), "a", "b")
    model = build_model(cfg)
    state = d2_state(cnn, arch)
    load_backbone(model, state)
    own = model.state_dict()
    resnet_keys = [k for k in own if (".res" in k or ".stem." in k) and "num_batches" not in k
                   and "res5.norm" not in k]
    assert sorted(resnet_keys) == sorted(state)  # every ResNet weight of the model is filled
    if arch == "faster_rcnn_c4":
        assert torch.equal(own["roi_heads.res5.0.shortcut.norm.running_mean"],
                           cnn["layer4.0.downsample.1.running_mean"])
        assert "roi_heads.res5.norm.weight" in own  # the extra norm after res5
        assert torch.equal(own["backbone.res4.5.conv3.weight"], cnn["layer3.5.conv3.weight"])
    else:
        assert torch.equal(own["backbone.bottom_up.stem.conv1.norm.weight"], cnn["bn1.weight"])
        assert torch.equal(own["backbone.bottom_up.res3.1.conv2.weight"],
                           cnn["layer2.1.conv2.weight"])
        assert model.backbone.bottom_up.stem.conv1.norm.__class__.__name__ == "BatchNorm2d"
    assert cfg.INPUT.FORMAT == "RGB" and list(cfg.MODEL.PIXEL_STD) == [58.395, 57.12, 57.375]


def test_frozen_bn_and_no_fpn_norm_in_detectron2(tmp_path):
    """The LVIS ImageNet-init baseline's model: FrozenBN backbone holding the weights, no FPN norm."""
    from detectron2.layers import FrozenBatchNorm2d
    from detectron2.modeling import build_model
    from virtex.plugins.detection.detectron2_backend import build_config, d2_state, load_backbone

    cnn = _virtex_checkpoint(tmp_path / "x.pt", "resnet18")
    s = DetectionSettings(arch="mask_rcnn_fpn", num_classes=5, norm="FrozenBN", fpn_norm=None)
    cfg = build_config(s, "resnet18", tmp_path, torch.device("cpu"), "a", "b")
    assert cfg.MODEL.RESNETS.NORM == "FrozenBN" and cfg.MODEL.FPN.NORM == ""
    model = build_model(cfg)
    load_backbone(model, d2_state(cnn, "mask_rcnn_fpn"))
    kinds = {type(m).__name__ for m in model.modules()}
    assert "FrozenBatchNorm2d" in kinds and not kinds & {"BatchNorm2d", "SyncBatchNorm",
                                                         "NaiveSyncBatchNorm"}
    norm = model.backbone.bottom_up.res3[1].conv2.norm
    assert isinstance(norm, FrozenBatchNorm2d)
    assert torch.equal(norm.running_var, cnn["layer2.1.bn2.running_var"])
    assert torch.equal(norm.weight, cnn["layer2.1.bn2.weight"])


def test_coco_spec_on_detectron2_trains_evaluates_and_resumes(shapes_root, tmp_path):
    run_dir = tmp_path / "coco"
    m = run_spec("coco", shapes_root, run_dir, backend="detectron2")
    _finite(m, [f"coco/{t}_{k}" for t in ("bbox", "segm") for k in ("AP", "AP50", "AP75")])
    val = json.loads((shapes_root / "coco/annotations/instances_val2017.json").read_text())
    assert m["coco/images"] == len(val["images"])
    assert m["coco/backend_detectron2"] == 1.0  # the backend used, in metrics.json
    (work,) = (run_dir / "detection").iterdir()
    assert (work / "model_final.pth").is_file()
    log = (work / "log_rank0.txt").read_text()
    assert "Running precise-BN" in log and "COCO" in log
    m2 = run_spec("coco", shapes_root, run_dir, backend="detectron2", max_steps=3)
    assert "Starting training from iteration 2" in (work / "log_rank0.txt").read_text()
    _finite(m2, ["coco/segm_AP"])


def test_lvis_spec_on_detectron2(shapes_root, tmp_path):
    m = run_spec("lvis", shapes_root, tmp_path / "lvis", backend="detectron2")
    val = json.loads((shapes_root / "lvis/lvis_v1_val.json").read_text())
    freq = {c["id"]: c["frequency"] for c in val["categories"]}
    present = {freq[a["category_id"]] for a in val["annotations"]}
    _finite(m, ["lvis/segm_AP", "lvis/bbox_AP"] + [f"lvis/segm_AP{f}" for f in sorted(present)])
    assert m["lvis/images"] == len(val["images"])


@pytest.mark.slow
def test_voc_spec_on_detectron2_r50_c4(shapes_root, tmp_path):
    m = run_spec("voc", shapes_root, tmp_path / "voc", backend="detectron2", backbone="resnet50",
                 rpn_post_nms_test=16, roi_batch_size=16, max_steps=1)
    _finite(m, ["voc_det/AP50", "voc_det/AP", "voc_det/AP75"])
    test_ids = (shapes_root / "VOC2007/ImageSets/Main/test.txt").read_text().split()
    assert m["voc_det/images"] == len(test_ids)
