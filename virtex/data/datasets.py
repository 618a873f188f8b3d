"""Torch datasets: COCO captions for pretraining, generic image classification for transfer."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from virtex.data.masking import CaptionMasking
from virtex.data.readers import read_coco_captions, read_coco_instance_labels
from virtex.data.tokenizer import SentencePieceTokenizer
from virtex.data.transforms import load_image, open_image, to_float_tensor

Transform = Callable[[dict], dict]


def _load(path: Path, transform: Transform | None) -> dict:
    """Sample dict for ``path``: a lazily opened image if the transform decodes it itself."""
    lazy = getattr(transform, "accepts_lazy_image", False)
    return {"image": open_image(path) if lazy else load_image(path)}


def _image_tensor(sample: dict) -> torch.Tensor:
    image = sample["image"]
    return image if isinstance(image, torch.Tensor) and image.is_floating_point() \
        else to_float_tensor(image)


def caption_tokens(tokenizer: SentencePieceTokenizer, caption: str,
                   max_length: int = 30) -> tuple[list[int], list[int]]:
    """Forward and backward tokens of ``caption`` as the original dataset builds them:
    ``[SOS] w1 .. wn [EOS]`` cut to its first ``max_length`` ids (a long caption loses
    [EOS]), and the exact reverse of that list (``[EOS] wn .. w1 [SOS]``)."""
    tokens = [tokenizer.sos_id, *tokenizer.encode(caption), tokenizer.eos_id][:max_length]
    return tokens, tokens[::-1]


class CocoCaptionsDataset(Dataset):
    """COCO images with one caption each, sampled anew (torch RNG) at every access.

    The transform sees ``{"image", "caption"}`` (so a flip can swap "left"/"right")
    before the caption is tokenised. Items: ``image`` float (3, H, W),
    ``caption_tokens`` [SOS] w1 .. wn [EOS] cut to its first ``max_caption_length`` ids (a
    long caption loses [EOS], as in the original), ``noitpac_tokens`` the exact reverse
    ([EOS] wn .. w1 [SOS]), ``caption_lengths``, ``image_id``.

    With ``labels_from_instances``, ``labels``: the image's distinct instance categories as
    int64 class ids 1..K (the instances file's ``categories`` order; 0 is background and
    padding), as the original VirTex multilabel dataset; images without any instance are
    dropped unless ``keep_unlabelled`` (then their ``labels`` is empty).

    With ``masking`` (masked LM), ``caption_tokens`` is the masked caption and
    ``masked_labels`` holds the original ids at the [MASK]ed positions, ``pad_id``
    elsewhere; the masking draws from Python's :mod:`random` after the caption is drawn.
    """

    def __init__(self, root: str | Path, split: str, tokenizer: SentencePieceTokenizer,
                 transform: Transform | None, max_caption_length: int = 30,
                 labels_from_instances: bool = False, keep_unlabelled: bool = False,
                 masking: CaptionMasking | None = None) -> None:
        if max_caption_length < 3:
            raise ValueError(f"max_caption_length={max_caption_length}: need room for "
                             "[SOS], one token and [EOS]")
        self.records = read_coco_captions(root, split)
        self.tokenizer = tokenizer
        self.transform = transform
        self.max_caption_length = max_caption_length
        self.masking = masking
        self.labels: dict[int, list[int]] | None = None
        self.categories: list[str] = []
        if labels_from_instances:
            self.labels, self.categories = read_coco_instance_labels(root, split)
            if not keep_unlabelled:
                self.records = [r for r in self.records if self.labels.get(r.image_id)]

    def __len__(self) -> int:
        return len(self.records)

    def tokens(self, caption: str) -> tuple[list[int], list[int]]:
        """``(caption_tokens, noitpac_tokens)`` of one caption (see :func:`caption_tokens`)."""
        return caption_tokens(self.tokenizer, caption, self.max_caption_length)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        record = self.records[index]
        caption = record.captions[int(torch.randint(len(record.captions), ()).item())]
        sample = {**_load(record.path, self.transform), "caption": caption}
        if self.transform is not None:
            sample = self.transform(sample)
        forward, backward = self.tokens(sample["caption"])
        item = {
            "image": _image_tensor(sample),
            "caption_tokens": torch.tensor(forward, dtype=torch.long),
            "noitpac_tokens": torch.tensor(backward, dtype=torch.long),
            "caption_lengths": torch.tensor(len(forward), dtype=torch.long),
            "image_id": torch.tensor(record.image_id, dtype=torch.long),
        }
        if self.masking is not None:
            masked, labels = self.masking(forward, random, self.tokenizer.mask_id,
                                          self.tokenizer.vocab_size, self.tokenizer.pad_id)
            item["caption_tokens"] = torch.tensor(masked, dtype=torch.long)
            item["masked_labels"] = torch.tensor(labels, dtype=torch.long)
        if self.labels is not None:
            item["labels"] = torch.tensor(self.labels.get(record.image_id, []), dtype=torch.long)
        return item


def collate_captions(batch: Sequence[dict[str, torch.Tensor]], pad_id: int = 0
                     ) -> dict[str, torch.Tensor]:
    """Stack items of :class:`CocoCaptionsDataset`, padding tokens with ``pad_id`` to the
    longest caption of the batch."""
    out = {
        "image": torch.stack([b["image"] for b in batch]),
        "caption_lengths": torch.stack([b["caption_lengths"] for b in batch]).long(),
        "image_id": torch.stack([b["image_id"] for b in batch]).long(),
    }
    for key in ("caption_tokens", "noitpac_tokens"):
        out[key] = torch.nn.utils.rnn.pad_sequence(
            [b[key] for b in batch], batch_first=True, padding_value=pad_id).long()
    if all("masked_labels" in b for b in batch):
        out["masked_labels"] = torch.nn.utils.rnn.pad_sequence(
            [b["masked_labels"] for b in batch], batch_first=True, padding_value=pad_id).long()
    if all("labels" in b for b in batch):  # class ids 1..K; 0 (background) pads
        out["labels"] = _pad_labels([b["labels"] for b in batch])
    return out


def _pad_labels(labels: Sequence[torch.Tensor]) -> torch.Tensor:
    """Right-pad 1-D label-id tensors with 0 to the longest (at least one column)."""
    out = torch.zeros(len(labels), max([1, *(len(x) for x in labels)]), dtype=torch.long)
    for row, x in zip(out, labels):
        row[: len(x)] = x
    return out


class ImageClassificationDataset(Dataset):
    """``(paths, targets)`` from a reader (VOC, ImageNet folders, iNat) as ``{image, target}``.

    ``target`` keeps the reader's values: a long scalar for a class index, or the row
    of a label matrix (e.g. VOC's int8 flags 1 / -1 / 0).
    """

    def __init__(self, paths: Sequence[str | Path], targets: Sequence | np.ndarray,
                 transform: Transform | None) -> None:
        if len(paths) != len(targets):
            raise ValueError(f"{len(paths)} paths but {len(targets)} targets")
        self.paths = [Path(p) for p in paths]
        self.targets = np.asarray(targets)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = _load(self.paths[index], self.transform)
        if self.transform is not None:
            sample = self.transform(sample)
        target = self.targets[index]
        target = torch.from_numpy(np.array(target)) if target.ndim else torch.tensor(target.item())
        return {"image": _image_tensor(sample), "target": target}
