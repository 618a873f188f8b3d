"""Built-in datasets and transforms, plus the ``tokenizer`` and ``shapes_dir`` configurables."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

import gin

from virtex import hookimpl
from virtex.checks import PositiveInt, Range, checked_as
from virtex.data import transforms as T
from virtex.data.cache import cache_dir, shapes_dir  # noqa: F401  (registers shapes_dir)
from virtex.data.tokenizer import SentencePieceTokenizer, build_vocab
from virtex.errors import UserError


@gin.configurable("tokenizer")
@checked_as("tokenizer")
def tokenizer(model: str | None = None, captions: str | None = None,
              vocab_size: Annotated[int, Range(5)] = 10000,
              model_type: Literal["bpe", "unigram"] = "bpe") -> SentencePieceTokenizer:
    """A SentencePiece tokenizer: from ``model`` (a ``.model`` file), or built once from a COCO
    captions JSON (``captions``) into the cache with the original recipe (see
    :func:`virtex.data.tokenizer.build_vocab`; ``model_type='bpe'`` as the original,
    ``'unigram'`` sentencepiece's other algorithm)."""
    if model is not None:
        if not Path(model).is_file():
            raise UserError(f"tokenizer.model: '{model}' does not exist "
                            "(build one with python -m virtex.tools.build_vocab)")
        return SentencePieceTokenizer(model)
    if captions is None:
        raise UserError("tokenizer needs tokenizer.model (a .model file) or tokenizer.captions "
                        "(a COCO captions JSON to build the vocabulary from)")
    from virtex.data.readers import read_caption_strings

    path = Path(captions)
    if not path.is_file():
        raise UserError(f"tokenizer.captions: '{captions}' does not exist")
    digest = hashlib.sha1(path.read_bytes()).hexdigest()[:12]
    prefix = cache_dir() / "vocab" / f"{path.stem}-{digest}-{model_type}{vocab_size}"
    model_file = prefix.with_suffix(".model")
    if not model_file.is_file():
        try:
            build_vocab(read_caption_strings(path), prefix, vocab_size=vocab_size,
                        model_type=model_type)
        except ValueError as exc:
            raise UserError(f"tokenizer.vocab_size = {vocab_size}: {exc}") from None
    return SentencePieceTokenizer(model_file)


def coco_captions(root: str = gin.REQUIRED, split: str = "train2017",
                  tokenizer: SentencePieceTokenizer = gin.REQUIRED,
                  transform: Callable | None = None, max_caption_length: int = 30,
                  labels: bool = False, keep_unlabelled: bool = False,
                  masked_lm: bool = False):
    """COCO Captions (``root/annotations/captions_<split>.json``, ``root/<split>/*.jpg``);
    one of each image's captions sampled per step. ``labels`` adds COCO instance labels
    (class ids; images without instances dropped unless ``keep_unlabelled``);
    ``masked_lm`` masks the captions as the original VirTex masked-LM dataset."""
    from virtex.data.datasets import CocoCaptionsDataset, collate_captions
    from virtex.data.masking import CaptionMasking

    dataset = CocoCaptionsDataset(root, split, tokenizer, transform or T.train_transform(),
                                  max_caption_length=max_caption_length,
                                  labels_from_instances=labels, keep_unlabelled=keep_unlabelled,
                                  masking=CaptionMasking() if masked_lm else None)
    dataset.collate_fn = functools.partial(collate_captions, pad_id=tokenizer.pad_id)
    return dataset


def train(size: PositiveInt = 224, scale: tuple[float, float] = (0.2, 1.0),
          caption_swap: Literal["substring", "word"] = "substring") -> T.Compose:
    """Pretraining augmentation: random resized crop, flip with left/right swap
    (``caption_swap``: 'substring' as the original, 'word' whole words), colour jitter."""
    return T.train_transform(size, tuple(scale), caption_swap=caption_swap)


def evaluation(resize: PositiveInt = 256, size: PositiveInt = 224,
               resize_mode: Literal["exact", "antialias"] = "exact") -> T.Compose:
    """Resize the short side, center crop, normalise. ``resize_mode``: 'exact' (the original
    VirTex's pixels: cv2-exact bilinear, no antialiasing, full decode) or 'antialias' (ours:
    antialiased resize of a reduced-size JPEG decode)."""
    T.check_resize_mode(resize_mode, "transforms.eval.resize_mode")
    return T.eval_transform(resize, size, resize_mode)


def caption_shards(shards: str | list[str] = gin.REQUIRED,
                   tokenizer: SentencePieceTokenizer = gin.REQUIRED,
                   transform: Callable | None = None, caption_key: str = "caption",
                   shuffle_buffer: Annotated[int, Range(1)] = 1000,
                   max_caption_length: Annotated[int, Range(3)] = 30,
                   num_samples: Annotated[int, Range(1)] | None = None):
    """Captioned images from webdataset tar shards (img2dataset, RedCaps; see
    :mod:`virtex.data.shards`): ``shards`` a brace pattern, a list, or weighted sources
    joined with ``::``; the caption from ``KEY.txt`` or ``KEY.json[caption_key]``."""
    from virtex.data.shards import CaptionShards

    return CaptionShards(shards, tokenizer, transform or T.train_transform(),
                         caption_key=caption_key, shuffle_buffer=shuffle_buffer,
                         max_caption_length=max_caption_length, num_samples=num_samples)


@hookimpl
def virtex_datasets() -> dict[str, Callable]:
    return {"coco_captions": coco_captions, "caption_shards": caption_shards}


@hookimpl
def virtex_transforms() -> dict[str, Callable]:
    return {
        "train": train,
        "eval": evaluation,
        "random_resized_crop": T.RandomResizedCrop,
        "horizontal_flip": T.HorizontalFlip,
        "color_jitter": T.ColorJitter,
        "normalize": T.Normalize,
        "resize": T.Resize,
        "center_crop": T.CenterCrop,
        "compose": T.Compose,
    }
