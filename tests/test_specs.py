"""The spec tree in the t5x shape: every spec parses, runs/*.gin own how to run, model specs
say which model only, a transfer spec without ``ckpt`` is one clear error, and the trainer
and detection values the paper specs build are the paper's."""

from __future__ import annotations

import inspect
from pathlib import Path

import gin
import pytest
from cli import REPO
from gin import config as gin_config

from virtex.config import available_specs, missing_required_macros, parse_spec
from virtex.engine import Trainer
from virtex.registry import get_registry
from virtex.run import main

SPECS = REPO / "specs"
ALL = available_specs([SPECS])
TRANSFER = [n for n in ALL if n.startswith(("downstream/", "inference/"))]


def _parse(name: str, *params: str) -> None:
    """Parse spec ``name`` with ``params``; required macros left are given dummy strings."""
    registry = get_registry()
    parse_spec(SPECS / f"{name}.gin", list(params), [SPECS], registry, check_required=False)
    for macro in missing_required_macros():
        gin.parse_config(f"{macro} = 'unused'")


def _macro(name: str) -> object:
    return gin_config._CONFIG[(name, "gin.macro")]["value"]


@pytest.fixture(autouse=True)
def _clear_gin():
    yield
    gin.clear_config()


@pytest.mark.parametrize("name", ALL)
def test_every_spec_parses(name):
    _parse(name)
    config = gin.config_str()
    runnable = not name.startswith(("models/", "runs/")) and not name.endswith("_base")
    if runnable:
        assert ("pipeline." if name.startswith("pipeline/") else "experiment.") in config, name


@pytest.mark.parametrize("name", [n for n in ALL if n.startswith("pipeline/")])
def test_every_pipeline_expands_into_stages_whose_bindings_parse(name, tmp_path):
    from virtex.experiment import expand, prepare

    plan = expand(prepare(name, [], str(tmp_path / "run")))  # parses every stage's bindings
    groups = [g for g, _ in plan.groups()]
    assert groups == ["pretrain", "voc07", "imagenet", "inat", "coco", "lvis", "voc_det",
                      "captioning"], groups


@pytest.mark.parametrize("name", sorted(set(TRANSFER) - {"downstream/lvis_imagenet_init"}))
def test_transfer_specs_take_ckpt_from_runs_transfer(name):
    text = (SPECS / f"{name}.gin").read_text()
    assert "include 'runs/transfer.gin'" in text
    text = "\n".join(ln for ln in text.splitlines() if not ln.startswith("#"))
    for line in ("ckpt = %gin.REQUIRED", "experiment.ckpt", "experiment.backbone",
                 "experiment.weight_init", "experiment.task"):
        assert line not in text, (name, line)
    _parse(name)
    assert repr(gin.query_parameter("experiment.ckpt")) == "%ckpt"
    assert repr(gin.query_parameter("experiment.weight_init")) == "%weight_init"


