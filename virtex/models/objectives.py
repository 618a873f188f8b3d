"""Pretraining tasks. Each model has ``.visual`` (a :class:`ResNetBackbone`) and maps a batch
dict to ``{"loss": scalar, "losses": {name: detached scalar}}``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from virtex.models import decoding
from virtex.models.textual import TransformerTextualHead
from virtex.models.visual import ResNetBackbone


def _rand(shape: tuple, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=device).to(like.device)


class CaptioningModel(nn.Module):
    """Forward captioning: predict tokens 1..T-1 from 0..T-2 (cross-entropy, padding ignored)."""

    def __init__(
        self,
        visual: ResNetBackbone,
        textual: TransformerTextualHead,
        label_smoothing: float = 0.0,
        sos_idx: int = 2,
        eos_idx: int = 3,
    ):
        super().__init__()
        self.visual = visual
        self.textual = textual
        self.label_smoothing = label_smoothing
        self.sos_idx = sos_idx
        self.eos_idx = eos_idx

    def _caption_loss(
        self, head: TransformerTextualHead, memory: torch.Tensor, tokens: torch.Tensor
    ) -> torch.Tensor:
        logits = head.decode(tokens, memory)
        return F.cross_entropy(
            logits[:, :-1].flatten(0, 1),
            tokens[:, 1:].flatten(),
            ignore_index=head.padding_idx,
            label_smoothing=self.label_smoothing,
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> dict:
        memory = self.textual.encode_visual(self.visual(batch["image"]))
        tokens = batch["caption_tokens"]
        loss = self._caption_loss(self.textual, memory, tokens)
        return {"loss": loss, "losses": {"captioning_forward": loss.detach()},
                "weight": self._num_targets(tokens)}

    def _num_targets(self, tokens: torch.Tensor) -> torch.Tensor:
        """How many tokens the loss averages over (lets DDP weight ranks by it)."""
        return (tokens[:, 1:] != self.textual.padding_idx).sum()

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor,
        method: str = "beam",
        beam_size: int = 5,
        max_length: int = 30,
        top_p: float = 0.9,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        decoder: str = "standard",
    ) -> list[list[int]]:
        """Caption (N, 3, H, W) images with the forward head; ids without [SOS]/[EOS].

        ``decoder``: ``"standard"`` (ours) or ``"paper"`` (the original VirTex search; see
        :mod:`virtex.models.decoding`). Does not change train/eval mode: call
        ``model.eval()`` first.
        """
        return decoding.generate(
            self.textual,
            self.visual(images),
            method=method,
            sos_idx=self.sos_idx,
            eos_idx=self.eos_idx,
            beam_size=beam_size,
            max_length=max_length,
            top_p=top_p,
            use_cache=use_cache,
            generator=generator,
            decoder=decoder,
        )


class BicaptioningModel(CaptioningModel):
    """VirTex bicaptioning: forward captioning plus backward captioning of ``noitpac_tokens``.

    The backward head (a fresh head with the forward head's config unless given) shares
    the forward head's embedding, tied output layer and visual projection, as in the
    original VirTex code; its transformer layers are its own. loss = forward + backward.
    """

    def __init__(
        self,
        visual: ResNetBackbone,
        textual: TransformerTextualHead,
        textual_backward: TransformerTextualHead | None = None,
        label_smoothing: float = 0.0,
        sos_idx: int = 2,
        eos_idx: int = 3,
    ):
        super().__init__(visual, textual, label_smoothing, sos_idx, eos_idx)
        if textual_backward is None:
            textual_backward = TransformerTextualHead(**textual.config)
        textual_backward.share_embedding_with(textual)
        textual_backward.visual_projection = textual.visual_projection
        self.textual_backward = textual_backward

    def forward(self, batch: dict[str, torch.Tensor]) -> dict:
        memory = self.textual.encode_visual(self.visual(batch["image"]))
        forward = self._caption_loss(self.textual, memory, batch["caption_tokens"])
        backward = self._caption_loss(self.textual_backward, memory, batch["noitpac_tokens"])
        losses = {"captioning_forward": forward.detach(), "captioning_backward": backward.detach()}
        return {"loss": forward + backward, "losses": losses,
                "weight": self._num_targets(batch["caption_tokens"])}


class TokenClassificationModel(nn.Module):
    """Predict the bag of caption words from the pooled image features.

    Target: multi-hot over the vocabulary of the caption's tokens, special tokens in
    ``ignore_indices`` removed. Loss: multi-label binary cross-entropy with logits,
    averaged over images and vocabulary entries. (The original VirTex code used a
    softmax cross-entropy against the uniform distribution over the caption's tokens;
    BCE is chosen here so every word is an independent yes/no target.)
    """

    def __init__(
        self,
        visual: ResNetBackbone,
        vocab_size: int,
        ignore_indices: Sequence[int] = (0, 2, 3, 1, 4),
    ):
        super().__init__()
        self.visual = visual
        self.vocab_size = vocab_size
        self.ignore_indices = tuple(ignore_indices)
        self.classifier = nn.Linear(visual.out_channels, vocab_size)

    def targets(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, T) caption tokens -> (N, V) multi-hot bag of words."""
        bag = torch.zeros(tokens.size(0), self.vocab_size, device=tokens.device)
        bag.scatter_(1, tokens, 1.0)
        bag[:, list(self.ignore_indices)] = 0.0
        return bag

    def forward(self, batch: dict[str, torch.Tensor]) -> dict:
        logits = self.classifier(self.visual.pooled(batch["image"]))
        target = self.targets(batch["caption_tokens"]).to(logits.dtype)
        loss = F.binary_cross_entropy_with_logits(logits, target)
        return {"loss": loss, "losses": {"token_classification": loss.detach()}}


class MultilabelClassificationModel(nn.Module):
    """Pooled features -> Linear -> BCE-with-logits against multi-hot ``batch["labels"]``."""

    def __init__(self, visual: ResNetBackbone, num_classes: int):
        super().__init__()
        self.visual = visual
        self.classifier = nn.Linear(visual.out_channels, num_classes)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict:
        logits = self.classifier(self.visual.pooled(batch["image"]))
        loss = F.binary_cross_entropy_with_logits(logits, batch["labels"].to(logits.dtype))
        return {"loss": loss, "losses": {"multilabel_classification": loss.detach()}}


class MaskedLMModel(nn.Module):
    """BERT-style masked language modelling of captions, conditioned on the image.

    Of each caption's word positions (not [SOS]/[EOS]/padding) about ``mask_prob`` are
    chosen (each independently, plus at least one per caption); chosen tokens become
    [MASK] (80%), a random non-special token (10%) or stay unchanged (10%). The head
    attends bidirectionally; the loss is cross-entropy on the chosen positions only.
    Randomness comes from ``generator`` if given, else torch's global RNG.
    """

    def __init__(
        self,
        visual: ResNetBackbone,
        textual: TransformerTextualHead,
        mask_idx: int = 4,
        vocab_size: int | None = None,
        mask_prob: float = 0.15,
        special_ids: Sequence[int] = (0, 1, 2, 3, 4),
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.visual = visual
        self.textual = textual
        self.mask_idx = mask_idx
        self.vocab_size = vocab_size or textual.vocab_size
        self.mask_prob = mask_prob
        self.generator = generator
        special = set(special_ids) | {mask_idx, textual.padding_idx}
        replacements = [i for i in range(self.vocab_size) if i not in special]
        self.register_buffer("replacements", torch.tensor(replacements), persistent=False)

    def mask_tokens(
        self,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (masked tokens, chosen) where ``chosen`` (N, T) marks predicted positions."""
        generator = generator or self.generator
        positions = torch.arange(tokens.size(1), device=tokens.device)
        words = (positions >= 1) & (positions[None, :] <= lengths[:, None] - 2)
        draw = _rand(tokens.shape, tokens, generator).masked_fill(~words, 2.0)
        lowest = draw == draw.min(dim=1, keepdim=True).values
        chosen = words & ((draw < self.mask_prob) | lowest)

        action = _rand(tokens.shape, tokens, generator)
        picks = (_rand(tokens.shape, tokens, generator) * len(self.replacements)).long()
        random_tokens = self.replacements[picks.clamp_max(len(self.replacements) - 1)]
        masked = torch.where(chosen & (action < 0.8), self.mask_idx, tokens)
        masked = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_tokens, masked)
        return masked, chosen

    def forward(self, batch: dict[str, torch.Tensor]) -> dict:
        tokens = batch["caption_tokens"]
        masked, chosen = self.mask_tokens(tokens, batch["caption_lengths"])
        logits = self.textual(self.visual(batch["image"]), masked, causal=False)
        loss = F.cross_entropy(logits[chosen], tokens[chosen])
        return {"loss": loss, "losses": {"masked_lm": loss.detach()}, "weight": chosen.sum()}
