"""Built-in models: ResNet backbones, the Transformer textual head, the pretraining tasks."""

from __future__ import annotations

from collections.abc import Callable

import gin
from torch import nn
from virtex.plugins.models.objectives import (
    BicaptioningModel,
    CaptioningModel,
    MaskedLMModel,
    MultilabelClassificationModel,
    TokenClassificationModel,
)

from virtex import hookimpl
from virtex.models.textual import TransformerTextualHead
from virtex.models.visual import RESNETS, ResNetBackbone


def _resnet(name: str) -> Callable[..., ResNetBackbone]:
    def factory(frozen_bn: bool = False, zero_init_residual: bool = True) -> ResNetBackbone:
        return ResNetBackbone(name, frozen_bn=frozen_bn, zero_init_residual=zero_init_residual)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"torchvision {name} (random init) returning its last feature map."
    return factory


def transformer(
    visual_feature_size: int = gin.REQUIRED,
    vocab_size: int = gin.REQUIRED,
    size: str = "L1_H2048_A32_F8192",
    norm_first: bool = False,
    dropout: float = 0.1,
    max_caption_length: int = 30,
    padding_idx: int = 0,
    zero_biases: bool = False,
) -> TransformerTextualHead:
    """Transformer decoder head; ``size`` as the paper names it (``L1_H2048_A32_F8192``).
    Biases keep PyTorch's init, as the original; ``zero_biases`` zeroes them (BERT-style)."""
    return TransformerTextualHead(
        visual_feature_size, vocab_size, size=size, norm_first=norm_first, dropout=dropout,
        max_caption_length=max_caption_length, padding_idx=padding_idx,
        zero_biases=zero_biases,
    )


def _head(textual: Callable[..., nn.Module], visual: nn.Module, tokenizer) -> nn.Module:
    return textual(visual_feature_size=visual.out_channels, vocab_size=tokenizer.vocab_size,
                   padding_idx=tokenizer.pad_id)


def bicaptioning(visual: nn.Module = gin.REQUIRED, textual: Callable = gin.REQUIRED,
                 tokenizer=gin.REQUIRED, label_smoothing: float = 0.0) -> BicaptioningModel:
    """VirTex: forward and backward captioning (``textual`` is a head factory, e.g.
    ``@textual_heads.transformer``)."""
    model = BicaptioningModel(visual, _head(textual, visual, tokenizer),
                              label_smoothing=label_smoothing, sos_idx=tokenizer.sos_id,
                              eos_idx=tokenizer.eos_id)
    model.tokenizer = tokenizer
    return model


def captioning(visual: nn.Module = gin.REQUIRED, textual: Callable = gin.REQUIRED,
               tokenizer=gin.REQUIRED, label_smoothing: float = 0.0) -> CaptioningModel:
    """Forward-only captioning."""
    model = CaptioningModel(visual, _head(textual, visual, tokenizer),
                            label_smoothing=label_smoothing, sos_idx=tokenizer.sos_id,
                            eos_idx=tokenizer.eos_id)
    model.tokenizer = tokenizer
    return model


def token_classification(visual: nn.Module = gin.REQUIRED, tokenizer=gin.REQUIRED,
                         loss: str = "softmax") -> TokenClassificationModel:
    """Predict the bag of caption words from pooled visual features; ``loss`` 'softmax'
    (the original VirTex set loss) or 'bce'. Padding, unknown, [SOS], [EOS] and [MASK]
    (ids from the tokenizer) are not targets."""
    special = (tokenizer.pad_id, tokenizer.unk_id, tokenizer.sos_id, tokenizer.eos_id,
               tokenizer.mask_id)
    model = TokenClassificationModel(visual, tokenizer.vocab_size, ignore_indices=special,
                                     loss=loss)
    model.tokenizer = tokenizer  # its checkpoints record the vocabulary
    return model


def multilabel_classification(visual: nn.Module = gin.REQUIRED, num_classes: int = 81,
                              loss: str = "softmax") -> MultilabelClassificationModel:
    """Predict the COCO instance categories present in the image: ``num_classes`` =
    background + categories (81 for COCO); ``loss`` 'softmax' (original) or 'bce'."""
    return MultilabelClassificationModel(visual, num_classes, loss=loss)


def masked_lm(visual: nn.Module = gin.REQUIRED, textual: Callable = gin.REQUIRED,
              tokenizer=gin.REQUIRED, masking: str = "dataset",
              mask_prob: float = 0.15) -> MaskedLMModel:
    """Masked language modelling of captions conditioned on the image. ``masking``:
    'dataset' (the original: captions masked by ``datasets.coco_captions.masked_lm``) or
    'bernoulli' (masked in the model, each word with ``mask_prob``, 80/10/10)."""
    special = (tokenizer.pad_id, tokenizer.unk_id, tokenizer.sos_id, tokenizer.eos_id,
               tokenizer.mask_id)
    model = MaskedLMModel(visual, _head(textual, visual, tokenizer), mask_idx=tokenizer.mask_id,
                          vocab_size=tokenizer.vocab_size, mask_prob=mask_prob,
                          special_ids=special, masking=masking)
    model.tokenizer = tokenizer  # its checkpoints record the vocabulary
    return model


# made once: each call of the hook returns the same factories (gin registers each once)
_BACKBONES = {name: _resnet(name) for name in RESNETS}


@hookimpl
def virtex_backbones() -> dict[str, Callable]:
    return dict(_BACKBONES)


@hookimpl
def virtex_textual_heads() -> dict[str, Callable]:
    return {"transformer": transformer}


@hookimpl
def virtex_tasks() -> dict[str, Callable]:
    return {
        "bicaptioning": bicaptioning,
        "captioning": captioning,
        "token_classification": token_classification,
        "multilabel_classification": multilabel_classification,
        "masked_lm": masked_lm,
    }
