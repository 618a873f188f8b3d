"""Pretraining tasks. Each model has ``.visual`` (a :class:`ResNetBackbone`) and maps a batch
dict to ``{"loss": scalar, "losses": {name: detached scalar}}``."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from virtex.errors import UserError
from virtex.models import decoding
from virtex.models.textual import TransformerTextualHead
from virtex.models.visual import ResNetBackbone


def _rand(shape: tuple, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=device).to(like.device)


def _multi_hot(ids: torch.Tensor, size: int, ignore: Sequence[int]) -> torch.Tensor:
    """(N, M) integer ids -> (N, size) bool: the distinct ids of each row, ``ignore`` removed."""
    bag = torch.zeros(ids.size(0), size, dtype=torch.bool, device=ids.device)
    bag.scatter_(1, ids, True)
    bag[:, list(ignore)] = False
    return bag


def set_softmax_loss(logits: torch.Tensor, bag: torch.Tensor) -> torch.Tensor:
    """The original VirTex classification loss: per row, minus the mean log-softmax over
    the classes in ``bag`` (N, C) bool; summed over rows and divided by N.

    A row with an empty ``bag`` contributes 0 (the original gives NaN for the batch).
    """
    logp = F.log_softmax(logits.float(), dim=1)
    per_row = -torch.where(bag, logp, 0.0).sum(1) / bag.sum(1).clamp_min(1)
    return per_row.sum() / logits.size(0)


def _check_loss(loss: str, where: str) -> None:
    if loss not in ("softmax", "bce"):
        raise UserError(f"{where}.loss: unknown '{loss}', expected 'softmax' (the original "
                        "VirTex loss) or 'bce'")


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

    The backward head (unless given, a copy of the forward head made here, so that both
    transformers start from the same weights, as in the original VirTex code) shares the
    forward head's embedding, tied output layer and visual projection; its transformer
    layers are its own. loss = forward + backward.
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
        if textual_backward is None:  # as the original: a copy, so both start the same
            textual_backward = copy.deepcopy(textual)
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
    """Predict the bag of caption words from the globally average-pooled image features.

    Head: one Linear (features -> vocabulary). ``loss="softmax"`` (the original VirTex
    loss, default): per image minus the mean log-softmax at the distinct ids of its
    caption tokens, ``ignore_indices`` (padding/unknown, [SOS], [EOS], [MASK]) removed;
    summed over images / batch size. ``loss="bce"``: multi-label binary cross-entropy
    against the same bag as a multi-hot, averaged over images and vocabulary entries.
    """

    def __init__(
        self,
        visual: ResNetBackbone,
        vocab_size: int,
        ignore_indices: Sequence[int] = (0, 2, 3, 1, 4),
        loss: str = "softmax",
    ):
        super().__init__()
        _check_loss(loss, "tasks.token_classification")
        self.visual = visual
        self.vocab_size = vocab_size
        self.ignore_indices = tuple(ignore_indices)
        self.loss = loss
        self.classifier = nn.Linear(visual.out_channels, vocab_size)

    def targets(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, T) caption tokens -> (N, V) float multi-hot bag of words."""
        return _multi_hot(tokens, self.vocab_size, self.ignore_indices).float()

    def forward(self, batch: dict[str, torch.Tensor]) -> dict:
        logits = self.classifier(self.visual.pooled(batch["image"]))
        bag = _multi_hot(batch["caption_tokens"], self.vocab_size, self.ignore_indices)
        if self.loss == "softmax":
            loss = set_softmax_loss(logits, bag)
        else:
            loss = F.binary_cross_entropy_with_logits(logits, bag.to(logits.dtype))
        return {"loss": loss, "losses": {"token_classification": loss.detach()}}


class MultilabelClassificationModel(nn.Module):
    """Predict an image's COCO instance categories from its pooled features.

    ``batch["labels"]``: (N, M) class ids 1..K padded with 0 (background), see
    :class:`~virtex.data.datasets.CocoCaptionsDataset`. Head: one Linear with
    ``num_classes`` = K + 1 outputs (81 for COCO, as the original). ``loss="softmax"``
    (original, default): the set loss of :func:`set_softmax_loss`, only 0 ignored.
    ``loss="bce"``: binary cross-entropy of outputs 1..K against the multi-hot labels
    (output 0 unused), averaged over images and classes.
    """

    def __init__(self, visual: ResNetBackbone, num_classes: int, loss: str = "softmax"):
        super().__init__()
        _check_loss(loss, "tasks.multilabel_classification")
        if num_classes < 2:
            raise UserError(f"tasks.multilabel_classification.num_classes={num_classes}: "
                            "expected background + at least one category")
        self.visual = visual
        self.num_classes = num_classes
        self.loss = loss
        self.classifier = nn.Linear(visual.out_channels, num_classes)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict:
        labels = batch["labels"]
        if labels.is_floating_point() or (labels.numel() and int(labels.max()) >= self.num_classes):
            raise UserError(
                "tasks.multilabel_classification: batch['labels'] must be integer class ids "
                f"0..{self.num_classes - 1} (0 = background); got {labels.dtype} up to "
                f"{labels.max().item() if labels.numel() else None}: raise num_classes to the "
                "number of categories + 1")
        logits = self.classifier(self.visual.pooled(batch["image"]))
        bag = _multi_hot(labels, self.num_classes, (0,))
        if self.loss == "softmax":
            loss = set_softmax_loss(logits, bag)
        else:
            loss = F.binary_cross_entropy_with_logits(logits[:, 1:], bag[:, 1:].to(logits.dtype))
        return {"loss": loss, "losses": {"multilabel_classification": loss.detach()}}


