"""torch.hub entry points: ``torch.hub.load(REPO_OR_DIR, "resnet50", weights=PATH)``.

``weights`` is a local file: a virtex checkpoint (``{"model": ...}`` with ``visual.cnn.*``),
a published VirTex checkpoint, or a backbone exported by ``python -m virtex.tools.export``
(``.pt`` or ``.safetensors``). A URL is fetched only when the caller passes one.
Without ``weights`` the ResNet is randomly initialised. ``pretrained=True`` gives the
published backbone of the paper's best model (``bicaptioning_R_50_L1_H2048`` for ResNet-50;
the R-101 and wide R-50 2x ablations for the others), downloaded once into torch hub's cache
as the original's one-line ``torch.hub.load`` does (``$VIRTEX_ZOO_URL``: a mirror holding
``NAME.pth``). Needs only torch and torchvision.

As the original VirTex hub entries, each returns a torchvision ResNet whose ``avgpool`` and
``fc`` are ``nn.Identity``: a feature extractor, not a classifier. Calling it on an
``(N, 3, H, W)`` batch returns the layer4 feature map *flattened* by torchvision's forward:
shape ``(N, C * h * w)`` with ``C = 2048`` (ResNet-50/101, wide ResNet-50 2x) and
``h, w = ceil(H / 32), ceil(W / 32)``, i.e. ``(N, 100352)`` for 224 x 224 images. Recover the
spatial grid with ``out.view(N, C, h, w)`` and global-average-pool with ``.mean((2, 3))``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

dependencies = ["torch", "torchvision"]

# The published model each hub entry's pretrained=True gives (names of virtex/zoo.json).
PRETRAINED = {"resnet50": "bicaptioning_R_50_L1_H2048",
              "resnet101": "bicaptioning_R_101_L1_H1024",
              "wide_resnet50_2": "bicaptioning_R_50W2X_L1_H1024"}


def _zoo_url(name: str) -> str:
    table = json.loads((Path(__file__).resolve().parent / "virtex" / "zoo.json").read_text())
    mirror = os.environ.get("VIRTEX_ZOO_URL")
    if mirror:
        return f"{mirror.rstrip('/')}/{name}.pth"
    return f"{table['base_url']}/{table['models'][name]['file']}"


def _resnet(arch: str, weights: str | None, progress: bool, pretrained: bool = False):
    import torch
    import torchvision

    model = getattr(torchvision.models, arch)(weights=None)
    model.avgpool, model.fc = torch.nn.Identity(), torch.nn.Identity()  # features out
    file_name = None
    if pretrained:
        if weights is not None:
            raise ValueError("give weights=PATH or pretrained=True, not both")
        # the same cache file as ``--gin_param ckpt=zoo:NAME`` (virtex.zoo)
        weights, file_name = _zoo_url(PRETRAINED[arch]), f"virtex-{PRETRAINED[arch]}.pth"
    if weights is None:
        return model
    if str(weights).startswith(("http://", "https://")):  # explicit opt-in by the caller
        state = torch.hub.load_state_dict_from_url(str(weights), progress=progress,
                                                   map_location="cpu", weights_only=True,
                                                   file_name=file_name)
    elif str(weights).endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(str(weights))
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    for prefix in ("visual.cnn.", "cnn."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if "conv1.weight" not in state:
        raise ValueError(f"{weights}: no ResNet weights (expected 'visual.cnn.*' or plain keys)")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # no classifier here
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"{weights}: does not fit torchvision {arch}; missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    model.load_state_dict(state, strict=False)  # num_batches_tracked may be absent
    return model


def resnet50(weights: str | None = None, progress: bool = True, pretrained: bool = False,
            **kwargs):
    """The VirTex-pretrained ResNet-50 visual backbone: a torchvision ResNet-50 with
    ``avgpool`` and ``fc`` replaced by ``nn.Identity``; returns flattened (N, 2048*h*w)
    layer4 features (see the module docstring)."""
    return _resnet("resnet50", weights, progress, pretrained)


def resnet101(weights: str | None = None, progress: bool = True, pretrained: bool = False,
             **kwargs):
    """A VirTex-pretrained ResNet-101 backbone (``avgpool``, ``fc``: ``nn.Identity``)."""
    return _resnet("resnet101", weights, progress, pretrained)


def wide_resnet50_2(weights: str | None = None, progress: bool = True, pretrained: bool = False,
                   **kwargs):
    """A VirTex-pretrained wide ResNet-50 2x backbone (``avgpool``, ``fc``: ``nn.Identity``)."""
    return _resnet("wide_resnet50_2", weights, progress, pretrained)
