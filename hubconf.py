"""torch.hub entry points: ``torch.hub.load(REPO_OR_DIR, "resnet50", weights=PATH)``.

``weights`` is a local file: a virtex checkpoint (``{"model": ...}`` with ``visual.cnn.*``),
a published VirTex checkpoint, or a backbone exported by ``python -m virtex.tools.export``
(``.pt`` or ``.safetensors``). A URL is fetched only when the caller passes one.
Without ``weights`` the ResNet is randomly initialised. Needs only torch and torchvision.
"""

from __future__ import annotations

dependencies = ["torch", "torchvision"]


def _resnet(arch: str, weights: str | None, progress: bool):
    import torch
    import torchvision

    model = getattr(torchvision.models, arch)(weights=None)
    if weights is None:
        return model
    if str(weights).startswith(("http://", "https://")):  # explicit opt-in by the caller
        state = torch.hub.load_state_dict_from_url(str(weights), progress=progress,
                                                   map_location="cpu", weights_only=True)
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
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.startswith("fc.")
               and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"{weights}: does not fit torchvision {arch}; missing {missing[:3]}")
    model.load_state_dict(state, strict=False)  # a published checkpoint has no fc
    return model


def resnet50(weights: str | None = None, progress: bool = True, **kwargs):
    """The VirTex-pretrained ResNet-50 visual backbone as a torchvision ResNet-50."""
    return _resnet("resnet50", weights, progress)


def resnet101(weights: str | None = None, progress: bool = True, **kwargs):
    """A VirTex-pretrained ResNet-101 backbone."""
    return _resnet("resnet101", weights, progress)


def wide_resnet50_2(weights: str | None = None, progress: bool = True, **kwargs):
    """A VirTex-pretrained wide ResNet-50 2x backbone."""
    return _resnet("wide_resnet50_2", weights, progress)
