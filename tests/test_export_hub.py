"""Exporting the backbone and loading it with torch.hub from this repository (local files only)."""

from __future__ import annotations

import subprocess
import sys

import torch
import torchvision
from cli import REPO
from safetensors.torch import load_file

from virtex.models.visual import ResNetBackbone


def _checkpoint(tmp_path):
    torch.manual_seed(3)
    backbone = ResNetBackbone("resnet50")
    path = tmp_path / "step_0000010.pt"
    torch.save({"model": {f"visual.{k}": v for k, v in backbone.state_dict().items()},
                "step": 10}, path)
    return backbone, path


def test_export_command_writes_torchvision_state_dicts(tmp_path):
    backbone, ckpt = _checkpoint(tmp_path)
    for name in ("r50.pth", "r50.safetensors"):
        out = tmp_path / name
        res = subprocess.run([sys.executable, "-m", "virtex.tools.export", "--ckpt", str(ckpt),
                              "--out", str(out)], capture_output=True, text=True, cwd=REPO)
        assert res.returncode == 0, res.stderr
        state = load_file(out) if name.endswith(".safetensors") else torch.load(out, weights_only=True)
        model = torchvision.models.resnet50()
        assert model.load_state_dict(state, strict=True)  # no missing or unexpected keys
        assert torch.equal(model.layer4[2].conv3.weight, backbone.cnn.layer4[2].conv3.weight)
    bad = subprocess.run([sys.executable, "-m", "virtex.tools.export", "--ckpt",
                          str(tmp_path / "none.pt"), "--out", str(tmp_path / "x.pth")],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_torch_hub_loads_the_pretrained_backbone_from_a_local_file(tmp_path):
    backbone, ckpt = _checkpoint(tmp_path)
    model = torch.hub.load(str(REPO), "resnet50", source="local", weights=str(ckpt))
    assert isinstance(model, torchvision.models.ResNet)
    x = torch.randn(2, 3, 64, 64)
    backbone.eval()
    model.eval()
    with torch.no_grad():
        cnn = backbone.cnn
        expected = cnn.avgpool(backbone(x)).flatten(1)
        got = torch.flatten(model.avgpool(model.layer4(model.layer3(model.layer2(model.layer1(
            model.maxpool(model.relu(model.bn1(model.conv1(x))))))))), 1)
    assert torch.allclose(got, expected)
    random = torch.hub.load(str(REPO), "resnet50", source="local")
    assert not torch.equal(random.conv1.weight, model.conv1.weight)
