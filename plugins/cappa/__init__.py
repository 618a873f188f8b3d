"""CapPa (Tschannen et al. 2023, "Image Captioners Are Scalable Vision Learners Too"):
captioning with parallel prediction, as a pretraining task plugin (``tasks.cappa``).

For each example, with probability ``parallel_prob`` (0.75 in the paper) every input token
is replaced by [MASK] and the decoder attends without the causal mask, so it predicts all
tokens at once from the image alone; the other examples are ordinary teacher-forced
captioning. The loss is the cross-entropy of every target token of both kinds, padding
ignored. ``parallel_prob = 0`` is plain captioning. It decodes autoregressively with the
same captioner as the other captioning models (it is a :class:`CaptioningModel`).

Built on public parts only: the models plugin's :class:`CaptioningModel` and Transformer
head factory, and the tokenizer's special ids.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import gin
import torch
import torch.nn.functional as F
from torch import nn
from virtex.plugins.models.objectives import CaptioningModel

from virtex import hookimpl
from virtex.checks import Range
from virtex.models.textual import TransformerTextualHead


class CapPaModel(CaptioningModel):
    """Captioning whose examples are, with probability ``parallel_prob``, parallel
    predictions: inputs all [MASK] (padding kept), bidirectional attention."""

    def __init__(self, visual: nn.Module, textual: TransformerTextualHead, mask_idx: int,
                 parallel_prob: float = 0.75, label_smoothing: float = 0.0,
                 sos_idx: int = 1, eos_idx: int = 2):
        super().__init__(visual, textual, label_smoothing, sos_idx, eos_idx)
        self.mask_idx = mask_idx
        self.parallel_prob = parallel_prob

    def forward(self, batch: dict[str, torch.Tensor]) -> dict:
        memory = self.textual.encode_visual(self.visual(batch["image"]))
        tokens = batch["caption_tokens"]
        pad = self.textual.padding_idx
        parallel = torch.rand(tokens.size(0), device=tokens.device) < self.parallel_prob
        logits = torch.empty(*tokens.shape, self.textual.vocab_size, device=memory.device,
                             dtype=memory.dtype)
        if (~parallel).any():
            logits[~parallel] = self.textual.decode(tokens[~parallel], memory[~parallel])
        if parallel.any():
            masked = torch.where(tokens[parallel] != pad, self.mask_idx, pad)
            logits[parallel] = self.textual.decode(masked, memory[parallel], causal=False)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(),
                               ignore_index=pad, label_smoothing=self.label_smoothing)
        losses = {"captioning": loss.detach(),
                  "parallel_fraction": parallel.float().mean().detach()}
        return {"loss": loss, "losses": losses, "weight": self._num_targets(tokens)}


def cappa(visual: nn.Module = gin.REQUIRED, textual: Callable = gin.REQUIRED,
          tokenizer=gin.REQUIRED, parallel_prob: Annotated[float, Range(0.0, 1.0)] = 0.75,
          label_smoothing: Annotated[float, Range(0.0, 1.0)] = 0.0) -> CapPaModel:
    """CapPa: captioning with parallel prediction for a ``parallel_prob`` share of the
    examples (``textual`` is a head factory, e.g. ``@textual_heads.transformer``)."""
    head = textual(visual_feature_size=visual.out_channels, vocab_size=tokenizer.vocab_size,
                   padding_idx=tokenizer.pad_id)
    model = CapPaModel(visual, head, mask_idx=tokenizer.mask_id, parallel_prob=parallel_prob,
                       label_smoothing=label_smoothing, sos_idx=tokenizer.sos_id,
                       eos_idx=tokenizer.eos_id)
    model.tokenizer = tokenizer  # its checkpoints record the vocabulary
    return model


@hookimpl
def virtex_tasks() -> dict[str, Callable]:
    return {"cappa": cappa}
