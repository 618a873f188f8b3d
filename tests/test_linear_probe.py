"""ImageNet linear probe (specs/downstream/imagenet.gin) on the shapes ImageNet folders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from cli import run_cli
from virtex.plugins import classification

from virtex import engine, train_hooks
from virtex.context import RunLogger
from virtex.data.datasets import ImageClassificationDataset
from virtex.data.readers import read_image_folder
from virtex.data.transforms import eval_transform
from virtex.evaluation.api import EvalRequest
from virtex.models.visual import ResNetBackbone
from virtex.run import main

pytestmark = pytest.mark.usefixtures("one_thread", "private_cache")

SPEC = "downstream/imagenet"


def _args(root, run_dir, *params: str) -> list[str]:
    base = [f"data_root={root}", "backbone=@backbones.resnet18", "image_size=32",
            "batch_size=16", "epochs=1", "num_workers=0", "linear/trainer.cpu_threads=1",
            "linear/trainer.log_every=1", "evaluators.imagenet_linear.eval_batch_size=8"]
    out = [SPEC, "--run_dir", str(run_dir)]
    for p in [*base, *params]:
        out += ["--gin_param", p]
    return out


def _init_file(tmp_path, weight_init: str):
    """A checkpoint of the given kind and the backbone weights it holds."""
    torch.manual_seed(7)
    cnn = ResNetBackbone("resnet18").cnn.state_dict()
    if weight_init == "torchvision":
        torch.save(cnn, tmp_path / "tv.pth")
        return tmp_path / "tv.pth", cnn
    published = {f"visual.cnn.{k}": v for k, v in cnn.items() if not k.startswith("fc.")}
    torch.save({"model": published}, tmp_path / "virtex.pth")
    return tmp_path / "virtex.pth", cnn


def _probe_state(run_dir):
    (probe_dir,) = (run_dir / "linear").iterdir()
    return torch.load(max(probe_dir.glob("step_*.pt")), weights_only=True)["model"]


@pytest.mark.parametrize("weight_init", ["random", "torchvision", "virtex"])
def test_spec_runs_and_keeps_the_backbone_frozen(weight_init, shapes_root, tmp_path):
    params = [f"weight_init={weight_init}"]
    if weight_init == "random":
        params.append("ckpt=None")
    else:
        path, cnn = _init_file(tmp_path, weight_init)
        params.append(f"ckpt={path}")
    run = tmp_path / "run"
    assert main(_args(shapes_root / "imagenet", run, *params)) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {"imagenet/top1", "imagenet/top5"}
    assert 0 <= metrics["imagenet/top1"] <= metrics["imagenet/top5"] <= 100
    state = _probe_state(run)
    assert state["fc.weight"].shape == (20, 512)
    assert not [k for k in state if k.startswith("bn.")]  # the original's head: fc alone
    losses = [json.loads(x)["loss/total"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3  # 48 images / batch 16, one epoch
    if weight_init != "random":  # the backbone is the file's, untouched by training
        for k in ("conv1.weight", "layer4.1.bn2.running_mean", "layer4.1.bn2.running_var"):
            assert torch.equal(state[f"visual.cnn.{k}"], cnn[k]), k


def test_resume_after_preemption_matches_an_uninterrupted_run(shapes_root, tmp_path, monkeypatch):
    params = ["weight_init=random", "ckpt=None", "batch_size=8", "epochs=2",
              "linear/trainer.checkpoint_every=100"]
    root = shapes_root / "imagenet"
    assert main(_args(root, tmp_path / "ref", *params)) == 0

    real_forward, calls, stop = classification.LinearProbe.forward, [], train_hooks.StopRequest()

    def forward(self, batch):  # a pre-emption signal arriving during step 5
        calls.append(1)
        if len(calls) == 5:
            stop.request()
        return real_forward(self, batch)

    monkeypatch.setattr(classification.LinearProbe, "forward", forward)
    with pytest.raises(engine.Preempted), train_hooks.training_hooks(stop):
        main(_args(root, tmp_path / "cut", *params))
    assert [p.name for p in (tmp_path / "cut" / "linear").glob("*/*.pt")] == ["step_0000005.pt"]
    monkeypatch.setattr(classification.LinearProbe, "forward", real_forward)
    assert main(_args(root, tmp_path / "cut", *params)) == 0
    assert "resumed from" in (tmp_path / "cut" / "log.txt").read_text()
    ref, cut = _probe_state(tmp_path / "ref"), _probe_state(tmp_path / "cut")
    assert ref.keys() == cut.keys() and all(torch.equal(ref[k], cut[k]) for k in ref)
    assert (json.loads((tmp_path / "ref" / "metrics.json").read_text())
            == json.loads((tmp_path / "cut" / "metrics.json").read_text()))


def test_class_counts_match_a_per_image_reference(shapes_root, tmp_path):
    torch.manual_seed(0)
    paths, targets, classes = read_image_folder(shapes_root / "imagenet", "val")
    dataset = ImageClassificationDataset(paths, targets, eval_transform(37, 32))
    model = classification.LinearProbe(ResNetBackbone("resnet18"), len(classes),
                                       head="bn_linear")
    model.bn.running_mean.normal_()
    request = EvalRequest(backbone=model.visual, device=torch.device("cpu"), run_dir=tmp_path,
                          logger=RunLogger(tmp_path))
    counts = classification.class_counts(model, dataset, len(classes), request, batch_size=5,
                                         num_workers=0)
    expected = torch.zeros(3, len(classes), dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        for i in range(len(dataset)):
            item = dataset[i]
            logits = model.logits(item["image"][None])[0]
            target = int(item["target"])
            expected[0, target] += int(logits.argmax()) == target
            expected[1, target] += target in logits.topk(5).indices.tolist()
            expected[2, target] += 1
    assert torch.equal(counts, expected)
    assert counts[2].sum() == len(paths)


def test_original_head_is_fc_on_pooled_features_with_normal_init():
    torch.manual_seed(0)
    probe = classification.LinearProbe(ResNetBackbone("resnet50"), 1000)
    assert isinstance(probe.bn, torch.nn.Identity)
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    weight = probe.fc.weight.detach()
    assert weight.shape == (1000, 2048) and abs(weight.mean()) < 1e-4
    assert abs(weight.std() - 0.01) < 1e-4 and torch.count_nonzero(probe.fc.bias) == 0
    images = torch.randn(2, 3, 64, 64)
    probe.eval()
    with torch.no_grad():
        pooled = probe.visual(images).mean(dim=(2, 3))
        assert torch.equal(probe.logits(images), probe.fc(pooled))


def test_bn_linear_head_and_pytorch_init_options():
    torch.manual_seed(0)
    probe = classification.LinearProbe(ResNetBackbone("resnet18"), 20, head="bn_linear",
                                       classifier_init="pytorch")
    assert isinstance(probe.bn, torch.nn.BatchNorm1d) and not probe.bn.affine
    bound = 512 ** -0.5  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert probe.fc.weight.abs().max() <= bound and probe.fc.weight.std() > 0.5 * bound
    assert torch.count_nonzero(probe.fc.bias) == 20


def test_bad_head_or_init_is_one_line(shapes_root, tmp_path, capsys):
    root = shapes_root / "imagenet"
    assert main(_args(root, tmp_path / "a", "ckpt=None", "weight_init=random",
                      "evaluators.imagenet_linear.head='mlp'")) == 2
    _one_line(capsys, "evaluators.imagenet_linear.head: unknown 'mlp'", "'bn_linear'")
    assert main(_args(root, tmp_path / "b", "ckpt=None", "weight_init=random",
                      "evaluators.imagenet_linear.classifier_init='zeros'")) == 2
    _one_line(capsys, "evaluators.imagenet_linear.classifier_init: unknown 'zeros'")


def _one_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("virtex: error: "), err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


def test_wrong_layout_and_missing_split_are_one_line(shapes_root, tmp_path, capsys):
    assert main(_args(shapes_root / "VOC2007", tmp_path / "a", "ckpt=None", "weight_init=random")) == 2
    _one_line(capsys, "image folder not found", "VOC2007/train", "<root>/<split>/<class>")
    only_train = tmp_path / "only_train"
    shutil.copytree(shapes_root / "imagenet" / "train", only_train / "train")
    assert main(_args(only_train, tmp_path / "b", "ckpt=None", "weight_init=random")) == 2
    _one_line(capsys, "image folder not found", "only_train/val")
    extra = tmp_path / "extra"
    shutil.copytree(shapes_root / "imagenet", extra)
    shutil.copytree(extra / "val" / "red_circle", extra / "val" / "purple_blob")
    assert main(_args(extra, tmp_path / "c", "ckpt=None", "weight_init=random")) == 2
    _one_line(capsys, "class folder 'purple_blob' is not one of the 20 given classes")


@pytest.mark.slow
def test_two_process_ddp(shapes_root, tmp_path):
    args = _args(shapes_root / "imagenet", tmp_path / "run", "ckpt=None", "weight_init=random")
    res = run_cli(*args, "--gpus", "2", env={"VIRTEX_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr
    assert "2 process(es)" in (tmp_path / "run" / "log.txt").read_text()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0 <= metrics["imagenet/top1"] <= metrics["imagenet/top5"] <= 100
    assert _probe_state(tmp_path / "run")["fc.weight"].shape == (20, 512)
