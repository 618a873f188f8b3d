"""virtex.weights: published VirTex checkpoints in, torchvision / MoCo ResNet weights in and out."""

import copy
import os

import pytest
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn
from virtex.plugins.models.objectives import BicaptioningModel

from virtex.errors import UserError
from virtex.models.textual import TransformerTextualHead
from virtex.models.visual import ResNetBackbone
from virtex.weights import (
    backbone_state,
    backbone_state_dict,
    export_backbone,
    load_backbone_state,
    virtex_state_dict_to_ours,
)

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, HIDDEN, HEADS, FF, LAYERS, MAX_LEN = 30, 64, 4, 96, 2, 12


# A re-creation of the published model's module tree: its state dict has the published
# key names, and its forward pass uses torch's own nn.TransformerDecoderLayer (GELU).
class RefEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.words = nn.Embedding(VOCAB, HIDDEN, padding_idx=0)
        self.positions = nn.Embedding(MAX_LEN, HIDDEN)
        self.layer_norm = nn.LayerNorm(HIDDEN, eps=1e-8)

    def forward(self, tokens):
        positions = torch.arange(tokens.size(1))
        x = self.layer_norm(self.words(tokens) + self.positions(positions))
        return x * (tokens != 0).unsqueeze(-1).to(x.dtype)


class RefHead(nn.Module):
    def __init__(self, norm_first: bool):
        super().__init__()
        self.visual_projection = nn.Linear(512, HIDDEN)
        self.embedding = RefEmbedding()
        layer = nn.TransformerDecoderLayer(
            HIDDEN,
            HEADS,
            dim_feedforward=FF,
            dropout=0.1,
            activation="gelu",
            norm_first=norm_first,
        )
        self.transformer = nn.TransformerDecoder(layer, LAYERS)
        self.output = nn.Linear(HIDDEN, VOCAB)
        self.output.weight = self.embedding.words.weight

    def forward(self, visual_features, tokens, lengths):
        memory = self.visual_projection(visual_features.flatten(2).permute(0, 2, 1))
        t = tokens.size(1)
        padding = lengths[:, None] < torch.arange(1, t + 1)[None, :]
        future = torch.ones(t, t, dtype=torch.bool).triu(1)
        x = self.transformer(
            self.embedding(tokens).transpose(0, 1),
            memory.transpose(0, 1),
            tgt_mask=future,
            tgt_key_padding_mask=padding,
        )
        return self.output(x.transpose(0, 1))


class RefModel(nn.Module):
    def __init__(self, norm_first: bool = False):
        super().__init__()
        self.visual = nn.Module()
        self.visual.cnn = torchvision.models.resnet18(weights=None)
        self.visual.cnn.avgpool = nn.Identity()  # VirTex removed these
        self.visual.cnn.fc = nn.Identity()
        self.textual = RefHead(norm_first)
        self.backward_textual = copy.deepcopy(self.textual)
        self.backward_textual.visual_projection = self.textual.visual_projection
        self.backward_textual.embedding = self.textual.embedding
        self.backward_textual.output = self.textual.output
        with torch.no_grad():  # every number matters: no zero biases, no unit norms
            for name, p in self.named_parameters():
                if "norm" in name and name.endswith("weight"):
                    p.uniform_(0.5, 1.5)
                elif not name.startswith("visual."):
                    p.normal_(0.0, 0.05)
            for name, b in self.visual.cnn.state_dict().items():
                if name.endswith("running_var"):
                    b.uniform_(0.5, 1.5)
                elif name.endswith(("running_mean", "bias")):
                    b.normal_(0.0, 0.1)


def ours(norm_first: bool = False, backbone: str = "resnet18") -> BicaptioningModel:
    head = TransformerTextualHead(
        512,
        VOCAB,
        hidden_size=HIDDEN,
        num_layers=LAYERS,
        attention_heads=HEADS,
        feedforward_size=FF,
        norm_first=norm_first,
        max_caption_length=MAX_LEN,
    )
    return BicaptioningModel(ResNetBackbone(backbone), head)


def caption_batch():
    tokens = torch.tensor([[2, 7, 8, 9, 10, 3], [2, 11, 12, 3, 0, 0], [2, 5, 3, 0, 0, 0]])
    lengths = (tokens != 0).sum(1)
    return tokens, lengths


@pytest.mark.parametrize("norm_first", [False, True])
def test_published_checkpoint_gives_the_same_logits(norm_first):
    torch.manual_seed(0)
    ref, model = RefModel(norm_first).eval(), ours(norm_first).eval()
    converted = virtex_state_dict_to_ours({"model": ref.state_dict()}, model=model)
    model.load_state_dict(converted, strict=True)

    images = torch.randn(3, 3, 64, 64)
    features = model.visual(images)
    cnn = ref.visual.cnn
    expected = cnn.layer4(
        cnn.layer3(cnn.layer2(cnn.layer1(cnn.maxpool(cnn.relu(cnn.bn1(cnn.conv1(images)))))))
    )
    assert torch.equal(features, expected)

    tokens, lengths = caption_batch()
    for dtype, atol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        ref.to(dtype), model.to(dtype)
        with torch.no_grad():
            for theirs, mine in (
                (ref.textual, model.textual),
                (ref.backward_textual, model.textual_backward),
            ):
                want = theirs(features.to(dtype), tokens, lengths)
                got = mine(features.to(dtype), tokens)
                assert torch.allclose(got, want, atol=atol, rtol=atol), (got - want).abs().max()
    assert model.textual_backward.embedding is model.textual.embedding


