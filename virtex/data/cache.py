"""Where generated data and derived files (vocabularies, feature caches) live."""

from __future__ import annotations

import os
from pathlib import Path

import gin


def cache_dir() -> Path:
    """``$VIRTEX_CACHE``, else ``~/.cache/virtex``."""
    return Path(os.environ.get("VIRTEX_CACHE") or Path.home() / ".cache" / "virtex").expanduser()


@gin.configurable("shapes_dir")
def shapes_dir(subdir: str = "", images: int = 1000, seed: int = 0, root: str | None = None) -> str:
    """The generated captioned-shapes dataset (made on first use), or one of its sub-folders.

    ``subdir`` picks a format: ``coco``, ``VOC2007``, ``imagenet``, ``inat2018`` or ``lvis``.
    """
    from virtex.tools.make_shapes import ensure_shapes

    base = Path(root) if root else cache_dir() / f"shapes-{images}-{seed}"
    return str(ensure_shapes(base, images=images, seed=seed) / subdir)
