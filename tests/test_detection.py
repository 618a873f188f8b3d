"""Detection transfer, torchvision backend: readers, metrics, repeat factors, the three
specs end to end on the shapes fixture (COCO / LVIS / VOC formats, real evaluation code),
weights carried from a virtex checkpoint, resume, DDP, and one clear error per bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from cli import run_cli
from virtex.plugins.detection.datasets import (
    DetectionData,
    DetectionDataset,
    Instances,
    read_coco_instances,
    read_lvis_instances,
    read_voc_instances,
    repeat_factors,
    voc_classes,
)
from virtex.plugins.detection.evaluate import Prediction, voc_ap11, voc_metrics
from virtex.plugins.detection.settings import DetectionSettings
from virtex.plugins.detection.torchvision_backend import (
    RepeatFactorSampler,
    RepeatFactorSource,
    build_detector,
)

from virtex.checkpoint import list_checkpoints
from virtex.models.visual import ResNetBackbone
from virtex.run import main

TASKS = {"coco": "coco_instance_seg", "lvis": "lvis_instance_seg", "voc": "voc_detection"}  # evaluators
SPECS = {"coco": "specs/downstream/coco.gin", "lvis": "specs/downstream/lvis.gin",
         "voc": "specs/downstream/voc_det.gin"}

# Tiny everything: 2 steps of 2 images at 64 px, few proposals and detections.
TINY = dict(max_steps=2, batch_size=2, min_size_train=(64,), min_size_test=64, max_size=128,
            milestones=(1,), warmup_steps=1, precise_bn_iters=1, score_thresh=0.0,
            rpn_post_nms_train=64, rpn_post_nms_test=32, roi_batch_size=32,
            detections_per_image=10, checkpoint_every=1, log_every=1, cpu_threads=1)


def params(task: str, root: Path, backend: str = "torchvision", backbone: str = "resnet18",
           **overrides) -> list[str]:
    """Command-line bindings running ``task``'s spec tiny on the shapes tree at ``root``."""
    name = TASKS[task]
    data_root = {"coco": root / "coco", "lvis": root / "lvis", "voc": root}[task]
    out = [f"ckpt={overrides.pop('ckpt', None)}",
           f"weight_init={overrides.pop('weight_init', 'random')}",
           f"backend={backend}", f"backbone=@backbones.{backbone}", f"data_root={data_root}",
           "num_workers=0"]
    if task == "lvis":
        out.append(f"image_root={root / 'coco'}")
    if task == "voc":
        out.append(f"evaluators.{name}.train=[('VOC2007', 'trainval')]")
    for key, value in {**TINY, **overrides}.items():
        out.append(f"detection_settings.{key}={value!r}")
    return [a for p in out for a in ("--gin_param", p)]