@pytest.mark.parametrize("name", TRANSFER)
def test_transfer_spec_without_ckpt_is_one_error_naming_it(name, capsys):
    assert main([f"specs/{name}.gin", "--print_config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("virtex: error: ") and err.count("\n") == 1, err
    assert "ckpt" in err and "%gin.REQUIRED" in err and "--gin_param" in err, err


@pytest.mark.parametrize("name", sorted(p.stem for p in (SPECS / "models").glob("*.gin")))
def test_model_specs_say_which_model_only(name):
    text = (SPECS / "models" / f"{name}.gin").read_text()
    text = "\n".join(ln for ln in text.splitlines() if not ln.startswith("#")) + "\n"
    assert "experiment." not in text and "trainer." not in text
    assert f"task = @tasks.{name}\n" in text


def test_pretraining_specs_pretrain_their_model_through_runs_pretrain():
    for name in (n for n in ALL if n.startswith("pretrain/") and not n.endswith("_base")):
        _parse(name)
        # runs/pretrain.gin: experiment.task = %task; the model spec: task = @tasks.<model>
        assert repr(gin.query_parameter("experiment.task")) == "%task", name
        model = (SPECS / f"{name}.gin").read_text().split("include 'models/")[1].split(".gin")[0]
        assert repr(_macro("task")) == f"@tasks.{model}", name


def test_a_pretraining_spec_without_a_model_names_the_missing_task(tmp_path, capsys):
    spec = tmp_path / "no_model.gin"
    spec.write_text("include 'pretrain/_base.gin'\n")
    assert main([str(spec), "--print_config"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "task" in err and "%gin.REQUIRED" in err, err


def test_the_base_spec_binds_no_trainer_default():
    """Trainer defaults have one home, virtex/engine.py: a pretraining spec binds only the
    values that differ from them."""
    defaults = {n: p.default for n, p in inspect.signature(Trainer.__init__).parameters.items()}
    _parse("pretrain/_base")
    bound = gin_config._CONFIG[("", "virtex.engine.trainer")]
    literal = {k: v for k, v in bound.items() if gin_config._is_literally_representable(v)}
    assert literal and all(v != defaults[k] for k, v in literal.items()), literal


def test_paper_pretraining_trainer_values():
    _parse("pretrain/bicap_r50", "trainer.dataset=None", "trainer.sample_dataset=None")
    t = Trainer()
    got = {k: getattr(t, k) for k in (
        "batch_size", "max_steps", "optimizer", "lr", "backbone_lr", "momentum", "nesterov",
        "weight_decay", "no_decay", "warmup_steps", "warmup_start", "schedule", "lookahead",
        "lookahead_alpha", "lookahead_k", "clip_grad_norm", "amp", "checkpoint_every",
        "keep_last", "keep_every", "num_workers")}
    assert got == dict(
        batch_size=256, max_steps=500_000, optimizer="sgd", lr=0.001, backbone_lr=0.2,
        momentum=0.9, nesterov=False, weight_decay=1e-4, no_decay="virtex", warmup_steps=10_000,
        warmup_start="zero", schedule="cosine", lookahead=True, lookahead_alpha=0.5,
        lookahead_k=5, clip_grad_norm=10.0, amp="fp16", checkpoint_every=2000, keep_last=3,
        keep_every=10_000, num_workers=4)


def _detection_settings(spec: str, evaluator: str):
    from virtex.plugins.detection.settings import DetectionSettings

    _parse(spec)
    assert repr(gin.query_parameter(f"evaluators.{evaluator}.settings")) == (
        "@detection_settings()")
    return DetectionSettings()


def test_paper_detection_settings():
    coco = _detection_settings("downstream/coco", "coco_instance_seg").for_task("mask_rcnn_fpn")
    assert (coco.norm, coco.fpn_norm, coco.extra_norm) == ("SyncBN", "SyncBN", False)
    assert (coco.min_size_train, coco.min_size_test, coco.max_size) == (
        (640, 672, 704, 736, 768, 800), 800, 1333)
    assert (coco.batch_size, coco.lr, coco.momentum, coco.weight_decay) == (16, 0.02, 0.9, 1e-4)
    assert (coco.max_steps, coco.milestones, coco.warmup_steps) == (180_000, (120_000, 160_000),
                                                                    1000)
    assert (coco.score_thresh, coco.detections_per_image, coco.repeat_threshold) == (
        0.05, 100, None)
    assert (coco.rpn_pre_nms_train, coco.rpn_post_nms_test, coco.precise_bn_iters) == (
        2000, 1000, 200)
    gin.clear_config()
    lvis = _detection_settings("downstream/lvis", "lvis_instance_seg")
    assert (lvis.score_thresh, lvis.detections_per_image, lvis.repeat_threshold) == (
        0.0001, 300, 0.001)
    gin.clear_config()
    frozen = _detection_settings("downstream/lvis_imagenet_init", "lvis_instance_seg")
    assert (frozen.norm, frozen.fpn_norm) == ("FrozenBN", None)
    gin.clear_config()
    voc = _detection_settings("downstream/voc_det", "voc_detection").for_task("faster_rcnn_c4", 20)
    assert (voc.extra_norm, voc.min_size_train[0], voc.max_steps, voc.milestones,
            voc.warmup_steps) == (True, 480, 24_000, (18_000, 22_000), 100)
    assert (voc.rpn_pre_nms_train, voc.rpn_post_nms_train, voc.num_classes) == (12000, 2000, 20)


def test_a_bad_detection_setting_is_one_error_naming_the_binding(tmp_path, capsys):
    args = ["specs/downstream/voc_det.gin", "--run_dir", str(tmp_path / "run")]
    for p in ("ckpt=None", "weight_init=random", "backend=torchvision",
              "detection_settings.norm='GN'"):
        args += ["--gin_param", p]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "detection_settings.norm = 'GN'" in err, err
    assert "'SyncBN'" in err and not (Path(tmp_path) / "run" / "metrics.json").exists()
