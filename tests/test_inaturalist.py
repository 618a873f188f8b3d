"""iNaturalist 2018 fine-tuning (specs/downstream/inat.gin) on the shapes iNat JSON files."""

from __future__ import annotations

import functools
import json
import shutil

import gin
import pytest
import torch
from cli import run_cli
from virtex.plugins.classification import FineTune, INaturalist

from virtex.context import RunLogger
from virtex.engine import Trainer
from virtex.evaluation.api import EvalRequest
from virtex.experiment import prepare
from virtex.models.visual import ResNetBackbone
from virtex.run import main

pytestmark = pytest.mark.usefixtures("one_thread", "private_cache")

SPEC = "downstream/inat"


def _args(root, run_dir, *params: str) -> list[str]:
    base = [f"data_root={root}", "backbone=@backbones.resnet18", "image_size=32",
            "batch_size=16", "epochs=1", "num_workers=0", "inat/trainer.cpu_threads=1",
            "inat/trainer.log_every=1", "evaluators.inaturalist.eval_batch_size=8"]
    out = [SPEC, "--run_dir", str(run_dir)]
    for p in [*base, *params]:
        out += ["--gin_param", p]
    return out


def _lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.parametrize("weight_init", ["random", "torchvision", "virtex"])
def test_spec_fine_tunes_the_whole_backbone(weight_init, shapes_root, tmp_path):
    torch.manual_seed(3)
    cnn = ResNetBackbone("resnet18").cnn.state_dict()
    if weight_init == "torchvision":
        torch.save(cnn, tmp_path / "init.pth")
    else:  # a published-format VirTex checkpoint
        torch.save({"model": {f"visual.cnn.{k}": v for k, v in cnn.items()
                              if not k.startswith("fc.")}}, tmp_path / "init.pth")
    ckpt = "ckpt=None" if weight_init == "random" else f"ckpt={tmp_path / 'init.pth'}"
    run = tmp_path / "run"
    assert main(_args(shapes_root / "inat2018", run, ckpt, f"weight_init={weight_init}")) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {"inat/top1", "inat/top5", "inat/mean_class_top1"}
    assert 0 <= metrics["inat/top1"] <= metrics["inat/top5"] <= 100
    per_class = json.loads((run / "inat_per_class.json").read_text())
    val = json.loads((shapes_root / "inat2018" / "val2018.json").read_text())
    assert len(per_class) == len(val["categories"]) == 20
    assert sum(c["images"] for c in per_class) == len(val["images"])
    scored = [c["top1"] for c in per_class if c["images"]]
    assert metrics["inat/mean_class_top1"] == pytest.approx(sum(scored) / len(scored))
    (probe_dir,) = (run / "inat").iterdir()
    state = torch.load(max(probe_dir.glob("step_*.pt")), weights_only=True)["model"]
    assert state["fc.weight"].shape == (20, 512)
    if weight_init != "random":  # started from the file, then every layer trained
        for k in ("conv1.weight", "layer4.1.conv2.weight", "layer1.0.bn1.running_mean"):
            assert not torch.equal(state[f"visual.cnn.{k}"], cnn[k]), k


def test_learning_rate_drops_at_milestone_epochs_with_bf16_autocast(shapes_root, tmp_path):
    run = tmp_path / "run"
    assert main(_args(shapes_root / "inat2018", run, "ckpt=None", "weight_init=random",
                      "epochs=2", "evaluators.inaturalist.milestones=[1]",
                      "inat/trainer.amp='bf16'")) == 0
    rows = _lines(run / "metrics.jsonl")
    lrs = {r["step"]: r["lr/head"] for r in rows if "lr/head" in r}
    assert sorted(lrs) == [1, 2, 3, 4, 5, 6]  # 48 images / 16 = 3 steps per epoch
    assert all(lrs[s] == pytest.approx(0.025) for s in (1, 2, 3))
    assert all(lrs[s] == pytest.approx(0.0025) for s in (4, 5, 6))
    assert all(r["loss/total"] == r["loss/total"] for r in rows if "loss/total" in r)
    assert "inat/trainer.amp = 'bf16'" in (run / "operative_config.gin").read_text()