def run_spec(task: str, root: Path, run_dir: Path, **kwargs) -> dict[str, float]:
    threads = torch.get_num_threads()
    try:
        rc = main([SPECS[task], "--run_dir", str(run_dir),
                   *params(task, root, **kwargs)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return json.loads((run_dir / "metrics.json").read_text())


def val_images(root: Path) -> int:
    return len(json.loads((root / "coco/annotations/instances_val2017.json").read_text())["images"])


# ----------------------------------------------------------------------------- readers
def test_readers_read_the_real_formats(shapes_root):
    raw = json.loads((shapes_root / "coco/annotations/instances_train2017.json").read_text())
    coco = read_coco_instances(shapes_root / "coco", "train2017")
    assert len(coco.records) == len(raw["images"]) and len(coco.classes) == 20
    assert sum(len(r.labels) for r in coco.records) == len(raw["annotations"])
    ann = raw["annotations"][0]
    rec = next(r for r in coco.records if r.image_id == ann["image_id"])
    x, y, w, h = ann["bbox"]
    assert np.allclose(rec.boxes[0], [x, y, x + w, y + h])
    assert coco.category_ids[rec.labels[0]] == ann["category_id"]
    assert rec.path.is_file() and rec.polygons[0] == ann["segmentation"]

    lvis = read_lvis_instances(shapes_root / "lvis", shapes_root / "coco", "val")
    assert all(r.path.is_file() and r.path.parent.name == "val2017" for r in lvis.records)
    assert lvis.annotation_file == shapes_root / "lvis/lvis_v1_val.json"

    classes = voc_classes(shapes_root / "VOC2007", "trainval")
    voc = read_voc_instances(shapes_root / "VOC2007", "test", classes)
    assert len(voc.records) == len(raw_val := (shapes_root / "VOC2007/ImageSets/Main/test.txt")
                                   .read_text().split())
    first = voc.records[0]
    xml = (shapes_root / "VOC2007/Annotations" / f"{raw_val[0]}.xml").read_text()
    xmin = int(xml.split("<xmin>")[1].split("<")[0])
    assert first.name == raw_val[0] and first.boxes[0, 0] == xmin - 1  # 1-based -> 0-based


def test_training_dataset_flips_boxes_and_masks_together(shapes_root):
    data = read_coco_instances(shapes_root / "coco", "train2017")
    ds = DetectionDataset(data, with_masks=True, flip=False)
    image, target = ds[0]
    assert image.shape[0] == 3 and 0 <= image.min() and image.max() <= 1
    masks, boxes = target["masks"], target["boxes"]
    assert masks.shape == (len(boxes), *image.shape[1:]) and masks.sum() > 0
    for m, b in zip(masks, boxes):  # each mask lies in its box
        ys, xs = torch.nonzero(m, as_tuple=True)
        assert xs.min() >= b[0] - 1 and xs.max() <= b[2] + 1 and ys.min() >= b[1] - 1
    flipped = DetectionDataset(data, with_masks=True, flip=True)
    torch.manual_seed(0)
    seen = [flipped[0] for _ in range(8)]
    w = image.shape[2]
    flips = [t for im, t in seen if not torch.equal(im, image)]
    assert flips, "no flip in 8 draws"
    t = flips[0]
    assert torch.allclose(t["boxes"][:, [0, 2]], w - boxes[:, [2, 0]])
    assert torch.equal(t["masks"], masks.flip(-1))


# ----------------------------------------------------------------------------- metrics
def test_voc_metric_by_hand(shapes_root):
    classes = voc_classes(shapes_root / "VOC2007", "trainval")
    test = read_voc_instances(shapes_root / "VOC2007", "test", classes)
    perfect = [Prediction(i, r.boxes, np.ones(len(r.labels)), r.labels)
               for i, r in enumerate(test.records)]
    assert voc_metrics(test, perfect) == pytest.approx({"AP": 100.0, "AP50": 100.0, "AP75": 100.0})

    def rec(boxes, labels, difficult):
        return Instances(0, Path("x.jpg"), 100, 100, np.array(boxes, np.float32),
                         np.array(labels), difficult=np.array(difficult))

    data = DetectionData("voc", [rec([[0, 0, 10, 10]], [0], [False]),
                                 rec([[20, 20, 30, 30], [40, 40, 50, 50], [0, 0, 5, 5]],
                                     [0, 0, 1], [False, True, False])], ["a", "b", "c"])
    preds = [Prediction(1, np.array([[20, 20, 30, 30], [40, 40, 50, 50]]), np.array([0.95, 0.85]),
                        np.array([0, 0])),  # a hit, then a detected difficult object (ignored)
             Prediction(0, np.array([[50, 50, 60, 60], [0, 0, 10, 10]]), np.array([0.9, 0.8]),
                        np.array([0, 0]))]  # a false positive, then a hit
    # class a: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> 11-point AP (6 * 1 + 5 * 2/3) / 11;
    # class b: no detection, AP 0; class c: no object, left out of the mean.
    expected = 100 * (6 + 5 * 2 / 3) / 11 / 2
    assert voc_metrics(data, preds) == pytest.approx(
        {"AP": expected, "AP50": expected, "AP75": expected})
    assert voc_ap11(np.array([0.5, 1.0]), np.array([1.0, 0.5])) == pytest.approx((6 + 5 * 0.5) / 11)


# ----------------------------------------------------------------------------- sampling
def test_repeat_factors_follow_the_lvis_rule():
    labels = [np.array([0]), np.array([0, 1]), np.array([0]), np.array([0])]  # f(0)=1, f(1)=1/4
    r = repeat_factors(labels, threshold=1.0)
    assert r.tolist() == [1.0, 2.0, 1.0, 1.0]  # r(1) = sqrt(1 / 0.25) = 2
    r = repeat_factors(labels, threshold=0.5)
    assert r[1] == pytest.approx(math.sqrt(2)) and r[0] == 1.0


def test_repeat_factor_sampler_is_resumable_and_repeats_rare_images():
    factors = np.array([1.0, 1.0, 1.5, 3.0])
    full = list(RepeatFactorSampler(factors, 2, 0, 1, seed=3, start_step=0, max_steps=40))
    resumed = list(RepeatFactorSampler(factors, 2, 0, 1, seed=3, start_step=25, max_steps=40))
    assert resumed == full[25:]
    counts = np.bincount([i for batch in full for i, _ in batch], minlength=4)
    assert counts[3] > 2 * counts[0] and counts[2] > counts[0]
    ranks = [list(RepeatFactorSampler(factors, 2, k, 2, 3, 0, 40)) for k in range(2)]
    assert [a + b for a, b in zip(*ranks)] == full  # the two ranks split each global batch


def test_repeat_factor_source_gives_the_batches_of_the_code_before_the_public_contract():
    class Factors:  # a dataset with repeat factors, as DetectionDataset has
        repeat_factors = np.array([1.0, 1.0, 1.5, 3.0, 1.5, 2.25])

        def __len__(self):
            return 6

    # indices of RepeatFactorSampler(factors, 4, 0, 1, seed=11, 0, 12) computed by the
    # code that overrode the engine's private Trainer._sampler / StepBatchSampler._index
    old = [[2, 3, 5, 2], [1, 3, 0, 3], [4, 5, 3, 0], [3, 5, 1, 3], [5, 5, 4, 2], [3, 3, 4, 5],
           [3, 2, 1, 4], [5, 0, 1, 2], [3, 3, 4, 5], [2, 0, 5, 4], [3, 5, 3, 3], [3, 2, 1, 2]]
    source = RepeatFactorSource(Factors(), 4, 12)
    keys = list(source.sampler(11, 0, 0, 1))
    assert [[i for i, _ in b] for b in keys] == old
    assert [b[0][1] for b in keys[:3]] == [23622332462, 23622364138, 23622395814]
    assert list(source.sampler(11, 7, 0, 1)) == keys[7:]
    halves = [list(source.sampler(11, 0, k, 2)) for k in range(2)]
    assert [a + b for a, b in zip(*halves)] == keys


# ----------------------------------------------------------------------------- weights
def _virtex_checkpoint(path: Path, name: str = "resnet18") -> dict[str, torch.Tensor]:
    torch.manual_seed(7)
    backbone = ResNetBackbone(name)
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    state = {f"visual.cnn.{k}": v for k, v in backbone.cnn.state_dict().items()}
    torch.save({"model": state, "step": 1}, path)
    return {k[len("visual.cnn."):]: v for k, v in state.items()}


def test_c4_detector_holds_the_backbone_and_res5_weights(tmp_path):
    cnn = _virtex_checkpoint(tmp_path / "x.pt")
    s = DetectionSettings(arch="faster_rcnn_c4", num_classes=3, norm="BN", extra_norm=True)
    det = build_detector(s, "resnet18", cnn)
    assert torch.equal(det.backbone.layer3[1].conv2.weight, cnn["layer3.1.conv2.weight"])
    assert torch.equal(det.roi_heads.box_head.res5[0].downsample[1].running_var,
                       cnn["layer4.0.downsample.1.running_var"])
    assert isinstance(det.roi_heads.box_head.norm, torch.nn.BatchNorm2d)  # the extra norm
    assert det.backbone.out_channels == 256 and det.roi_heads.box_head.out_channels == 512


def test_spec_carries_virtex_checkpoint_weights_into_the_detector(shapes_root, tmp_path):
    cnn = _virtex_checkpoint(tmp_path / "virtex.pt")
    run_dir = tmp_path / "run"
    run_spec("coco", shapes_root, run_dir, ckpt=str(tmp_path / "virtex.pt"),
             weight_init="virtex", lr=0.0, max_steps=1, precise_bn_iters=0)
    (work,) = (run_dir / "detection").iterdir()
    state = torch.load(list_checkpoints(work)[-1], weights_only=True)["model"]
    body = "detector.backbone.body."
    for key in ("conv1.weight", "layer1.0.conv1.weight", "layer4.1.conv2.weight",
                "layer2.0.downsample.0.weight", "layer3.1.bn2.weight"):
        assert torch.equal(state[body + key], cnn[key]), key  # lr 0: still the checkpoint's


# ----------------------------------------------------------------------------- end to end
def _finite(metrics: dict[str, float], keys: list[str]) -> None:
    for k in keys:
        assert k in metrics, f"{k} missing from {sorted(metrics)}"
        assert math.isfinite(metrics[k]), f"{k} = {metrics[k]}"


def test_coco_spec_trains_evaluates_and_resumes(shapes_root, tmp_path):
    run_dir = tmp_path / "coco"
    m = run_spec("coco", shapes_root, run_dir)
    _finite(m, [f"coco/{t}_{k}" for t in ("bbox", "segm") for k in ("AP", "AP50", "AP75")])
    assert m["coco/images"] == val_images(shapes_root)
    assert m["coco/backend_detectron2"] == 0.0  # the backend used, in metrics.json
    (work,) = (run_dir / "detection").iterdir()
    assert [p.name for p in list_checkpoints(work)] == ["step_0000001.pt", "step_0000002.pt"]
    log = (run_dir / "log.txt").read_text()
    assert "loss" in log and "precise BN" in log
    m2 = run_spec("coco", shapes_root, run_dir, max_steps=3)  # a longer run picks up at step 2
    assert f"resumed from {work / 'step_0000002.pt'} at step 2" in (run_dir / "log.txt").read_text()
    assert "step 3/3" in (run_dir / "log.txt").read_text()
    _finite(m2, ["coco/segm_AP"])


def test_lvis_spec_reports_rare_common_frequent_ap(shapes_root, tmp_path):
    m = run_spec("lvis", shapes_root, tmp_path / "lvis")
    val = json.loads((shapes_root / "lvis/lvis_v1_val.json").read_text())
    freq = {c["id"]: c["frequency"] for c in val["categories"]}
    present = {freq[a["category_id"]] for a in val["annotations"]}
    _finite(m, ["lvis/segm_AP", "lvis/segm_AP50", "lvis/bbox_AP"]
            + [f"lvis/segm_AP{f}" for f in sorted(present)])
    assert {"lvis/segm_APr", "lvis/segm_APc", "lvis/segm_APf"} <= set(m)
    assert m["lvis/images"] == len(val["images"])


def test_voc_spec_trains_c4_and_reports_voc_ap(shapes_root, tmp_path):
    m = run_spec("voc", shapes_root, tmp_path / "voc")
    _finite(m, ["voc_det/AP50", "voc_det/AP", "voc_det/AP75"])
    test_ids = (shapes_root / "VOC2007/ImageSets/Main/test.txt").read_text().split()
    assert m["voc_det/images"] == len(test_ids)


@pytest.mark.slow
def test_resnet50_fpn_one_iteration(shapes_root, tmp_path):
    m = run_spec("coco", shapes_root, tmp_path / "r50", backbone="resnet50", max_steps=1,
                 detections_per_image=5)
    _finite(m, ["coco/bbox_AP", "coco/segm_AP"])
    (work,) = (tmp_path / "r50" / "detection").iterdir()
    state = torch.load(list_checkpoints(work)[-1], weights_only=True)["model"]
    assert state["detector.backbone.body.layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)


@pytest.mark.slow
def test_two_process_ddp_evaluates_every_image_once(shapes_root, tmp_path):
    run_dir = tmp_path / "ddp"
    res = run_cli(SPECS["voc"], "--gpus", "2", "--run_dir",
                  str(run_dir), *params("voc", shapes_root), env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "2 process(es)" in (run_dir / "log.txt").read_text()
    m = json.loads((run_dir / "metrics.json").read_text())
    _finite(m, ["voc_det/AP50", "voc_det/AP"])
    test_ids = (shapes_root / "VOC2007/ImageSets/Main/test.txt").read_text().split()
    assert m["voc_det/images"] == len(test_ids)


# ----------------------------------------------------------------------------- bad input
def _error(capsys, task: str, root: Path, run_dir: Path, *extra: str, **kwargs) -> str:
    rc = main([SPECS[task], "--run_dir", str(run_dir),
               *params(task, root, **kwargs), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("virtex: error: ") and err.count("\n") == 1, err
    return err


def test_missing_annotation_file_is_one_clear_error(shapes_root, tmp_path, capsys):
    err = _error(capsys, "coco", shapes_root, tmp_path / "a", "--gin_param",
                 f"data_root={tmp_path / 'nowhere'}")
    assert "instances_train2017.json" in err and "not found" in err
    err = _error(capsys, "lvis", shapes_root, tmp_path / "b", "--gin_param",
                 "evaluators.lvis_instance_seg.test='test'")
    assert "lvis_v1_test.json" in err


def test_checkpoint_of_another_architecture_is_one_clear_error(shapes_root, tmp_path, capsys):
    _virtex_checkpoint(tmp_path / "r18.pt", "resnet18")
    err = _error(capsys, "voc", shapes_root, tmp_path / "c", ckpt=str(tmp_path / "r18.pt"),
                 weight_init="virtex", backbone="resnet50")
    assert "r18.pt" in err and "resnet18" in err and "resnet50" in err


def test_unknown_voc_class_is_one_clear_error(shapes_root, tmp_path, capsys):
    import shutil

    root = tmp_path / "voc"
    shutil.copytree(shapes_root / "VOC2007", root / "VOC2007")
    test_id = (root / "VOC2007/ImageSets/Main/test.txt").read_text().split()[0]
    xml = root / "VOC2007/Annotations" / f"{test_id}.xml"
    text = xml.read_text()
    name = text.split("<name>")[1].split("<")[0]
    xml.write_text(text.replace(f"<name>{name}<", "<name>unicorn<", 1))
    err = _error(capsys, "voc", root, tmp_path / "d")
    assert "unicorn" in err and str(xml) in err


# ----------------------------------------------------------------------------- paper specs
def _config(capsys, spec: str, *params: str) -> dict[str, str]:
    """``python -m virtex.run SPEC --print_config`` as ``{binding: value}``."""
    assert main([spec, "--print_config", *[a for p in params for a in ("--gin_param", p)]]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines()
             if " = " in ln and not ln.startswith("#")]
    return dict(ln.split(" = ", 1) for ln in lines)


def test_paper_detection_specs_use_detectron2(capsys):
    for task, spec in SPECS.items():
        config = _config(capsys, spec, "ckpt=x.pt")
        assert config["backend"] == "'detectron2'", task
        assert config[f"{TASKS[task]}.backend"] == "%backend", task
        assert config[f"{TASKS[task]}.settings"] == "@detection_settings()", task
        assert config["detection_settings.norm"] == "'SyncBN'", task


def test_lvis_imagenet_init_spec_is_lvis_with_frozen_bn_and_no_fpn_norm(capsys):
    base = _config(capsys, SPECS["lvis"], "ckpt=r50.pth")
    config = _config(capsys, "downstream/lvis_imagenet_init", "ckpt=r50.pth")  # by name
    changed = {k: v for k, v in config.items() if base.get(k) != v}
    assert changed == {"weight_init": "'torchvision'", "detection_settings.norm": "'FrozenBN'",
                       "detection_settings.fpn_norm": "None"}
    assert set(base) == set(config)  # nothing of lvis.gin is lost (detectron2, schedule, ...)
    assert base["weight_init"] == "'virtex'" and base["detection_settings.fpn_norm"] == "'SyncBN'"


def test_frozen_bn_without_fpn_norm_has_no_trainable_norm(tmp_path):
    cnn = _virtex_checkpoint(tmp_path / "x.pt")
    det = build_detector(DetectionSettings(arch="mask_rcnn_fpn", norm="FrozenBN", fpn_norm=None,
                                            num_classes=3), "resnet18", cnn)
    kinds = {type(m).__name__ for m in det.modules()}
    assert "FrozenBatchNorm2d" in kinds and not kinds & {"BatchNorm2d", "SyncBN", "SyncBatchNorm"}
    bn1 = det.backbone.body.bn1
    assert torch.equal(bn1.weight, cnn["bn1.weight"]) and torch.equal(bn1.running_var,
                                                                      cnn["bn1.running_var"])


def _without_detectron2(tmp_path: Path) -> Path:
    """A folder that, first on PYTHONPATH, makes ``import detectron2`` fail as if it were
    not installed (the same ModuleNotFoundError), whatever the environment has."""
    shadow = tmp_path / "no_detectron2"
    (shadow / "detectron2").mkdir(parents=True)
    (shadow / "detectron2" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'detectron2'\", name='detectron2')\n")
    return shadow


def test_paper_spec_without_detectron2_is_one_error_saying_how_to_install(shapes_root, tmp_path):
    shadow = _without_detectron2(tmp_path)
    run_dir = tmp_path / "run"
    args = params("coco", shapes_root)
    i = args.index("backend=torchvision")
    del args[i - 1: i + 1]  # the spec's own backend: detectron2
    res = run_cli(SPECS["coco"], "--run_dir", str(run_dir), *args, pythonpath=[shadow])
    assert res.returncode == 2, res.stderr[-2000:]
    err = res.stderr
    assert err.startswith("virtex: error: ") and err.count("\n") == 1, err
    assert "coco_instance_seg.backend = 'detectron2'" in err and "not installed" in err
    assert "bash .ci/detectron2.sh" in err and "--gin_param backend=torchvision" in err
    assert not (run_dir / "metrics.json").exists()


def test_auto_backend_without_detectron2_records_torchvision(shapes_root, tmp_path):
    shadow = _without_detectron2(tmp_path)
    run_dir = tmp_path / "run"
    res = run_cli(SPECS["voc"], "--run_dir", str(run_dir),
                  *params("voc", shapes_root, backend="auto", max_steps=1),
                  pythonpath=[shadow], env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["voc_det/backend_detectron2"] == 0.0
    assert "voc_detection: torchvision backend" in (run_dir / "summary.md").read_text()
