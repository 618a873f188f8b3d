"""Backbone initialisation from real files: torchvision, MoCo, our and published VirTex checkpoints."""

from __future__ import annotations

import pytest
import torch
import torchvision
from cli import run_cli, tiny_pretrain
from torch import nn

from virtex.errors import UserError
from virtex.models.visual import RESNETS, ResNetBackbone
from virtex.run import main
from virtex.weights import detect_kind, export_backbone, guess_resnet, load_backbone_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-default values everywhere (BatchNorm statistics included), so a load shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
    return model


def _cnn_equal(backbone: ResNetBackbone, state: dict[str, torch.Tensor], skip_fc: bool = False) -> None:
    own = backbone.cnn.state_dict()
    for k, v in state.items():
        if skip_fc and k.startswith("fc."):
            continue
        assert torch.equal(own[k], v), k


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    r18 = _randomise(torchvision.models.resnet18(), 1)
    r50 = _randomise(torchvision.models.resnet50(), 2)
    torch.save(r18.state_dict(), d / "resnet18.pth")
    torch.save(r50.state_dict(), d / "resnet50.pth")
    return d, r18, r50


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, shapes_root):
    """Our checkpoint, from a real (tiny) pretraining run."""
    d = tmp_path_factory.mktemp("pretrain")
    spec, params = tiny_pretrain(d, shapes_root / "coco", batch_size=4, max_steps=2,
                                 warmup_steps=1, checkpoint_every=2)
    mp = pytest.MonkeyPatch()
    mp.setenv("VIRTEX_CACHE", str(d / "cache"))
    try:
        assert main([str(spec), "--run_dir", str(d / "run"), *params]) == 0
    finally:
        mp.undo()
    return d / "run" / "checkpoints" / "step_0000002.pt"


def test_torchvision_resnet18_file_gives_torchvision_features(files):
    d, r18, _ = files
    backbone = ResNetBackbone("resnet18")
    load_backbone_weights(backbone, d / "resnet18.pth", "torchvision")
    _cnn_equal(backbone, r18.state_dict())
    x = torch.randn(2, 3, 64, 64)
    trunk = nn.Sequential(*list(r18.children())[:-2]).eval()
    assert torch.allclose(backbone.eval()(x), trunk(x), atol=1e-5)


def test_torchvision_resnet50_file_plain_and_wrapped(files, tmp_path):
    d, _, r50 = files
    state = r50.state_dict()
    torch.save({"epoch": 90, "state_dict": state}, tmp_path / "wrapped.pth")
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "optimizer": {}},
               tmp_path / "ddp.pth")
    for path in (d / "resnet50.pth", tmp_path / "wrapped.pth", tmp_path / "ddp.pth"):
        backbone = ResNetBackbone("resnet50")
        load_backbone_weights(backbone, path, "torchvision")
        _cnn_equal(backbone, state)


def test_frozen_batchnorm_backbone_loads_a_torchvision_file(files):
    d, r18, _ = files
    backbone = ResNetBackbone("resnet18", frozen_bn=True)
    load_backbone_weights(backbone, d / "resnet18.pth", "torchvision")
    _cnn_equal(backbone, {k: v for k, v in r18.state_dict().items()
                          if not k.endswith("num_batches_tracked")})


def test_safetensors_export_loads_back(files, tmp_path):
    _, r18, _ = files
    export_backbone(r18, tmp_path / "r18.safetensors")
    backbone = ResNetBackbone("resnet18")
    load_backbone_weights(backbone, tmp_path / "r18.safetensors", "torchvision")
    _cnn_equal(backbone, r18.state_dict())
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(UserError, match="bad.safetensors' is unreadable"):
        load_backbone_weights(backbone, tmp_path / "bad.safetensors", "torchvision")


def test_other_architecture_names_it_and_the_mismatched_keys(files):
    d, _, _ = files
    with pytest.raises(UserError) as e:
        load_backbone_weights(ResNetBackbone("resnet18"), d / "resnet50.pth", "torchvision")
    msg = str(e.value)
    assert "resnet50.pth' holds a resnet50, the backbone is a resnet18" in msg
    assert "layer1.0.conv1.weight (64, 64, 1, 1) vs (64, 64, 3, 3)" in msg
    assert "unexpected: layer1.0.conv3.weight" in msg
    with pytest.raises(UserError) as e:
        load_backbone_weights(ResNetBackbone("resnet50"), d / "resnet18.pth", "torchvision")
    msg = str(e.value)
    assert "holds a resnet18, the backbone is a resnet50" in msg
    assert "missing: layer1.0.conv3.weight" in msg


def test_a_damaged_state_dict_of_the_right_architecture(files, tmp_path):
    _, r18, _ = files
    state = dict(r18.state_dict())
    del state["layer2.1.bn2.weight"]
    torch.save(state, tmp_path / "damaged.pth")
    with pytest.raises(UserError, match=r"does not fit, the backbone is a resnet18 "
                                        r"\(missing: layer2.1.bn2.weight\)"):
        load_backbone_weights(ResNetBackbone("resnet18"), tmp_path / "damaged.pth", "torchvision")


