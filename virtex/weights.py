"""Backbone weight initialisation from files the user gives (never a download).

``weight_init`` says what kind of file ``ckpt`` is:

* ``virtex``: our checkpoint (``{"model": task state dict}``) or a published VirTex
  checkpoint; the backbone is ``model["visual.cnn.*"]`` (published ones have no ``fc``).
* ``torchvision``: an ImageNet-supervised torchvision ResNet state dict (plain, or under
  ``"state_dict"`` / ``"model"``, a DDP ``module.`` prefix allowed); ``.safetensors`` too.
* ``moco``: a MoCo checkpoint, ``"state_dict"`` with ``module.encoder_q.*`` (its ``fc``,
  the projection head, is dropped).
* ``random``: nothing is loaded.

The backbone never uses ``fc``: it is loaded when the file has one of the right shape
and left alone otherwise. Every other key must match in name and shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from virtex import checkpoint
from virtex.errors import UserError

WEIGHT_INITS = ("virtex", "torchvision", "moco", "random")
_WHAT = {
    "virtex": "VirTex checkpoint ('visual.cnn.*' weights under 'model')",
    "torchvision": "torchvision ResNet state dict ('conv1.weight', 'layer1.*', ...)",
    "moco": "MoCo checkpoint ('module.encoder_q.*' weights under 'state_dict')",
}
# (blocks per stage, bottleneck blocks, layer1 width) -> torchvision name
_RESNETS = {
    ((2, 2, 2, 2), False, 64): "resnet18",
    ((3, 4, 6, 3), False, 64): "resnet34",
    ((3, 4, 6, 3), True, 64): "resnet50",
    ((3, 4, 23, 3), True, 64): "resnet101",
    ((3, 8, 36, 3), True, 64): "resnet152",
    ((3, 4, 6, 3), True, 128): "wide_resnet50_2",
    ((3, 4, 23, 3), True, 128): "wide_resnet101_2",
}


def _tensors(obj: object, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a mapping whose keys start with ``prefix``, the prefix removed."""
    if not isinstance(obj, Mapping):
        return {}
    return {k[len(prefix):]: v for k, v in obj.items()
            if isinstance(k, str) and k.startswith(prefix) and isinstance(v, torch.Tensor)}


def _virtex(state: Mapping) -> dict[str, torch.Tensor]:
    model = state.get("model", state)
    return _tensors(model, "visual.cnn.") or _tensors(model, "module.visual.cnn.")


def _moco(state: Mapping) -> dict[str, torch.Tensor]:
    model = state.get("state_dict", state)
    cnn = _tensors(model, "module.encoder_q.") or _tensors(model, "encoder_q.")
    return {k: v for k, v in cnn.items() if not k.startswith("fc.")}


def _torchvision(state: Mapping) -> dict[str, torch.Tensor]:
    for candidate in (state, state.get("state_dict"), state.get("model")):
        for prefix in ("", "module."):
            cnn = _tensors(candidate, prefix)
            if "conv1.weight" in cnn and any(k.startswith("layer1.") for k in cnn):
                return cnn
    return {}


_EXTRACT = {"virtex": _virtex, "torchvision": _torchvision, "moco": _moco}


def detect_kind(state: Mapping) -> str | None:
    """Which ``weight_init`` a loaded file fits (``None``: none of them)."""
    for kind in ("virtex", "moco", "torchvision"):
        if _EXTRACT[kind](state):
            return kind
    return None


def guess_resnet(state: Mapping[str, torch.Tensor]) -> str | None:
    """The torchvision ResNet a (``cnn.``-stripped) state dict comes from, if a known one."""
    blocks = []
    for stage in range(1, 5):
        indices = [int(k.split(".")[1]) for k in state if k.startswith(f"layer{stage}.")]
        if not indices:
            return None
        blocks.append(max(indices) + 1)
    first = state.get("layer1.0.conv1.weight")
    width = int(first.shape[0]) if isinstance(first, torch.Tensor) else 0
    return _RESNETS.get((tuple(blocks), "layer1.0.conv3.weight" in state, width))


def _read(path: Path) -> dict:
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise UserError(f"checkpoint '{path}' does not exist")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise UserError(f"checkpoint '{path}' is unreadable ({str(exc)[:200]})") from None
    return checkpoint.load(path)


def backbone_state_from_file(path: str | Path, weight_init: str) -> dict[str, torch.Tensor]:
    """The torchvision ResNet state dict (``conv1.weight``, ``layer1.*``, ...) in a file."""
    if weight_init not in _EXTRACT:
        raise UserError(f"weight_init '{weight_init}': expected one of {', '.join(WEIGHT_INITS)}")
    path = Path(path)
    state = _read(path)
    cnn = _EXTRACT[weight_init](state)
    if not cnn:
        kind = detect_kind(state)
        if kind is not None:
            hint = f"it is a {_WHAT[kind]}: use weight_init='{kind}'"
        else:
            hint = f"its top-level keys are {', '.join(map(str, list(state)[:5])) or '(none)'}"
        raise UserError(f"checkpoint '{path}' is not a {_WHAT[weight_init]}: {hint}")
    return cnn


def load_backbone_weights(backbone: nn.Module, path: str | Path | None, weight_init: str) -> None:
    """Initialise ``backbone`` (a module with a torchvision ResNet at ``.cnn``) in place."""
    if weight_init not in WEIGHT_INITS:
        raise UserError(f"weight_init '{weight_init}': expected one of {', '.join(WEIGHT_INITS)}")
    if weight_init == "random":
        return
    if path is None:
        raise UserError(f"weight_init '{weight_init}' needs a checkpoint: add --gin_param ckpt=PATH")
    state = backbone_state_from_file(path, weight_init)
    cnn = getattr(backbone, "cnn", backbone)
    own = cnn.state_dict()
    # fc is unused by the backbone; num_batches_tracked is absent with frozen BatchNorm
    optional = [k for k in own if k.startswith("fc.") or k.endswith("num_batches_tracked")]
    state = {k: v for k, v in state.items()
             if k in own or not (k.startswith("fc.") or k.endswith("num_batches_tracked"))}
    state = {k: v for k, v in state.items()
             if not (k in optional and v.shape != own[k].shape)}
    missing = [k for k in own if k not in state and k not in optional]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"shape mismatch (file vs backbone): {', '.join(mismatched[:3])}")
        if missing:
            parts.append(f"missing: {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected: {', '.join(unexpected[:3])}")
        arch = getattr(backbone, "name", type(backbone).__name__)
        found = guess_resnet(state)
        where = f"holds a {found}" if found and found != arch else "does not fit"
        raise UserError(f"checkpoint '{path}' {where}, the backbone is a {arch} "
                        f"({'; '.join(parts)})")
    cnn.load_state_dict(state, strict=False)
