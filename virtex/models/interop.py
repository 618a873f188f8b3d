"""Weights in and out: published VirTex checkpoints, torchvision ResNets, MoCo checkpoints.

Published VirTex checkpoints (``torch.load(path)["model"]``) use ``visual.cnn.*`` (a
torchvision ResNet without ``fc``), ``textual.*`` and, for bicaptioning,
``backward_textual.*``, whose transformer is a stack of ``nn.TransformerDecoderLayer``
(``transformer.layers.N.self_attn.in_proj_weight`` ...). Our heads keep separate
q/k/v projections (``layers.N.self_attn.q_proj.weight`` ...).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch
from torch import nn

from virtex.models.visual import ResNetBackbone

_HEADS = {"textual": "textual", "backward_textual": "textual_backward"}
_HEAD_KEYS = (
    "embedding.words.weight",
    "embedding.positions.weight",
    "embedding.layer_norm.weight",
    "embedding.layer_norm.bias",
    "visual_projection.weight",
    "visual_projection.bias",
    "output.weight",
    "output.bias",
)
_LAYER_KEYS = tuple(
    [
        f"{attn}.{p}"
        for attn in ("self_attn", "multihead_attn")
        for p in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
    ]
    + [
        f"{m}.{p}"
        for m in ("linear1", "linear2", "norm1", "norm2", "norm3")
        for p in ("weight", "bias")
    ]
)
_LAYER_RE = re.compile(r"transformer\.layers\.(\d+)\.(.+)")


def _unwrap(state_dict: Mapping) -> dict:
    """Accept a whole checkpoint (``{"model": ...}``) and strip a DDP ``module.`` prefix."""
    if "model" in state_dict and isinstance(state_dict["model"], Mapping):
        state_dict = state_dict["model"]
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def _listing(title: str, keys: list[str], limit: int = 10) -> str:
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{title} ({len(keys)}): {', '.join(keys[:limit])}{more}"


def _convert_head_key(suffix: str, value: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """Published head key suffix -> our suffix(es); None if not a known key."""
    if suffix in _HEAD_KEYS:
        return {suffix: value}
    match = _LAYER_RE.fullmatch(suffix)
    if match is None or match[2] not in _LAYER_KEYS:
        return None
    index, name = match[1], match[2].replace("multihead_attn", "cross_attn")
    attn, _, param = name.partition(".")
    if param in ("in_proj_weight", "in_proj_bias"):
        kind = "weight" if param == "in_proj_weight" else "bias"
        q, k, v = value.chunk(3, dim=0)
        return {
            f"layers.{index}.{attn}.{proj}_proj.{kind}": tensor
            for proj, tensor in zip("qkv", (q, k, v))
        }
    return {f"layers.{index}.{name}": value}


def _missing_published_keys(state_dict: dict) -> list[str]:
    missing = [] if "visual.cnn.conv1.weight" in state_dict else ["visual.cnn.conv1.weight"]
    if not any(k.startswith("textual.") for k in state_dict):
        missing.append("textual.*")
    for prefix in _HEADS:
        keys = [k[len(prefix) + 1 :] for k in state_dict if k.startswith(prefix + ".")]
        if not keys:
            continue
        layers = {int(m[1]) for k in keys if (m := _LAYER_RE.fullmatch(k))}
        wanted = list(_HEAD_KEYS) + [
            f"transformer.layers.{i}.{name}"
            for i in range(max(layers, default=-1) + 1)
            for name in _LAYER_KEYS
        ]
        missing += [f"{prefix}.{k}" for k in wanted if k not in keys]
    return missing


def virtex_state_dict_to_ours(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """Map a published VirTex ``model`` state dict to our Bicaptioning/Captioning keys.

    Raises ValueError listing unexpected and missing keys. With ``model`` given, the
    result is also checked against ``model.state_dict()`` (keys and shapes); keys the
    published format lacks by design (``visual.cnn.fc.*``, which VirTex removed, and
    BatchNorm ``num_batches_tracked``) are then taken from ``model``, so that
    ``model.load_state_dict(result)`` works with ``strict=True``.
    """
    source = _unwrap(state_dict)
    ours: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in source.items():
        prefix, _, suffix = key.partition(".")
        converted = None
        if prefix == "visual" and suffix.startswith("cnn."):
            converted = {suffix: value}
        elif prefix in _HEADS:
            converted = _convert_head_key(suffix, value)
        if converted is None:
            unexpected.append(key)
            continue
        new_prefix = _HEADS.get(prefix, prefix)
        ours.update({f"{new_prefix}.{k}": v for k, v in converted.items()})
    missing = _missing_published_keys(source)
    if unexpected or missing:
        raise ValueError(
            "not a VirTex checkpoint in the expected format; "
            + "; ".join(
                _listing(title, keys)
                for title, keys in (("unexpected keys", unexpected), ("missing keys", missing))
                if keys
            )
        )
    if model is not None:
        ours = _match_model(ours, model.state_dict())
    return ours


def _match_model(ours: dict, target: dict) -> dict:
    for key, value in target.items():
        by_design = key.startswith("visual.cnn.fc.") or key.endswith("num_batches_tracked")
        if key not in ours and by_design:
            ours[key] = value
    ours = {k: v for k, v in ours.items() if k in target or not k.endswith("num_batches_tracked")}
    _check_against(ours, target, "converted checkpoint vs model")
    return ours


def _check_against(source: dict, target: dict, what: str, optional: tuple = ()) -> None:
    """ValueError naming unexpected/missing keys and shape mismatches (first few of each)."""
    unexpected = [k for k in source if k not in target]
    missing = [k for k in target if k not in source and not k.startswith(optional)]
    shapes = [
        f"{k}: {tuple(source[k].shape)} vs {tuple(target[k].shape)}"
        for k in source
        if k in target and source[k].shape != target[k].shape
    ]
    problems = [
        _listing(title, keys)
        for title, keys in (
            ("shape mismatches (given vs expected)", shapes),
            ("unexpected keys", unexpected),
            ("missing keys", missing),
        )
        if keys
    ]
    if problems:
        raise ValueError(f"{what}: architecture mismatch; " + "; ".join(problems))


def backbone_state_dict(model_or_state_dict: nn.Module | Mapping) -> dict[str, torch.Tensor]:
    """A plain torchvision ResNet state dict from our model / backbone or a checkpoint.

    Accepts a model with ``.visual``, a :class:`ResNetBackbone`, a torchvision ResNet, or
    a state dict with ``visual.cnn.*`` / ``cnn.*`` / plain keys. Missing BatchNorm
    ``num_batches_tracked`` entries (frozen BN) are filled with 0. A published VirTex
    checkpoint has no ``fc.*``: load its result with ``strict=False`` (fc stays random).
    """
    obj = model_or_state_dict
    if isinstance(obj, nn.Module):
        obj = getattr(obj, "visual", obj)
        obj = getattr(obj, "cnn", obj)
        state = obj.state_dict()
    else:
        state = _unwrap(obj)
        for prefix in ("visual.cnn.", "cnn."):
            if any(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
                break
    if "conv1.weight" not in state:
        raise ValueError(
            "no ResNet weights found (expected 'conv1.weight', 'visual.cnn.conv1.weight' "
            f"or 'cnn.conv1.weight'); first keys: {list(state)[:5]}"
        )
    result = {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}
    for key in list(result):
        if key.endswith(".running_mean"):
            tracked = key.removesuffix("running_mean") + "num_batches_tracked"
            result.setdefault(tracked, torch.tensor(0, dtype=torch.long))
    return result


def export_backbone(model: nn.Module | Mapping, path: str | os.PathLike) -> None:
    """Write :func:`backbone_state_dict` atomically: ``.safetensors`` or ``torch.save``."""
    from virtex.io import atomic_write

    state = backbone_state_dict(model)
    if os.fspath(path).endswith(".safetensors"):
        from safetensors.torch import save

        data = save(state, metadata={"format": "pt"})
        atomic_write(path, lambda f: f.write(data))
    else:
        atomic_write(path, lambda f: torch.save(state, f))


def load_torchvision_backbone_weights(
    backbone: ResNetBackbone | nn.Module, state_dict: Mapping[str, torch.Tensor]
) -> list[str]:
    """Load torchvision-format ResNet weights into ``backbone`` (ours or a torchvision ResNet).

    ``fc.*`` may be absent (e.g. converted MoCo weights); every other key must match in
    name and shape, else ValueError naming the mismatches. Returns the keys left as
    they were (absent ``fc.*``).
    """
    cnn = getattr(backbone, "cnn", backbone)
    source = backbone_state_dict(state_dict)
    target = backbone_state_dict(cnn)
    _check_against(source, target, "loading ResNet weights", optional=("fc.",))
    cnn.load_state_dict(source, strict=False)
    return [k for k in target if k not in source]


def moco_state_dict_to_torchvision(state_dict: Mapping) -> dict[str, torch.Tensor]:
    """MoCo checkpoint -> torchvision ResNet state dict.

    Keeps the query encoder (``module.encoder_q.*``), strips that prefix and drops its
    ``fc`` (the MoCo projection head), so the result has no ``fc.*`` keys.
    """
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    result = {}
    for key, value in state_dict.items():
        name = key.removeprefix("module.")
        if name.startswith("encoder_q.") and not name.startswith("encoder_q.fc."):
            result[name.removeprefix("encoder_q.")] = value
    if not result:
        raise ValueError(
            "no MoCo query-encoder weights found (expected keys 'module.encoder_q.*'); "
            f"first keys: {list(state_dict)[:5]}"
        )
    return result
