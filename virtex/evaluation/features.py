"""Frozen-backbone features: extraction in batches and a cache keyed by weights and transform."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from virtex.data.cache import cache_dir
from virtex.data.loader import data_loader
from virtex.data.transforms import Compose, load_image
from virtex.evaluation.api import inference
from virtex.io import atomic_write

# Part of every cache key: bump it when decoding or the transforms change pixels without
# changing the transform's repr (2: EXIF orientation, image modes, floored crop offsets).
PIXELS_VERSION = 2


class _Images(Dataset):
    def __init__(self, paths: Sequence[Path], transform: Compose, min_side: int | None):
        self.paths, self.transform, self.min_side = list(paths), transform, min_side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = load_image(self.paths[i], self.min_side)
        return self.transform({"image": image})["image"]


def weights_hash(module: nn.Module) -> str:
    """A digest of a module's parameters and buffers (what its features depend on)."""
    h = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def extract_features(backbone: nn.Module, paths: Sequence[Path], transform: Compose,
                     device: torch.device, batch_size: int = 64, num_workers: int = 2,
                     min_side: int | None = None) -> torch.Tensor:
    """Global-average-pooled features ``(N, C)`` of ``paths`` (backbone in eval mode)."""
    loader = data_loader(_Images(paths, transform, min_side), batch_size=batch_size,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    out = []
    with inference(backbone):
        for images in loader:
            feats = backbone(images.to(device, non_blocking=True))
            out.append(feats.float().mean(dim=(2, 3)).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def cached_features(backbone: nn.Module, paths: Sequence[Path], transform: Compose,
                    device: torch.device, tag: str, **kwargs: object) -> torch.Tensor:
    """:func:`extract_features`, cached under ``cache_dir()/features`` by weights,
    transform and image list, so re-running an evaluation on the same backbone is instant.

    The image list enters the key with each file's size and modification time, so a
    dataset rewritten in place is extracted anew.
    """
    key = features_key(backbone, paths, transform, kwargs.get("min_side"))
    path = cache_dir() / "features" / f"{tag}-{key}.pt"
    if path.is_file():
        try:
            feats = torch.load(path, weights_only=True)
            if isinstance(feats, torch.Tensor) and len(feats) == len(paths):
                return feats
        except Exception:  # a damaged cache entry is recomputed
            pass
        path.unlink(missing_ok=True)
    feats = extract_features(backbone, paths, transform, device, **kwargs)  # type: ignore[arg-type]
    atomic_write(path, lambda f: torch.save(feats, f))
    return feats


def features_key(backbone: nn.Module, paths: Sequence[Path], transform: Compose,
                 min_side: object = None) -> str:
    """The cache key of :func:`cached_features`: weights, transform, decode size, images."""
    h = hashlib.sha1()
    h.update(f"pixels-v{PIXELS_VERSION}".encode())
    h.update(weights_hash(backbone).encode())
    h.update(repr(transform).encode())
    h.update(repr(min_side).encode())
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}:missing\n".encode())
    return h.hexdigest()[:16]