def test_conversion_without_model_and_bad_checkpoints():
    sd = RefModel().state_dict()
    converted = virtex_state_dict_to_ours(sd)
    q, k, v = (converted[f"textual.layers.1.cross_attn.{p}_proj.weight"] for p in "qkv")
    assert torch.equal(
        torch.cat([q, k, v]), sd["textual.transformer.layers.1.multihead_attn.in_proj_weight"]
    )
    assert "textual_backward.layers.0.norm3.bias" in converted

    broken = dict(sd)
    broken["textual.transformer.norm.weight"] = torch.zeros(HIDDEN)
    del broken["backward_textual.transformer.layers.1.norm2.weight"]
    with pytest.raises(ValueError) as error:
        virtex_state_dict_to_ours(broken)
    message = str(error.value)
    assert "unexpected keys (1): textual.transformer.norm.weight" in message
    assert "missing keys (1): backward_textual.transformer.layers.1.norm2.weight" in message

    with pytest.raises(ValueError) as error:
        virtex_state_dict_to_ours(sd, model=ours(backbone="resnet50"))
    message = str(error.value)
    assert message.startswith("architecture mismatch; shape mismatch (converted checkpoint "
                              "vs model): visual.cnn.layer1.0.conv1.weight (64, 64, 3, 3) vs "
                              "(64, 64, 1, 1)")
    assert "missing: visual.cnn.layer1.0.conv3.weight" in message


def randomize_bn(backbone: ResNetBackbone) -> None:
    with torch.no_grad():
        for name, tensor in backbone.cnn.state_dict().items():
            if name.endswith(("running_mean", "bn3.weight", "bias")):
                tensor.normal_(0.0, 0.1)
            elif name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)


def torchvision_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    trunk = nn.Sequential(*list(model.children())[:-2])  # drop avgpool, fc
    return trunk(images)


@pytest.mark.parametrize("frozen_bn", [False, True])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_export_round_trip_into_torchvision(tmp_path, suffix, frozen_bn):
    torch.manual_seed(0)
    model = ours(backbone="resnet50")
    if frozen_bn:
        model.visual = ResNetBackbone("resnet50", frozen_bn=True)
    randomize_bn(model.visual)
    path = tmp_path / f"backbone{suffix}"
    export_backbone(model, path)
    assert os.listdir(tmp_path) == [path.name]  # no temporary file left behind

    state = load_file(path) if suffix == ".safetensors" else torch.load(path)
    plain = torchvision.models.resnet50(weights=None)
    plain.load_state_dict(state, strict=True)
    images = torch.randn(2, 3, 64, 64)
    model.eval(), plain.eval()
    with torch.no_grad():
        got, want = model.visual(images), torchvision_features(plain, images)
    if frozen_bn:  # FrozenBatchNorm2d folds the statistics: same function, other rounding
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(got, want)


def test_backbone_from_published_checkpoint_and_loading():
    ref = RefModel()
    state = backbone_state_dict({"model": ref.state_dict()})
    assert "fc.weight" not in state and "layer4.1.bn2.running_var" in state
    backbone = ResNetBackbone("resnet18", frozen_bn=True)
    assert load_backbone_state(backbone, state) == ["fc.weight", "fc.bias"]
    assert torch.equal(
        backbone.cnn.layer4[1].bn2.running_var, ref.visual.cnn.layer4[1].bn2.running_var
    )
    plain = torchvision.models.resnet18(weights=None)
    missing = plain.load_state_dict(state, strict=False).missing_keys
    assert missing == ["fc.weight", "fc.bias"]


def test_architecture_mismatch_is_a_clear_error():
    state = torchvision.models.resnet18(weights=None).state_dict()
    with pytest.raises(UserError) as error:
        load_backbone_state(ResNetBackbone("resnet50"), state)
    message = str(error.value)
    assert message.startswith("the state dict holds a resnet18, the backbone is a resnet50 (")
    assert "shape mismatch (file vs backbone): layer1.0.conv1.weight (64, 64, 3, 3) vs (64, 64, 1, 1)" in message
    assert "missing: layer1.0.conv3.weight" in message
    with pytest.raises(UserError, match="no ResNet weights found .* first keys: encoder.weight"):
        backbone_state_dict({"encoder.weight": torch.zeros(1)})


def test_moco_checkpoint_loads_into_backbone():
    torch.manual_seed(0)
    encoder = torchvision.models.resnet18(weights=None)
    encoder.fc = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 128))
    moco = {f"module.encoder_q.{k}": v for k, v in encoder.state_dict().items()}
    moco.update({f"module.encoder_k.{k}": v + 1 for k, v in encoder.state_dict().items()})
    moco["module.queue"] = torch.randn(128, 16)
    state = backbone_state({"epoch": 200, "state_dict": moco}, "moco")
    assert not any(k.startswith("fc.") for k in state)

    backbone = ResNetBackbone("resnet18")
    assert load_backbone_state(backbone, state) == ["fc.weight", "fc.bias"]
    images = torch.randn(2, 3, 32, 32)
    backbone.eval(), encoder.eval()
    with torch.no_grad():
        assert torch.equal(backbone(images), torchvision_features(encoder, images))
    with pytest.raises(UserError, match=r"the state dict is not a MoCo checkpoint "
                                        r"\('module.encoder_q.\*' weights under 'state_dict'\)"):
        backbone_state({"state_dict": {"module.conv1.weight": torch.zeros(1)}}, "moco")