def bidirectional_logits(head: TransformerTextualHead, tokens: torch.Tensor,
                         memory: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(N, T) tokens -> (N, T, V) logits with no future mask, keys past ``lengths`` masked.

    As the original masked-LM head: the key mask comes from the caption lengths, so a
    token randomly replaced by the padding id inside a caption is still attended to.
    """
    x = head.embedding(tokens)
    positions = torch.arange(tokens.size(1), device=tokens.device)
    mask = (positions[None, :] < lengths.to(tokens.device)[:, None])[:, None, None, :]
    for layer in head.layers:
        x = layer(x, layer.cross_attn.project_kv(memory), mask)
    return head.output(x)


class MaskedLMModel(nn.Module):
    """Masked language modelling of captions conditioned on the image (bidirectional head).

    ``masking="dataset"`` (the original VirTex, default): the data pipeline masked the
    captions (:class:`~virtex.data.masking.CaptionMasking`; set
    ``datasets.coco_captions.masked_lm = True``) and the batch carries ``masked_labels``;
    the loss is cross-entropy, at the same position (no shift), over the positions whose
    label is not padding, i.e. the [MASK]ed ones. A batch without any gives loss 0 (and
    weight 0) instead of the original's NaN, so training goes on without a gradient.

    ``masking="bernoulli"`` (our earlier variant): the model masks unmasked captions
    itself: each word position (not [SOS]/[EOS]/padding) is chosen with ``mask_prob``,
    at least one per caption; chosen tokens become [MASK] (80%), a random non-special
    token (10%) or stay (10%); the loss covers every chosen position. Randomness comes
    from ``generator`` if given, else torch's global RNG.
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
        masking: str = "dataset",
    ):
        super().__init__()
        if masking not in ("dataset", "bernoulli"):
            raise UserError(f"tasks.masked_lm.masking: unknown '{masking}', expected 'dataset' "
                            "(the original) or 'bernoulli'")
        self.visual = visual
        self.textual = textual
        self.mask_idx = mask_idx
        self.vocab_size = vocab_size or textual.vocab_size
        self.mask_prob = mask_prob
        self.generator = generator
        self.masking = masking
        special = set(special_ids) | {mask_idx, textual.padding_idx}
        replacements = [i for i in range(self.vocab_size) if i not in special]
        self.register_buffer("replacements", torch.tensor(replacements), persistent=False)

    def mask_tokens(
        self,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``bernoulli`` masking: (masked tokens, ``chosen`` (N, T) predicted positions)."""
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

    def masked_lm_loss(self, logits: torch.Tensor, labels: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, number of labelled positions): cross-entropy over positions whose label
        is not padding, 0 when there is none."""
        padding = self.textual.padding_idx
        count = (labels != padding).sum()
        total = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                ignore_index=padding, reduction="sum")
        return total / count.clamp_min(1), count

    def forward(self, batch: dict[str, torch.Tensor]) -> dict:
        tokens, lengths = batch["caption_tokens"], batch["caption_lengths"]
        if self.masking == "bernoulli":
            masked, chosen = self.mask_tokens(tokens, lengths)
            labels = torch.where(chosen, tokens, self.textual.padding_idx)
        elif "masked_labels" in batch:
            masked, labels = tokens, batch["masked_labels"]
        else:
            raise UserError("tasks.masked_lm: the batch has no 'masked_labels'; mask the "
                            "captions in the dataset (datasets.coco_captions.masked_lm = True) "
                            "or use tasks.masked_lm.masking = 'bernoulli'")
        memory = self.textual.encode_visual(self.visual(batch["image"]))
        logits = bidirectional_logits(self.textual, masked, memory, lengths)
        loss, count = self.masked_lm_loss(logits, labels)
        return {"loss": loss, "losses": {"masked_lm": loss.detach()}, "weight": count}
