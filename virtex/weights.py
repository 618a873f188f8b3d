"""Backbone weight initialisation from files the user gives (never a download)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from virtex import checkpoint
from virtex.errors import UserError

WEIGHT_INITS = ("virtex", "torchvision", "moco", "random")


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def backbone_state_from_file(path: str | Path, weight_init: str) -> dict[str, torch.Tensor]:
    """The state dict of a torchvision ResNet (``cnn.*`` keys stripped) from a file."""
    if weight_init not in WEIGHT_INITS:
        raise UserError(f"weight_init '{weight_init}': expected one of {', '.join(WEIGHT_INITS)}")
    state = checkpoint.load(path)
    if weight_init == "virtex":
        model = state.get("model", state)
        cnn = _strip(model, "visual.cnn.")
        if not cnn:
            raise UserError(
                f"checkpoint '{path}' has no 'visual.cnn.*' weights: not a virtex checkpoint "
                "(use weight_init='torchvision' or 'moco' for those files)"
            )
        return cnn
    if weight_init == "moco":
        model = state.get("state_dict", state)
        cnn = _strip(model, "module.encoder_q.")
        if not cnn:
            raise UserError(f"checkpoint '{path}' has no 'module.encoder_q.*' weights: not a MoCo checkpoint")
        return {k: v for k, v in cnn.items() if not k.startswith("fc.")}
    model = state.get("state_dict", state)
    if not any(k.startswith("layer1.") for k in model):
        raise UserError(f"checkpoint '{path}' is not a torchvision ResNet state dict (no 'layer1.*' keys)")
    return model


def load_backbone_weights(backbone: nn.Module, path: str | Path | None, weight_init: str) -> None:
    """Initialise ``backbone`` (a module with a torchvision ResNet at ``.cnn``) in place."""
    if weight_init == "random":
        return
    if path is None:
        raise UserError(f"weight_init '{weight_init}' needs a checkpoint: add --gin_param ckpt=PATH")
    state = backbone_state_from_file(path, weight_init)
    cnn = getattr(backbone, "cnn", backbone)
    own = cnn.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.endswith("num_batches_tracked")}
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")
               and not (weight_init == "moco" and k.startswith("fc."))]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"shape mismatch: {', '.join(mismatched[:3])}")
        if missing:
            parts.append(f"missing: {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected: {', '.join(unexpected[:3])}")
        raise UserError(
            f"checkpoint '{path}' does not fit the {type(backbone).__name__} backbone "
            f"({'; '.join(parts)}): is it another architecture?"
        )
    cnn.load_state_dict(state, strict=False)
