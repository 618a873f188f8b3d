"""Checkpoints: atomic writes, retention, newest-complete lookup, safe loading.

A checkpoint is data, never code: it is written with ``torch.save`` and read
with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import torch

from virtex.errors import UserError
from virtex.io import atomic_write, remove_stale_temporaries

_NAME = re.compile(r"^step_(\d{7,})\.pt$")


def checkpoint_path(directory: Path, step: int) -> Path:
    return Path(directory) / f"step_{step:07d}.pt"


def step_of(path: Path) -> int | None:
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoints in ``directory``, oldest first (temporary files are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if step_of(p) is not None]
    return sorted(found, key=lambda p: step_of(p) or 0)


def save(state: dict[str, Any], directory: Path, step: int) -> Path:
    """Write ``state`` as ``step_XXXXXXX.pt`` atomically."""
    return atomic_write(checkpoint_path(directory, step), lambda f: torch.save(state, f))


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely; one clear error if it is unreadable."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or holds code
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"checkpoint '{path}' is unreadable ({first[:200]})") from None
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint '{path}' holds a {type(obj).__name__}, expected a dict")
    return obj


def load_latest(directory: Path, map_location: str | torch.device = "cpu") -> tuple[Path, dict] | None:
    """The newest checkpoint that loads; a corrupt one is reported and skipped."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, load(path, map_location)
        except UserError as exc:
            print(f"virtex: warning: {exc}; falling back to the previous checkpoint", file=sys.stderr)
    return None


def prune(directory: Path, keep_last: int, keep_every: int | None) -> None:
    """Keep the newest ``keep_last`` checkpoints plus every ``keep_every``-th step, and
    remove the temporaries of killed writers of this host."""
    remove_stale_temporaries(directory)
    paths = list_checkpoints(directory)
    for path in paths[: max(0, len(paths) - keep_last)]:
        step = step_of(path) or 0
        if keep_every and step % keep_every == 0:
            continue
        path.unlink(missing_ok=True)
