"""tasks.cappa: CapPa's parallel prediction, as a plugin (plugins/cappa)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cli import run_cli, shapes_shards
from virtex.plugins.cappa import CapPaModel
from virtex.plugins.models.objectives import CaptioningModel

from virtex.models.textual import TransformerTextualHead
from virtex.models.visual import ResNetBackbone

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, PAD, SOS, EOS, MASK = 30, 0, 1, 2, 3


def _model(parallel_prob: float, seed: int = 0) -> CapPaModel:
    torch.manual_seed(seed)
    visual = ResNetBackbone("resnet18")
    head = TransformerTextualHead(visual.out_channels, VOCAB, hidden_size=32, num_layers=1,
                                  attention_heads=2, feedforward_size=64, dropout=0.0,
                                  padding_idx=PAD)
    return CapPaModel(visual, head, mask_idx=MASK, parallel_prob=parallel_prob,
                      sos_idx=SOS, eos_idx=EOS).eval()


def _batch(n: int = 4, t: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    tokens = torch.full((n, t), PAD)
    for i in range(n):
        words = torch.randint(4, VOCAB, (2 + i % (t - 3),), generator=g)
        tokens[i, : len(words) + 2] = torch.cat([torch.tensor([SOS]), words, torch.tensor([EOS])])
    return {"image": torch.randn(n, 3, 32, 32, generator=g), "caption_tokens": tokens}


def _ce(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(),
                           ignore_index=PAD)


def test_parallel_prob_zero_is_plain_captioning():
    model, batch = _model(0.0), _batch()
    plain = CaptioningModel(model.visual, model.textual, sos_idx=SOS, eos_idx=EOS)
    out = model(batch)
    assert torch.equal(out["loss"], plain(batch)["loss"])
    assert out["losses"]["parallel_fraction"] == 0 and out["weight"] == plain(batch)["weight"]


def test_parallel_rows_see_only_masks_and_attend_both_ways():
    model, batch = _model(1.0), _batch()
    tokens = batch["caption_tokens"]
    memory = model.textual.encode_visual(model.visual(batch["image"]))
    masked = torch.where(tokens != PAD, MASK, PAD)
    expected = _ce(model.textual.decode(masked, memory, causal=False), tokens)
    out = model(batch)
    assert torch.allclose(out["loss"], expected, atol=1e-6)
    assert out["losses"]["parallel_fraction"] == 1
    # the prediction does not depend on the caption's words, only on its length ...
    other = tokens.clone()
    other[tokens > EOS] = 4
    logits = model.textual.decode(torch.where(other != PAD, MASK, PAD), memory, causal=False)
    assert torch.equal(logits, model.textual.decode(masked, memory, causal=False))
    # ... and an early position sees the later ones (no causal mask): lengthen row 0
    longer = masked.clone()
    longer[0, (masked[0] == PAD).nonzero()[0]] = MASK
    assert not torch.allclose(model.textual.decode(longer, memory, causal=False)[0, 0],
                              logits[0, 0])


def test_a_mixed_batch_is_the_token_weighted_mean_of_both_kinds():
    model, batch = _model(0.5), _batch(n=8)
    torch.manual_seed(7)
    out = model(batch)
    torch.manual_seed(7)
    parallel = torch.rand(8) < 0.5
    assert 0 < parallel.sum() < 8
    tokens = batch["caption_tokens"]
    memory = model.textual.encode_visual(model.visual(batch["image"]))
    logits = model.textual.decode(tokens, memory).clone()
    logits[parallel] = model.textual.decode(torch.where(tokens != PAD, MASK, PAD)[parallel],
                                            memory[parallel], causal=False)
    assert torch.allclose(out["loss"], _ce(logits, tokens), atol=1e-6)
    assert out["losses"]["parallel_fraction"] == parallel.float().mean()
    out["loss"].backward()
    assert model.visual.cnn.conv1.weight.grad.abs().sum() > 0


def test_it_captions_with_the_shared_captioner():
    model = _model(0.75)
    captions = model.generate(torch.randn(2, 3, 32, 32), beam_size=2, max_length=5)
    assert len(captions) == 2 and all(len(c) <= 5 for c in captions)


def _quick_spec(tmp_path: Path, data: list[str] | None = None) -> Path:
    """The quickstart with CapPa as its task, VOC07 as its evaluation (``data``: spec lines
    that replace its COCO-layout training data)."""
    spec = tmp_path / "cappa_quick.gin"
    spec.write_text("\n".join([
        "include 'quickstart.gin'",
        "task = @tasks.cappa",
        "tasks.cappa.visual = %visual",
        "tasks.cappa.textual = @textual_heads.transformer",
        "tasks.cappa.tokenizer = @tokenizer()",
        "tasks.cappa.parallel_prob = 0.75",
        "experiment.evaluators = [@evaluators.voc07_svm()]",
        *(data or []),
    ]) + "\n")
    return spec


def test_parallel_prob_outside_0_1_is_one_error(tmp_path):
    res = run_cli(str(_quick_spec(tmp_path)), "--gin_param", "tasks.cappa.parallel_prob=1.5",
                  "--gin_param", "shapes_dir.images=40", "--run_dir", str(tmp_path / "r"),
                  env={"VIRTEX_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 2
    assert "tasks.cappa" in res.stderr and "parallel_prob" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


@pytest.mark.slow
def test_cappa_pretraining_beats_random_init_on_voc07(tmp_path):
    """Pretrain CapPa briefly on the built-in caption shards: its backbone beats random init
    on the built-in VOC07."""
    run = tmp_path / "run"
    spec = _quick_spec(tmp_path, shapes_shards(tmp_path, images=1000))
    res = run_cli(str(spec), "--run_dir", str(run), "--gin_param", "shapes_dir.images=1000",
                  "--gin_param", "trainer.max_steps=400",
                  env={"VIRTEX_CACHE": str(tmp_path / "cache")}, timeout=1500)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "datasets.caption_shards" in (run / "operative_config.gin").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["voc07/mAP"] > metrics["random_init/voc07/mAP"] + 5.0, metrics