def test_moco_checkpoint_loads_the_query_encoder_without_its_head(files, tmp_path):
    _, r18, _ = files
    query = r18.state_dict()
    key_encoder = _randomise(torchvision.models.resnet18(), 3).state_dict()
    state = {f"module.encoder_q.{k}": v for k, v in query.items() if not k.startswith("fc.")}
    state.update({"module.encoder_q.fc.0.weight": torch.randn(512, 512),  # MoCo v2 MLP head
                  "module.encoder_q.fc.2.weight": torch.randn(128, 512),
                  "module.queue": torch.randn(128, 16), "module.queue_ptr": torch.zeros(1)})
    state.update({f"module.encoder_k.{k}": v for k, v in key_encoder.items()})
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": state,
                "optimizer": {"state": {}, "param_groups": []}}, tmp_path / "moco.pth.tar")
    backbone = ResNetBackbone("resnet18")
    fc_before = backbone.cnn.fc.weight.clone()
    load_backbone_weights(backbone, tmp_path / "moco.pth.tar", "moco")
    _cnn_equal(backbone, query, skip_fc=True)
    assert torch.equal(backbone.cnn.fc.weight, fc_before)
    assert not torch.equal(backbone.cnn.conv1.weight, key_encoder["conv1.weight"])


def test_our_checkpoint_from_a_pretraining_run(pretrained):
    model = torch.load(pretrained, weights_only=True)["model"]
    backbone = ResNetBackbone("resnet18")
    load_backbone_weights(backbone, pretrained, "virtex")
    _cnn_equal(backbone, {k[len("visual.cnn."):]: v for k, v in model.items()
                          if k.startswith("visual.cnn.")})
    assert not torch.equal(backbone.cnn.conv1.weight, ResNetBackbone("resnet18").cnn.conv1.weight)


def test_published_virtex_checkpoint_without_fc(pretrained, tmp_path):
    model = torch.load(pretrained, weights_only=True)["model"]
    published = {k: v for k, v in model.items()
                 if k.startswith("visual.cnn.") and not k.startswith("visual.cnn.fc.")}
    published["textual.embedding.words.weight"] = torch.randn(300, 64)
    torch.save({"model": published, "optimizer": {}, "iteration": 500000}, tmp_path / "pub.pth")
    backbone = ResNetBackbone("resnet18")
    fc_before = backbone.cnn.fc.weight.clone()
    load_backbone_weights(backbone, tmp_path / "pub.pth", "virtex")
    _cnn_equal(backbone, {k[len("visual.cnn."):]: v for k, v in published.items()
                          if k.startswith("visual.cnn.")})
    assert torch.equal(backbone.cnn.fc.weight, fc_before)


def test_wrong_kind_of_file_says_which_kind_it_is(files, pretrained, tmp_path):
    d, r18, _ = files
    backbone = ResNetBackbone("resnet18")
    with pytest.raises(UserError, match=r"resnet18.pth' is not a VirTex checkpoint .*"
                                        r"it is a torchvision ResNet state dict .*"
                                        r"use weight_init='torchvision'"):
        load_backbone_weights(backbone, d / "resnet18.pth", "virtex")
    with pytest.raises(UserError, match=r"is not a torchvision ResNet .* use weight_init='virtex'"):
        load_backbone_weights(backbone, pretrained, "torchvision")
    with pytest.raises(UserError, match=r"is not a MoCo checkpoint .* use weight_init='virtex'"):
        load_backbone_weights(backbone, pretrained, "moco")
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in r18.state_dict().items()}},
               tmp_path / "moco.pth")
    with pytest.raises(UserError, match=r"use weight_init='moco'"):
        load_backbone_weights(backbone, tmp_path / "moco.pth", "torchvision")
    torch.save({"weights": torch.zeros(3), "epoch": 3}, tmp_path / "other.pt")
    with pytest.raises(UserError, match=r"other.pt' is not a VirTex checkpoint .*"
                                        r"its top-level keys are weights, epoch"):
        load_backbone_weights(backbone, tmp_path / "other.pt", "virtex")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(UserError, match="holds a Tensor, expected a dict"):
        load_backbone_weights(backbone, tmp_path / "tensor.pt", "torchvision")


def test_detect_kind(files, pretrained):
    d, r18, _ = files
    assert detect_kind(torch.load(pretrained, weights_only=True)) == "virtex"
    assert detect_kind(r18.state_dict()) == "torchvision"
    assert detect_kind({"state_dict": {f"module.encoder_q.{k}": v
                                       for k, v in r18.state_dict().items()}}) == "moco"
    assert detect_kind({"foo": torch.zeros(1)}) is None


def test_weight_init_and_path_errors(tmp_path):
    backbone = ResNetBackbone("resnet18")
    with pytest.raises(UserError, match="weight_init 'imagenet': expected one of virtex, "
                                        "torchvision, moco, random"):
        load_backbone_weights(backbone, tmp_path / "x.pt", "imagenet")
    with pytest.raises(UserError, match="needs a checkpoint: add --gin_param ckpt=PATH"):
        load_backbone_weights(backbone, None, "virtex")
    with pytest.raises(UserError, match="x.pt' does not exist"):
        load_backbone_weights(backbone, tmp_path / "x.pt", "torchvision")
    before = backbone.cnn.conv1.weight.clone()
    load_backbone_weights(backbone, None, "random")
    assert torch.equal(backbone.cnn.conv1.weight, before)


@pytest.mark.parametrize("name", sorted(RESNETS))
def test_guess_resnet_knows_every_backbone(name):
    with torch.device("meta"):
        state = RESNETS[name]().state_dict()
    assert guess_resnet(state) == name


def test_cli_checkpoint_of_another_architecture_is_one_line(files, tmp_path):
    d, _, _ = files
    res = run_cli("specs/downstream/voc07.gin", "--gin_param", "backbone=@backbones.resnet18",
                  "--gin_param", f"ckpt={d / 'resnet50.pth'}", "--gin_param",
                  "weight_init=torchvision", "--gin_param", f"data_root={tmp_path}",
                  "--run_dir", str(tmp_path / "run"))
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert lines[0].startswith("virtex: error: checkpoint '")
    assert "holds a resnet50, the backbone is a resnet18" in lines[0]
