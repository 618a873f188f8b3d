"""The paper specs' optimisation against the original VirTex code (../shared/fidelity):
weight-decay sets, backbone learning-rate set, learning-rate schedule, textual-head init."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gin
import pytest
import torch
from fidelity import FIDELITY, needs_fidelity
from torch import nn
from virtex.plugins.models.objectives import BicaptioningModel

from virtex.engine import Trainer
from virtex.errors import UserError
from virtex.experiment import prepare
from virtex.models.textual import TransformerTextualHead, parse_textual_size
from virtex.models.visual import ResNetBackbone
from virtex.weights import virtex_state_dict_to_ours

pytestmark = pytest.mark.usefixtures("one_thread")

# the paper spec without its data (the trainer's datasets would read COCO)
NO_DATA = ["trainer.dataset=None", "trainer.sample_dataset=None"]


def _paper_trainer(spec: str = "pretrain/bicap_r50", *params: str) -> Trainer:
    prepare(spec, [*NO_DATA, *params])
    try:
        return Trainer()
    finally:
        gin.clear_config()


def _original_to_ours(names: list[str]) -> dict[str, str]:
    """Our parameter name -> the original's, through the published-checkpoint converter
    (``in_proj_*`` splits into our q/k/v projections): each original name is given a
    distinct marker tensor and found again after conversion."""
    markers = {name: torch.full((3,), float(i)) for i, name in enumerate(names)}
    converted = virtex_state_dict_to_ours(markers)
    return {ours: names[int(value[0])] for ours, value in converted.items()}


@pytest.fixture(scope="module")
def virtex_r50():
    """R50 + L1_H2048 bicaptioning, vocabulary 10000, as in ``weight_decay.json``."""
    torch.manual_seed(0)
    head = TransformerTextualHead(2048, 10000, size="L1_H2048_A32_F8192")
    return BicaptioningModel(ResNetBackbone("resnet50"), head)


def _groups_by_name(model: torch.nn.Module, trainer: Trainer) -> list[tuple[dict, set[str]]]:
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = trainer._optimizer(model, torch.device("cpu"))
    return [(g, {names[id(p)] for p in g["params"]}) for g in optimizer.param_groups]


@needs_fidelity
def test_paper_spec_weight_decay_and_backbone_lr_sets_equal_the_original(virtex_r50):
    reference = json.loads((FIDELITY / "weight_decay.json").read_text())
    trainer = _paper_trainer()
    assert trainer.no_decay == "virtex" and trainer.weight_decay == reference["rule"][
        "weight_decay_otherwise"]
    aliases = reference["state_dict_parameter_aliases_not_in_named_parameters"]
    to_original = _original_to_ours(reference["no_decay"] + reference["decay"] + aliases)
    groups = _groups_by_name(virtex_r50, trainer)
    trained = set().union(*(names for _, names in groups))
    # every trainable parameter of ours is one of the original's, and all of them are here
    assert {to_original[n] for n in trained} == set(reference["no_decay"]) | set(reference["decay"])
    no_decay = {to_original[n] for g, names in groups if g["weight_decay"] == 0.0 for n in names}
    decay = {to_original[n] for g, names in groups if g["weight_decay"] == 1e-4 for n in names}
    assert no_decay == set(reference["no_decay"]) and len(no_decay) == reference["n_no_decay"]
    assert decay == set(reference["decay"]) and len(decay) == reference["n_decay"]
    assert all(g["weight_decay"] in (0.0, 1e-4) for g, _ in groups)
    cnn_lr = {to_original[n] for g, names in groups if g["lr"] == reference["cnn_lr"] for n in names}
    assert cnn_lr == {n for n in reference["decay"] + reference["no_decay"] if "cnn" in n}
    assert len(cnn_lr) == reference["n_cnn_lr_params"]
    assert {g["lr"] for g, _ in groups} == {reference["cnn_lr"], reference["other_lr"]}


@needs_fidelity
def test_norm_bias_option_exempts_every_norm_and_bias(virtex_r50):
    trainer = _paper_trainer("pretrain/bicap_r50", "trainer.no_decay='norm_bias'")
    for group, names in _groups_by_name(virtex_r50, trainer):
        params = dict(virtex_r50.named_parameters())
        assert all((params[n].ndim <= 1) == (group["weight_decay"] == 0.0) for n in names)
    assert sum(len(n) for g, n in _groups_by_name(virtex_r50, trainer) if g["weight_decay"] == 0) > 26


@needs_fidelity
def test_paper_spec_learning_rates_equal_the_original_at_every_listed_step():
    reference = json.loads((FIDELITY / "schedule.json").read_text())
    trainer = _paper_trainer()
    assert (trainer.warmup_steps, trainer.max_steps) == (reference["warmup_steps"],
                                                         reference["total_steps"])
    model = BicaptioningModel(ResNetBackbone("resnet18"),
                              TransformerTextualHead(512, 50, size="L1_H64_A2_F128"))
    optimizer = trainer._optimizer(model, torch.device("cpu"))
    bases = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert bases["backbone"] == reference["base_lr_cnn"] and bases["head"] == reference["base_lr_rest"]
    assert len(reference["steps"]) == 10
    for row in reference["steps"]:
        k = row["scheduler_steps_taken"]  # our step index of training iteration k + 1
        assert row["used_at_training_iteration"] == k + 1
        mult = trainer.lr_multiplier(k)
        for name, key in (("backbone", "lr_cnn"), ("head", "lr_rest")):
            got, want = bases[name] * mult, row[key]
            assert got == want if want == 0 else math.isclose(got, want, rel_tol=1e-9), (k, name)
    assert trainer.lr_multiplier(0) == 0.0  # the first iteration runs with learning rate 0


def test_one_step_warmup_option_and_validation():
    trainer = Trainer(dataset=[], warmup_steps=10, max_steps=100, warmup_start="one_step")
    assert [trainer.lr_multiplier(k) for k in (0, 9, 10)] == [0.1, 1.0, 1.0]
    with pytest.raises(UserError, match="trainer.warmup_start: unknown 'first'"):
        Trainer(dataset=[], warmup_start="first")
    with pytest.raises(UserError, match="trainer.no_decay: unknown 'all'"):
        Trainer(dataset=[], no_decay="all")


# -- textual head init: the original checkpoint's untouched tensors as the facts ------------

def _bias_fact(bias: torch.Tensor, fan_in: int) -> str:
    """'zero', 'uniform' (non-zero within nn.Linear's default bound 1/sqrt(fan_in), with
    the spread of a uniform draw) or 'other'."""
    bound = 1 / math.sqrt(fan_in)
    if torch.count_nonzero(bias) == 0:
        return "zero"
    if bias.abs().max() <= bound and abs(bias.std() / (bound / math.sqrt(3)) - 1) < 0.25:
        return "uniform"
    return "other"


@needs_fidelity
def test_textual_head_biases_are_initialised_as_in_the_original():
    original = virtex_state_dict_to_ours(torch.load(FIDELITY / "model" / "orig_ckpt.pth")["model"])
    torch.manual_seed(0)
    head = TransformerTextualHead(512, 1000, size="L1_H128_A2_F512")  # the checkpoint's size
    facts = {}
    for name, module in head.named_modules():
        if not isinstance(module, nn.Linear) or name == "visual_projection":
            continue  # the checkpoint's recipe replaced the visual projection's bias
        theirs, mine = original[f"textual.{name}.bias"], module.bias.detach()
        if name == "output":  # the recipe changed the [SOS] (1) and [EOS] (2) entries
            keep = torch.ones(len(theirs), dtype=torch.bool)
            keep[[1, 2]] = False
            theirs, mine = theirs[keep], mine[keep]
        facts[name] = _bias_fact(theirs, module.in_features)
        assert _bias_fact(mine, module.in_features) == facts[name], name
    assert len(facts) == 11  # q, k, v, out of both attentions, linear1, linear2, output
    assert {n for n, f in facts.items() if f == "zero"} == {  # nn.MultiheadAttention's
        f"layers.0.{a}.{p}_proj" for a in ("self_attn", "cross_attn") for p in ("q", "k", "v", "out")}
    assert {n for n, f in facts.items() if f == "uniform"} == {
        "layers.0.linear1", "layers.0.linear2", "output"}
    # an nn.Linear whose bias the original never re-initialised either
    assert _bias_fact(head.visual_projection.bias.detach(), 512) == "uniform"
    for norm in ("embedding.layer_norm", "layers.0.norm1", "layers.0.norm2"):
        for p in ("weight", "bias"):
            assert torch.equal(head.state_dict()[f"{norm}.{p}"], original[f"textual.{norm}.{p}"])


def test_zero_biases_option_zeroes_every_linear_bias():
    torch.manual_seed(0)
    head = TransformerTextualHead(64, 50, size="L2_H32_A2_F64", zero_biases=True)
    biases = [m.bias for m in head.modules() if isinstance(m, nn.Linear)]
    assert len(biases) == 2 + 2 * 10 and all(torch.count_nonzero(b) == 0 for b in biases)
    torch.manual_seed(0)
    default = TransformerTextualHead(64, 50, size="L2_H32_A2_F64")
    assert torch.equal(default.layers[1].linear2.weight, head.layers[1].linear2.weight)
    assert torch.count_nonzero(default.layers[1].linear2.bias) == 32



SPECS = Path(__file__).resolve().parents[1] / "specs"
PAPER_PRETRAIN = sorted(p.relative_to(SPECS).with_suffix("").as_posix()
                        for p in (SPECS / "pretrain").rglob("*.gin") if not p.name.startswith("_"))


@pytest.mark.parametrize("spec", PAPER_PRETRAIN)
def test_every_paper_pretraining_spec_binds_the_original_optimisation(spec):
    prepare(spec, [*NO_DATA, *(["shards=x.tar"] if spec == "pretrain/shards" else [])])
    try:  # what the spec's trainer gets: its bindings over Trainer's defaults
        trainer = Trainer()
        bound = {k: getattr(trainer, k)
                 for k in ("no_decay", "warmup_start", "amp", "schedule", "warmup_steps")}
        size = gin.query_parameter("%textual_size") if "backbone/" in spec else None
    finally:
        gin.clear_config()
    assert bound == {"no_decay": "virtex", "warmup_start": "zero", "amp": "fp16",
                     "schedule": "cosine", "warmup_steps": 10000}
    if size is not None:  # the original's backbone ablations use the L1_H1024 head
        assert size == "L1_H1024_A16_F4096"
        assert parse_textual_size(size) == {"num_layers": 1, "hidden_size": 1024,
                                            "attention_heads": 16, "feedforward_size": 4096}
