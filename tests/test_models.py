"""Visual backbone, textual head and pretraining objectives (tiny sizes, CPU)."""

import pytest
import torch
from torch import nn
from virtex.plugins.models.objectives import (
    BicaptioningModel,
    CaptioningModel,
    MaskedLMModel,
    MultilabelClassificationModel,
    TokenClassificationModel,
    bidirectional_logits,
    set_softmax_loss,
)

from virtex.errors import UserError
from virtex.models.textual import TransformerTextualHead, parse_textual_size
from virtex.models.visual import ResNetBackbone

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 40
PAD, UNK, SOS, EOS, MASK = 0, 1, 2, 3, 4


def make_batch(n: int = 3, t: int = 8, size: int = 32, seed: int = 0) -> dict:
    """Captions of varied lengths following the data pipeline's convention."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.full((n, t), PAD)
    noitpac = torch.full((n, t), PAD)
    lengths = torch.zeros(n, dtype=torch.long)
    for i in range(n):
        k = 1 + (i * 2) % (t - 2)
        words = torch.randint(5, VOCAB, (k,), generator=g)
        tokens[i, : k + 2] = torch.cat([torch.tensor([SOS]), words, torch.tensor([EOS])])
        noitpac[i, : k + 2] = torch.cat([torch.tensor([SOS]), words.flip(0), torch.tensor([EOS])])
        lengths[i] = k + 2
    labels = torch.randint(1, 7, (n, 3), generator=g)  # class ids 1..6, 0 = padding
    labels[0, 1:], labels[1, 0] = 0, 6
    return {
        "image": torch.randn(n, 3, size, size, generator=g),
        "caption_tokens": tokens,
        "noitpac_tokens": noitpac,
        "caption_lengths": lengths,
        "labels": labels,
    }


def make_head(dropout: float = 0.1, norm_first: bool = False, **kwargs) -> TransformerTextualHead:
    return TransformerTextualHead(
        512,
        VOCAB,
        hidden_size=64,
        num_layers=2,
        attention_heads=4,
        feedforward_size=128,
        dropout=dropout,
        norm_first=norm_first,
        **kwargs,
    )


def check_output(out: dict, names: set) -> None:
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    assert set(out["losses"]) == names
    out["loss"].backward()


def test_backbone_shapes_and_pooling():
    backbone = ResNetBackbone("resnet18")
    images = torch.randn(2, 3, 64, 64)
    assert backbone.out_channels == 512
    assert backbone(images).shape == (2, 512, 2, 2)
    assert backbone.pooled(images).shape == (2, 512)
    assert "fc.weight" in backbone.cnn.state_dict()  # the whole torchvision model is kept
    with pytest.raises(ValueError, match="resnet18"):
        ResNetBackbone("resnet7")


def test_frozen_bn_has_no_trainable_bn_and_keeps_keys():
    frozen = ResNetBackbone("resnet18", frozen_bn=True)
    plain = ResNetBackbone("resnet18")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    frozen_keys = set(frozen.cnn.state_dict())
    plain_keys = {k for k in plain.cnn.state_dict() if not k.endswith("num_batches_tracked")}
    assert frozen_keys == plain_keys
    frozen.cnn.load_state_dict(plain.cnn.state_dict())  # loadable both ways
    x = torch.randn(2, 3, 32, 32)
    frozen.train()
    assert torch.equal(frozen(x), frozen(x))  # statistics fixed even in train mode
    assert ResNetBackbone("resnet50").out_channels == 2048


def test_parse_textual_size():
    assert parse_textual_size("L1_H2048_A32_F8192") == {
        "num_layers": 1,
        "hidden_size": 2048,
        "attention_heads": 32,
        "feedforward_size": 8192,
    }
    assert parse_textual_size("L2_H512") == {
        "num_layers": 2,
        "hidden_size": 512,
        "attention_heads": 8,
        "feedforward_size": 2048,
    }
    for bad in ["", "L1", "H512_L1", "L1_H512_A8", "L1_H2048_A30_F8192", "L0_H64", "l1_h64"]:
        with pytest.raises(ValueError, match="L<layers>_H<hidden>|divisible|positive"):
            parse_textual_size(bad)
    head = TransformerTextualHead(512, VOCAB, size="L2_H64_A2_F96")
    assert len(head.layers) == 2 and head.layers[0].linear1.out_features == 96
    assert head.layers[0].self_attn.num_heads == 2 and head.hidden_size == 64


@pytest.mark.parametrize("norm_first", [False, True])
def test_head_shapes_tied_weights_and_init(norm_first):
    head = make_head(norm_first=norm_first)
    assert head.output.weight is head.embedding.words.weight
    assert head.embedding.words.weight[PAD].abs().sum() == 0
    assert abs(head.layers[0].linear1.weight.std().item() - 0.02) < 0.005
    # biases as the original's PyTorch modules leave them: zero in attention
    # (nn.MultiheadAttention), nn.Linear's default U(+-1/sqrt(fan_in)) elsewhere
    for layer in head.layers:
        for attn in (layer.self_attn, layer.cross_attn):
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
                assert torch.count_nonzero(proj.bias) == 0
        for linear in (layer.linear1, layer.linear2):
            bound = linear.in_features ** -0.5
            assert linear.bias.abs().max() <= bound and linear.bias.std() > 0.4 * bound
    for linear in (head.output, head.visual_projection):
        assert torch.count_nonzero(linear.bias) == linear.out_features
        assert linear.bias.abs().max() <= linear.in_features ** -0.5
    batch = make_batch()
    logits = head(torch.randn(3, 512, 2, 2), batch["caption_tokens"])
    assert logits.shape == (3, 8, VOCAB)
    logits.sum().backward()
    assert head.embedding.words.weight.grad is not None


def test_head_is_causal_and_ignores_padding():
    head = make_head(dropout=0.0).eval()
    features = torch.randn(1, 512, 2, 2)
    a = torch.tensor([[SOS, 7, 8, 9, EOS, PAD]])
    b = torch.tensor([[SOS, 7, 8, 12, 13, 14]])
    la, lb = head(features, a), head(features, b)
    assert torch.allclose(la[:, :3], lb[:, :3], atol=1e-6)  # future tokens invisible
    assert not torch.allclose(la[:, 3], lb[:, 3])
    bidirectional = head(features, b, causal=False)
    assert not torch.allclose(bidirectional[:, 0], lb[:, 0])
    short = head(features, a[:, :5], causal=False)
    assert torch.allclose(head(features, a, causal=False)[:, :5], short, atol=1e-6)


def test_captioning_and_bicaptioning_forward():
    batch = make_batch()
    model = CaptioningModel(ResNetBackbone("resnet18"), make_head())
    check_output(model(batch), {"captioning_forward"})

    model = BicaptioningModel(ResNetBackbone("resnet18"), make_head(), label_smoothing=0.1)
    back, fwd = model.textual_backward, model.textual
    assert back.embedding is fwd.embedding and back.output is fwd.output
    assert back.output.weight is fwd.embedding.words.weight
    assert back.layers[0] is not fwd.layers[0]
    out = model(batch)
    check_output(out, {"captioning_forward", "captioning_backward"})
    assert torch.allclose(out["loss"], sum(out["losses"].values()))
    assert fwd.layers[0].linear1.weight.grad is not None
    assert back.layers[0].linear1.weight.grad is not None


def test_bicaptioning_overfits_a_tiny_batch():
    torch.manual_seed(0)
    batch = make_batch(n=2, t=7)
    model = BicaptioningModel(ResNetBackbone("resnet18"), make_head(dropout=0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        loss = model(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_token_and_multilabel_classification():
    batch = make_batch()
    model = TokenClassificationModel(ResNetBackbone("resnet18"), VOCAB)
    target = model.targets(batch["caption_tokens"])
    assert target.shape == (3, VOCAB) and target[:, :5].sum() == 0
    for i in range(3):
        words = set(batch["caption_tokens"][i].tolist()) - {PAD, UNK, SOS, EOS, MASK}
        assert set(target[i].nonzero().flatten().tolist()) == words
    check_output(model(batch), {"token_classification"})
    bce = TokenClassificationModel(ResNetBackbone("resnet18"), VOCAB, loss="bce")
    check_output(bce(batch), {"token_classification"})

    model = MultilabelClassificationModel(ResNetBackbone("resnet18"), num_classes=7)
    check_output(model(batch), {"multilabel_classification"})
    bce = MultilabelClassificationModel(ResNetBackbone("resnet18"), num_classes=7, loss="bce")
    check_output(bce(batch), {"multilabel_classification"})
    with pytest.raises(UserError, match="num_classes"):
        MultilabelClassificationModel(ResNetBackbone("resnet18"), num_classes=6)(batch)


def test_masked_lm_masking_statistics():
    n, t = 400, 20
    lengths = torch.randint(3, t + 1, (n,))
    tokens = torch.full((n, t), PAD)
    for i, length in enumerate(lengths.tolist()):
        tokens[i, 0], tokens[i, length - 1] = SOS, EOS
        tokens[i, 1 : length - 1] = torch.randint(5, VOCAB, (length - 2,))
    model = MaskedLMModel(ResNetBackbone("resnet18"), make_head(), MASK, VOCAB)
    torch.manual_seed(0)
    masked, chosen = model.mask_tokens(tokens, lengths)
    words = (tokens != PAD) & (tokens != SOS) & (tokens != EOS)
    assert not (chosen & ~words).any()  # never SOS/EOS/padding
    assert (chosen.sum(1) >= 1).all()  # at least one per caption
    rate = chosen.sum().item() / words.sum().item()
    assert 0.13 < rate < 0.22, rate  # ~15%, plus the forced one in short captions
    changed = masked != tokens
    assert not (changed & ~chosen).any()
    masked_share = (masked[chosen] == MASK).float().mean().item()
    assert 0.72 < masked_share < 0.88
    random_share = (changed & chosen & (masked != MASK)).sum().item() / chosen.sum().item()
    assert 0.05 < random_share < 0.15
    assert masked[chosen & (masked != MASK)].min() >= 5  # random tokens are not special
    torch.manual_seed(0)
    assert torch.equal(model.mask_tokens(tokens, lengths)[0], masked)  # seeded = repeatable
    g = torch.Generator().manual_seed(3)
    again = model.mask_tokens(tokens, lengths, torch.Generator().manual_seed(3))[0]
    assert torch.equal(model.mask_tokens(tokens, lengths, g)[0], again)


def test_masked_lm_forward():
    torch.manual_seed(0)
    model = MaskedLMModel(ResNetBackbone("resnet18"), make_head(), MASK, VOCAB,
                          masking="bernoulli")
    check_output(model(make_batch()), {"masked_lm"})


def test_masked_lm_uses_the_datasets_masking_and_survives_a_batch_without_mask():
    torch.manual_seed(0)
    model = MaskedLMModel(ResNetBackbone("resnet18"), make_head(), MASK, VOCAB)
    batch = make_batch()
    with pytest.raises(UserError, match="masked_labels"):
        model(batch)
    labels = torch.zeros_like(batch["caption_tokens"])
    labels[1, 1], labels[2, 3] = batch["caption_tokens"][1, 1], batch["caption_tokens"][2, 3]
    masked = batch["caption_tokens"].clone()
    masked[labels != PAD] = MASK
    out = model({**batch, "caption_tokens": masked, "masked_labels": labels})
    check_output(out, {"masked_lm"})
    assert out["weight"] == 2
    out = model({**batch, "caption_tokens": masked, "masked_labels": torch.zeros_like(labels)})
    assert out["loss"].item() == 0.0 and out["weight"] == 0  # not NaN: no gradient
    out["loss"].backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_masked_lm_head_is_bidirectional_and_masks_keys_by_length():
    torch.manual_seed(0)
    model = MaskedLMModel(ResNetBackbone("resnet18"), make_head(dropout=0.0), MASK, VOCAB).eval()
    tokens = torch.tensor([[SOS, 7, MASK, 9, EOS, PAD, PAD]])
    lengths = torch.tensor([5])
    memory = model.textual.encode_visual(torch.randn(1, 512, 2, 2))

    def logits(t: torch.Tensor) -> torch.Tensor:
        return bidirectional_logits(model.textual, t, memory, lengths)

    base = logits(tokens)
    later = tokens.clone()
    later[0, 3] = 11  # a later token changes the prediction at position 2: no future mask
    assert not torch.allclose(logits(later)[0, 2], base[0, 2])
    past = tokens.clone()
    past[0, 6] = 12  # beyond the caption length: not a key
    assert torch.allclose(logits(past)[0, :5], base[0, :5], atol=1e-6)
    zero = tokens.clone()
    zero[0, 3] = PAD  # a padding id inside the caption is still a key (as the original)
    assert not torch.allclose(logits(zero)[0, 2],
                              model.textual.decode(zero, memory, causal=False)[0, 2])
    assert torch.allclose(logits(past)[0, :5], model.textual.decode(past[:, :5], memory,
                                                                    causal=False)[0], atol=1e-5)


def test_set_softmax_loss_is_the_mean_over_distinct_targets_and_skips_empty_rows():
    torch.manual_seed(0)
    logits = torch.randn(3, VOCAB)
    tokens = torch.tensor([[SOS, 7, 7, 9, EOS], [SOS, EOS, PAD, PAD, PAD], [SOS, 5, EOS, PAD, PAD]])
    model = TokenClassificationModel(ResNetBackbone("resnet18"), VOCAB)
    bag = model.targets(tokens).bool()
    logp = logits.log_softmax(1)
    expected = (-(logp[0, 7] + logp[0, 9]) / 2 - logp[2, 5]) / 3  # row 1 has no word: 0
    assert torch.allclose(set_softmax_loss(logits, bag), expected)


def test_unknown_loss_or_masking_names_the_binding():
    backbone = ResNetBackbone("resnet18")
    with pytest.raises(UserError, match=r"tasks.token_classification.loss: unknown 'hinge'"):
        TokenClassificationModel(backbone, VOCAB, loss="hinge")
    with pytest.raises(UserError, match=r"tasks.multilabel_classification.loss"):
        MultilabelClassificationModel(backbone, 7, loss="focal")
    with pytest.raises(UserError, match=r"tasks.masked_lm.masking: unknown 'span'"):
        MaskedLMModel(backbone, make_head(), MASK, VOCAB, masking="span")


def test_backward_head_starts_as_a_copy_of_the_forward_head() -> None:
    """The original deep-copies the forward head: both transformers start equal, then
    train apart; embedding, output layer and visual projection are shared."""
    from virtex.plugins.models.objectives import BicaptioningModel

    from virtex.models.textual import TransformerTextualHead
    from virtex.models.visual import ResNetBackbone

    torch.manual_seed(0)
    head = TransformerTextualHead(512, 50, size="L2_H64_A2_F128")
    model = BicaptioningModel(ResNetBackbone("resnet18"), head)
    forward, backward = model.textual, model.textual_backward
    for (name, a), (_, b) in zip(forward.layers.named_parameters(),
                                 backward.layers.named_parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name
    assert backward.embedding is forward.embedding and backward.output is forward.output
    assert backward.visual_projection is forward.visual_projection
