"""Exporting the backbone and loading it with torch.hub from this repository (local files only)."""

from __future__ import annotations

import subprocess
import sys

import pytest
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
    for name in ("r50.pth", "new/folder/r50.safetensors"):  # a missing folder is made
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
    torch.save({"model": {"encoder.weight": torch.zeros(1)}}, tmp_path / "other.pt")
    other = subprocess.run([sys.executable, "-m", "virtex.tools.export", "--ckpt",
                            str(tmp_path / "other.pt"), "--out", str(tmp_path / "x.pth")],
                           capture_output=True, text=True, cwd=REPO)
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert other.stderr.startswith("export: error: no ResNet weights found")
    (tmp_path / "file").write_text("")
    blocked = subprocess.run([sys.executable, "-m", "virtex.tools.export", "--ckpt", str(ckpt),
                              "--out", str(tmp_path / "file" / "r50.pth")],
                             capture_output=True, text=True, cwd=REPO)
    assert blocked.returncode == 2 and "Traceback" not in blocked.stderr
    assert blocked.stderr.strip() == (f"export: error: cannot write {tmp_path / 'file' / 'r50.pth'}"
                                      f": {tmp_path / 'file'} is not a directory")


def test_torch_hub_returns_the_flattened_feature_map_as_the_original_hub_entry(tmp_path):
    backbone, ckpt = _checkpoint(tmp_path)
    model = torch.hub.load(str(REPO), "resnet50", source="local", weights=str(ckpt))
    assert isinstance(model, torchvision.models.ResNet)
    assert isinstance(model.avgpool, torch.nn.Identity) and isinstance(model.fc, torch.nn.Identity)
    x = torch.randn(2, 3, 64, 96)
    backbone.eval()
    model.eval()
    with torch.no_grad():
        grid = backbone(x)  # our backbone: the (N, 2048, h, w) layer4 map
        out = model(x)
    assert grid.shape == (2, 2048, 2, 3)
    assert out.shape == (2, 2048 * 2 * 3)  # flattened, not 1000 logits
    assert torch.allclose(out.view(2, 2048, 2, 3), grid, atol=1e-5)
    assert torch.allclose(out.view(2, 2048, 2, 3).mean((2, 3)),
                          backbone.cnn.avgpool(grid).flatten(1), atol=1e-5)
    random = torch.hub.load(str(REPO), "resnet50", source="local")
    assert isinstance(random.fc, torch.nn.Identity)
    assert not torch.equal(random.conv1.weight, model.conv1.weight)
    with torch.no_grad():
        assert random.eval()(torch.randn(1, 3, 224, 224)).shape == (1, 2048 * 7 * 7)


def test_torch_hub_rejects_weights_of_another_architecture(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ValueError, match="does not fit torchvision resnet50"):
        torch.hub.load(str(REPO), "resnet50", source="local", weights=str(path))
