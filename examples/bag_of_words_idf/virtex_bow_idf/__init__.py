"""``tasks.bag_of_words_idf``: a pretraining objective from outside virtex.

SuperClass-style classification (Huang et al. 2024, "Classification Done Right for
Vision-Language Pre-Training"): a linear layer on the globally pooled image features
predicts the caption's bag of tokens with a softmax cross-entropy over the vocabulary,
against a target that weights each of the caption's distinct tokens by its inverse document
frequency and is L1-normalised. The document frequencies are counted online during
training (every rank's batch, all-reduced), kept as buffers so that they are checkpointed
and a resumed run continues with the same counts. The IDF is the smoothed
``log((1 + N) / (1 + df)) + 1`` (N captions seen, df of them holding the token), positive
for every token; the special tokens ([SOS], [EOS], padding, [MASK]) are never targets.

Uses only public contracts: a task factory registered through the ``virtex_tasks`` hook,
a module with ``.visual`` whose ``forward(batch)`` returns ``loss``, ``losses`` and
``weight``, and the tokenizer's ids.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gin
import torch
import torch.nn.functional as F
from torch import distributed, nn

import virtex


class BagOfWordsIDF(nn.Module):
    """Predict the IDF-weighted bag of caption tokens from pooled image features."""

    def __init__(self, visual: nn.Module, vocab_size: int, ignore_ids: list[int]):
        super().__init__()
        self.visual = visual
        self.classifier = nn.Linear(visual.out_channels, vocab_size)
        self.ignore_ids = sorted(set(ignore_ids))
        self.register_buffer("documents", torch.zeros((), dtype=torch.float64))
        self.register_buffer("document_frequency", torch.zeros(vocab_size, dtype=torch.float64))

    def bag(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, T) token ids -> (N, V) bool: each caption's distinct tokens, specials removed."""
        bag = torch.zeros(tokens.size(0), self.classifier.out_features, dtype=torch.bool,
                          device=tokens.device)
        bag.scatter_(1, tokens, True)
        bag[:, self.ignore_ids] = False
        return bag

    def count(self, bag: torch.Tensor) -> None:
        """Add a batch of captions to the document frequencies (summed over ranks)."""
        documents = torch.tensor([bag.size(0)], dtype=torch.float64, device=bag.device)
        counts = torch.cat([bag.sum(0).double(), documents])
        if distributed.is_available() and distributed.is_initialized():
            distributed.all_reduce(counts)
        self.document_frequency += counts[:-1]
        self.documents += counts[-1]

    def idf(self) -> torch.Tensor:
        return torch.log((1 + self.documents) / (1 + self.document_frequency)) + 1

    def forward(self, batch: dict[str, torch.Tensor]) -> dict:
        bag = self.bag(batch["caption_tokens"])
        if self.training:
            self.count(bag)
        target = bag * self.idf()
        target = target / target.sum(1, keepdim=True).clamp_min(1e-12)
        logits = self.classifier(self.visual(batch["image"]).mean(dim=(2, 3)))
        loss = -(target.float() * F.log_softmax(logits.float(), dim=1)).sum(1).mean()
        return {"loss": loss, "losses": {"bag_of_words_idf": loss.detach()},
                "weight": torch.tensor(bag.size(0), device=loss.device)}


def bag_of_words_idf(visual: nn.Module = gin.REQUIRED, tokenizer=gin.REQUIRED) -> BagOfWordsIDF:
    """SuperClass-style IDF-weighted bag-of-words classification of the caption's tokens."""
    specials = [tokenizer.pad_id, tokenizer.unk_id, tokenizer.sos_id, tokenizer.eos_id,
                tokenizer.mask_id]
    model = BagOfWordsIDF(visual, tokenizer.vocab_size, specials)
    model.tokenizer = tokenizer  # its checkpoints record the vocabulary
    return model


@virtex.hookimpl
def virtex_tasks() -> dict[str, Callable]:
    return {"bag_of_words_idf": bag_of_words_idf}


@virtex.hookimpl
def virtex_spec_dirs() -> list[Path]:
    return [Path(__file__).parent / "specs"]  # pretrain/bag_of_words_idf_r50
