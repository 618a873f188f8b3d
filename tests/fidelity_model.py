"""The fidelity set's original-layout bicaptioning model (``model/orig_ckpt.pth``) as ours.

R18 + ``L1_H128_A2_F512`` post-norm heads, vocabulary 1000, ids of the original layout
(<unk> = padding 0, [SOS] 1, [EOS] 2). No adapter is needed: the published keys map onto
our model with :func:`virtex_state_dict_to_ours` and give the same numbers.
"""

from __future__ import annotations

import torch
from fidelity import FIDELITY
from virtex.plugins.models.objectives import BicaptioningModel

from virtex.models.textual import TransformerTextualHead
from virtex.models.visual import ResNetBackbone
from virtex.weights import virtex_state_dict_to_ours

PAD, SOS, EOS = 0, 1, 2
VOCAB = 1000


def load_fidelity_model() -> BicaptioningModel:
    """Our BicaptioningModel with the fidelity checkpoint's weights, in eval mode."""
    head = TransformerTextualHead(512, VOCAB, size="L1_H128_A2_F512", padding_idx=PAD)
    model = BicaptioningModel(ResNetBackbone("resnet18"), head, sos_idx=SOS, eos_idx=EOS)
    state = torch.load(FIDELITY / "model" / "orig_ckpt.pth", map_location="cpu")
    model.load_state_dict(virtex_state_dict_to_ours(state, model))
    return model.eval()
