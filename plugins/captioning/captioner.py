"""Caption a list of image files in batches with a captioning model.

Unreadable images do not stop the run: each comes back as ``(index, reason)``.
Progress is a tqdm bar on a terminal and a log line every ~10% otherwise.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from virtex.data.loader import data_loader
from virtex.data.readers import IMAGE_EXTENSIONS
from virtex.data.transforms import eval_min_side, eval_transform, load_image
from virtex.evaluation.api import inference
from virtex.models.decoding import beam_search_all

from .gallery import thumbnail_uri


@dataclass
class Caption:
    index: int  # position in the list of paths
    caption: str
    beams: list[dict] = field(default_factory=list)  # [{"caption", "score"}], best first
    thumbnail: str | None = None  # data URI


class _ImageFiles(Dataset):
    def __init__(self, paths: Sequence[Path], resize: int, size: int, thumbnail: int | None,
                 resize_mode: str = "exact"):
        self.paths, self.thumbnail = list(paths), thumbnail
        self.min_side = eval_min_side(resize, resize_mode)
        self.transform = eval_transform(resize, size, resize_mode)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        try:
            image = load_image(self.paths[i], self.min_side)
            tensor = self.transform({"image": image})["image"]
            thumb = thumbnail_uri(image, self.thumbnail) if self.thumbnail else None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            # DataFormatError is a ValueError; PIL raises SyntaxError for some broken headers
            return {"index": i, "error": _reason(exc, self.paths[i])}
        return {"index": i, "image": tensor, "thumbnail": thumb}


def _reason(exc: BaseException, path: Path) -> str:
    """The cause, without the path the caller already names."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    cause = text.rsplit(": ", 1)[-1].replace(f"'{path}'", "").replace(str(path), "").strip()
    return cause or text


def _collate(items: list[dict]) -> list[dict]:
    return items


class Progress:
    """tqdm on a TTY, else ``log`` lines at about every 10%."""

    def __init__(self, total: int, desc: str, log: Callable[[str], None], enabled: bool = True):
        self.total, self.desc, self.log, self.done, self.next_log = total, desc, log, 0, 0.1
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True)
        self.enabled = enabled

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and (self.done / max(1, self.total) >= self.next_log or self.done == self.total):
            self.log(f"{self.desc}: {self.done}/{self.total} images")
            while self.next_log <= self.done / max(1, self.total):
                self.next_log += 0.1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _decode(model: nn.Module, images: torch.Tensor, method: str, beam_size: int,
            max_length: int, all_beams: bool, decoder: str) -> list[list[dict]]:
    decode = model.tokenizer.decode
    if all_beams and method == "beam":
        beams = beam_search_all(model.textual, model.visual(images), model.sos_idx,
                                model.eos_idx, max_length, beam_size, decoder=decoder)
        return [[{"caption": decode(ids), "score": score} for ids, score in row] for row in beams]
    ids = model.generate(images, method=method, beam_size=beam_size, max_length=max_length,
                         decoder=decoder)
    return [[{"caption": decode(row)}] for row in ids]


def caption_files(model: nn.Module, paths: Sequence[Path], device: torch.device, *,
                  batch_size: int = 32, num_workers: int = 0, image_size: int = 224,
                  resize: int = 256, resize_mode: str = "exact", method: str = "beam", beam_size: int = 5,
                  max_length: int = 30, all_beams: bool = False, thumbnail: int | None = None,
                  log: Callable[[str], None] = print, progress: bool = True,
                  desc: str = "captioning", decoder: str = "paper",
                  on_batch: Callable[[list[Caption], list[tuple[int, str]]], None] | None = None,
                  ) -> tuple[list[Caption], list[tuple[int, str]]]:
    """Caption ``paths``; returns (captions, [(index, reason) of unreadable images]).
    ``on_batch`` is called with each batch's captions and errors as soon as it is done.

    Images: short side to ``resize``, central ``image_size`` crop (``resize_mode``: 'exact',
    the original's pixels, or 'antialias', ours; see :func:`eval_transform`). ``decoder``:
    ``"paper"`` (the original VirTex search) or ``"standard"`` (ours); see
    :mod:`virtex.models.decoding`."""
    dataset = _ImageFiles(paths, resize, image_size, thumbnail, resize_mode)
    loader = data_loader(dataset, batch_size=batch_size,
                        num_workers=num_workers, collate_fn=_collate)
    captions: list[Caption] = []
    errors: list[tuple[int, str]] = []
    bar = Progress(len(paths), desc, log, progress)
    with inference(model), contextlib.closing(bar):
        for items in loader:
            good = [it for it in items if "error" not in it]
            failed = [(it["index"], it["error"]) for it in items if "error" in it]
            done: list[Caption] = []
            if good:
                images = torch.stack([it["image"] for it in good]).to(device)
                for it, beams in zip(good, _decode(model, images, method, beam_size, max_length,
                                                   all_beams, decoder)):
                    done.append(Caption(it["index"], beams[0]["caption"],
                                        beams if all_beams else [], it["thumbnail"]))
            captions += done
            errors += failed
            if on_batch is not None:
                on_batch(done, failed)
            bar.update(len(items))
    return captions, errors


def list_images(folder: Path, recursive: bool = False) -> tuple[list[Path], list[Path], int]:
    """(image files by extension, other files, folders not searched) under ``folder``, sorted;
    hidden files and folders are left out."""
    entries = folder.rglob("*") if recursive else folder.iterdir()
    images, others, folders = [], [], 0
    for path in sorted(entries):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if path.is_dir():
            folders += not recursive
        elif path.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(path)
        elif path.is_file():
            others.append(path)
    return images, others, folders
