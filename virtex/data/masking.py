"""Masked-LM corruption of one caption, as the original VirTex ``MaskedLmDataset`` does it.

Done on the data side with a ``random.Random``-like object (the dataset passes Python's
global :mod:`random`, which ``virtex.data.source.SampleSeeded`` seeds from every sample's seed),
so a sample's masking is a pure function of its seed: exact resume and any number of
loader workers give the same batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol


class RandomLike(Protocol):
    """What the masking draws from (Python's :mod:`random` or a :class:`random.Random`)."""

    def sample(self, population, k: int) -> list: ...
    def random(self) -> float: ...
    def randint(self, a: int, b: int) -> int: ...


@dataclass(frozen=True)
class CaptionMasking:
    """Choose ``ceil(proportion * (L - 2))`` of positions ``1 .. L-2`` of an ``L``-token caption.

    Neither position 0 ([SOS]) nor the last position is ever chosen. A single chosen
    position becomes [MASK]. With two or more, each (in ``sample`` order) draws
    ``u = random()``: ``u <= mask_probability`` -> [MASK] (labelled with the original
    id), ``u <= mask_probability + replace_probability`` -> ``randint(0, vocab_size - 1)``
    (unlabelled), else unchanged (unlabelled). Defaults: the original config's values.
    """

    proportion: float = 0.15
    mask_probability: float = 0.85
    replace_probability: float = 0.10

    def __post_init__(self) -> None:
        for name in ("proportion", "mask_probability", "replace_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"masking {name}={getattr(self, name)}: expected 0..1")
        if self.mask_probability + self.replace_probability > 1.0:
            raise ValueError(f"masking mask_probability + replace_probability = "
                             f"{self.mask_probability + self.replace_probability}: expected <= 1")

    def count(self, length: int) -> int:
        """How many positions a caption of ``length`` tokens gets ([SOS]/[EOS] included)."""
        return max(0, math.ceil((length - 2) * self.proportion))

    def __call__(self, tokens: list[int], rng: RandomLike, mask_id: int, vocab_size: int,
                 no_label: int = 0) -> tuple[list[int], list[int]]:
        """``(masked tokens, labels)``; ``labels`` is ``no_label`` except at [MASK]ed positions."""
        masked, labels = list(tokens), [no_label] * len(tokens)
        positions = rng.sample(range(1, len(tokens) - 1), self.count(len(tokens)))
        if len(positions) == 1:
            masked[positions[0]], labels[positions[0]] = mask_id, tokens[positions[0]]
            return masked, labels
        for p in positions:
            u = rng.random()
            if u <= self.mask_probability:
                masked[p], labels[p] = mask_id, tokens[p]
            elif u <= self.mask_probability + self.replace_probability:
                masked[p] = rng.randint(0, vocab_size - 1)
        return masked, labels
