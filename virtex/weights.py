"""Weights in and out: backbone initialisation from files the user gives (never a
download), published VirTex checkpoints into our models, backbones exported as plain
torchvision ResNets.

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

Published VirTex checkpoints (``torch.load(path)["model"]``) use ``visual.cnn.*`` (a
torchvision ResNet without ``fc``), ``textual.*`` and, for bicaptioning,
``backward_textual.*``, whose transformer is a stack of ``nn.TransformerDecoderLayer``
(``transformer.layers.N.self_attn.in_proj_weight`` ...); our heads keep separate q/k/v
projections (``layers.N.self_attn.q_proj.weight`` ...): :func:`virtex_state_dict_to_ours`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from virtex import checkpoint
from virtex.errors import UserError
from virtex.io import atomic_write

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
        for prefix in ("", "module.", "cnn."):
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


def backbone_state(state: Mapping, weight_init: str,
                   source: str = "the state dict") -> dict[str, torch.Tensor]:
    """The torchvision ResNet state dict (``conv1.weight``, ``layer1.*``, ...) in ``state``,
    a loaded file of kind ``weight_init``; ``source`` names it in the error when it is not."""
    if weight_init not in _EXTRACT:
        raise UserError(f"weight_init '{weight_init}': expected one of {', '.join(WEIGHT_INITS)}")
    cnn = _EXTRACT[weight_init](state)
    if not cnn:
        kind = detect_kind(state)
        if kind is not None:
            hint = f"it is a {_WHAT[kind]}: use weight_init='{kind}'"
        else:
            hint = f"its top-level keys are {', '.join(map(str, list(state)[:5])) or '(none)'}"
        raise UserError(f"{source} is not a {_WHAT[weight_init]}: {hint}")
    return cnn


def _few(keys: list[str], limit: int = 3) -> str:
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def key_mismatches(given: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                   what: str = "given vs expected") -> list[str]:
    """What keeps ``given`` from loading strictly where ``expected`` is the state dict:
    shape mismatches (``what`` names the two sides), missing and unexpected keys, the first
    few of each; ``[]`` when it fits."""
    shapes = [f"{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)}"
              for k in expected if k in given and given[k].shape != expected[k].shape]
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    return [f"{title}: {_few(keys)}" for title, keys in (
        (f"shape mismatch ({what})", shapes), ("missing", missing), ("unexpected", unexpected))
        if keys]


def _optional(key: str) -> bool:
    """Keys a backbone may lack or ignore: ``fc`` (unused) and ``num_batches_tracked``
    (absent with frozen BatchNorm)."""
    return key.startswith("fc.") or key.endswith("num_batches_tracked")


def load_backbone_state(backbone: nn.Module, state: Mapping[str, torch.Tensor],
                        source: str = "the state dict") -> list[str]:
    """Load a torchvision ResNet state dict into ``backbone`` (ours, with the ResNet at
    ``.cnn``, or a torchvision ResNet) in place; returns the keys left as they were (an
    absent ``fc``). Every other key must match in name and shape, else one error naming
    ``source``, the ResNet it holds and the mismatched keys."""
    cnn = getattr(backbone, "cnn", backbone)
    own = cnn.state_dict()
    state = {k: v for k, v in state.items() if k in own or not _optional(k)}
    state = {k: v for k, v in state.items() if not (_optional(k) and v.shape != own[k].shape)}
    expected = {k: v for k, v in own.items() if k in state or not _optional(k)}
    parts = key_mismatches(state, expected, "file vs backbone")
    if parts:
        arch = getattr(backbone, "name", type(backbone).__name__)
        found = guess_resnet(state)
        where = f"holds a {found}" if found and found != arch else "does not fit"
        raise UserError(f"{source} {where}, the backbone is a {arch} ({'; '.join(parts)})")
    cnn.load_state_dict(state, strict=False)
    return [k for k in own if k not in state]


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


def load_backbone_weights(backbone: nn.Module, path: str | Path | None, weight_init: str) -> None:
    """Initialise ``backbone`` (a module with a torchvision ResNet at ``.cnn``) in place
    from file ``path`` of kind ``weight_init``."""
    if weight_init not in WEIGHT_INITS:
        raise UserError(f"weight_init '{weight_init}': expected one of {', '.join(WEIGHT_INITS)}")
    if weight_init == "random":
        return
    if path is None:
        raise UserError(f"weight_init '{weight_init}' needs a checkpoint: add --gin_param ckpt=PATH")
    source = f"checkpoint '{path}'"
    load_backbone_state(backbone, backbone_state(_read(Path(path)), weight_init, source), source)


def backbone_state_dict(model_or_state: nn.Module | Mapping) -> dict[str, torch.Tensor]:
    """A plain torchvision ResNet state dict (detached CPU copies) from our model or
    backbone, a torchvision ResNet, or a loaded file of any ``weight_init`` kind.

    Missing BatchNorm ``num_batches_tracked`` entries (frozen BN) are filled with 0. A
    published VirTex checkpoint has no ``fc.*``: load the result with ``strict=False``.
    """
    if isinstance(model_or_state, nn.Module):
        module = getattr(model_or_state, "visual", model_or_state)
        state = getattr(module, "cnn", module).state_dict()
    else:
        kind = detect_kind(model_or_state)
        if kind is None:
            raise UserError("no ResNet weights found (expected 'visual.cnn.*', 'conv1.weight' "
                            "or 'module.encoder_q.*'); first keys: "
                            f"{', '.join(map(str, list(model_or_state)[:5])) or '(none)'}")
        state = _EXTRACT[kind](model_or_state)
    result = {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}
    for key in list(result):
        if key.endswith(".running_mean"):
            tracked = key.removesuffix("running_mean") + "num_batches_tracked"
            result.setdefault(tracked, torch.tensor(0, dtype=torch.long))
    return result


def export_backbone(model: nn.Module | Mapping, path: str | os.PathLike) -> None:
    """Write :func:`backbone_state_dict` atomically: ``.safetensors`` or ``torch.save``."""
    state = backbone_state_dict(model)
    if os.fspath(path).endswith(".safetensors"):
        from safetensors.torch import save

        data = save(state, metadata={"format": "pt"})
        atomic_write(path, lambda f: f.write(data))
    else:
        atomic_write(path, lambda f: torch.save(state, f))


# ------------------------------------------------------------ published VirTex checkpoints
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
    return f"{title} ({len(keys)}): {_few(keys, limit)}"


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
    parts = key_mismatches(ours, target, "converted checkpoint vs model")
    if parts:
        raise ValueError("architecture mismatch; " + "; ".join(parts))
    return ours