def test_evaluator_leaves_the_request_backbone_alone(shapes_root, tmp_path):
    gin.clear_config()
    trainer = functools.partial(Trainer, lr=0.025, backbone_lr=None, warmup_steps=0,
                                schedule="multistep", lookahead=False, num_workers=0,
                                cpu_threads=1, log_every=1)
    request = EvalRequest(backbone=ResNetBackbone("resnet18"), device=torch.device("cpu"),
                          run_dir=tmp_path, logger=RunLogger(tmp_path), step=42)
    before = {k: v.clone() for k, v in request.backbone.state_dict().items()}
    result = INaturalist(str(shapes_root / "inat2018"), trainer, epochs=1, batch_size=16,
                         image_size=32, eval_batch_size=8, num_workers=0)(request)
    assert set(result.metrics) == {"inat/top1", "inat/top5", "inat/mean_class_top1"}
    assert result.files == [tmp_path / "inat_per_class.json"]
    assert request.step == 42
    assert all(torch.equal(before[k], v) for k, v in request.backbone.state_dict().items())
    assert request.backbone.cnn.conv1.weight.requires_grad
    # the trainer counted its own steps (3 of 16 images), logged at those steps
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged if "loss/total" in row] == [1, 2, 3]


def test_every_parameter_is_decayed_and_the_classifier_is_normal_init(tmp_path):
    prepare(SPEC, ["ckpt=None", "weight_init=random"])
    try:
        assert gin.query_parameter("inat/trainer.no_decay") == "virtex"
        assert gin.query_parameter("inat/trainer.amp") == "fp16"
        assert gin.query_parameter("evaluators.inaturalist.classifier_init") == "virtex"
        with gin.config_scope("inat"):
            trainer = Trainer(dataset=[])
    finally:
        gin.clear_config()
    torch.manual_seed(0)
    model = FineTune(ResNetBackbone("resnet18"), 20)
    optimizer = trainer._optimizer(model, torch.device("cpu"))
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0001]
    trained = [p for p in model.parameters() if p.requires_grad]
    assert len(optimizer.param_groups[0]["params"]) == len(trained) == 62 + 2  # BN and biases too
    assert abs(model.fc.weight.std() - 0.01) < 5e-4 and torch.count_nonzero(model.fc.bias) == 0


def _one_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("virtex: error: "), err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


def test_bad_inputs_are_one_line(shapes_root, tmp_path, capsys):
    assert main(_args(shapes_root / "imagenet", tmp_path / "a", "ckpt=None", "weight_init=random")) == 2
    _one_line(capsys, "annotations file not found", "imagenet/train2018.json")
    other = tmp_path / "other_categories"
    shutil.copytree(shapes_root / "inat2018", other)
    val = json.loads((other / "val2018.json").read_text())
    val["categories"] = val["categories"][:-1]
    val["annotations"] = [a for a in val["annotations"]
                          if a["category_id"] in {c["id"] for c in val["categories"]}]
    val["images"] = [im for im in val["images"]
                     if im["id"] in {a["image_id"] for a in val["annotations"]}]
    (other / "val2018.json").write_text(json.dumps(val))
    assert main(_args(other, tmp_path / "b", "ckpt=None", "weight_init=random")) == 2
    _one_line(capsys, "val2018.json: its categories differ from those of train2018.json")


def test_cli_missing_split_file(shapes_root, tmp_path):
    root = tmp_path / "inat"
    shutil.copytree(shapes_root / "inat2018", root)
    (root / "val2018.json").unlink()
    res = run_cli(*_args(root, tmp_path / "run", "ckpt=None", "weight_init=random"))
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert lines[0].startswith("virtex: error: annotations file not found: ")
    assert "val2018.json" in lines[0]
