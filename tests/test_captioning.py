"""COCO captioning evaluation (specs/downstream/captioning.gin): caption metrics, the
coco_captioning evaluator on single checkpoints and sweeps, checkpoint checks."""

from __future__ import annotations

import csv
import functools
import json
import math
import re
from pathlib import Path

import pytest
import torch
from cli import REPO, tiny_pretrain
from virtex.plugins.captioning import caption_metrics
from virtex.plugins.captioning.caption_metrics import score_captions
from virtex.plugins.captioning.caption_model import load_captioning_checkpoint

from virtex.data.readers import read_coco_captions
from virtex.data.transforms import eval_transform, load_image
from virtex.errors import UserError
from virtex.models.visual import ResNetBackbone
from virtex.run import main

SPEC = str(REPO / "specs" / "downstream" / "captioning.gin")
SPICE_WARNING = re.compile(r"virtex: warning: SPICE skipped: .*stanford-corenlp-3\.6\.0\.jar.*")
CAPTIONS = {
    1: "a red circle above a blue square",
    2: "two green triangles on the left of a yellow star",
    3: "a small purple star in the middle",
    4: "a large orange square below a small red circle",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, shapes_root):
    """A tiny bicaptioning model pretrained 4 steps (checkpoints at steps 2 and 4)."""
    tmp = tmp_path_factory.mktemp("captioning")
    coco = shapes_root / "coco"
    captions = coco / "annotations" / "captions_train2017.json"
    spec, params = tiny_pretrain(tmp, coco, max_steps=4, warmup_steps=1, checkpoint_every=2,
                                 log_every=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VIRTEX_CACHE", str(tmp / "cache"))
        assert main([str(spec), "--run_dir", str(tmp / "pretrain"), *params]) == 0
    yield {"coco": coco, "captions": captions, "cache": tmp / "cache",
           "checkpoints": tmp / "pretrain" / "checkpoints"}
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_warning(monkeypatch):
    monkeypatch.setattr(caption_metrics, "_spice_warned", False)


def evaluate(tiny: dict, ckpt: Path, run_dir: Path, *params: str) -> int:
    bindings = [f"data_root={tiny['coco']}", "tokenizer.model=None",
                f"tokenizer.captions={tiny['captions']}", "tokenizer.vocab_size=300",
                "visual=@backbones.resnet18()", "experiment.backbone=@backbones.resnet18",
                "textual_size='L1_H64_A2_F128'", "evaluators.coco_captioning.image_size=32",
                "evaluators.coco_captioning.resize=32", "evaluators.coco_captioning.num_workers=0",
                f"ckpt={ckpt}", f"evaluators.coco_captioning.spice_jar_dir='{tiny['cache']}'",
                *params]
    return main([SPEC, "--run_dir", str(run_dir), *[a for b in bindings for a in ("--gin_param", b)]])


def tiny_model(tiny: dict):
    from virtex.plugins.data import tokenizer
    from virtex.plugins.models import bicaptioning, transformer

    tok = tokenizer(model=None, captions=str(tiny["captions"]), vocab_size=300)
    return bicaptioning(visual=ResNetBackbone("resnet18"), tokenizer=tok,
                        textual=functools.partial(transformer, size="L1_H64_A2_F128"))


# the PTB tokenizer and METEOR of pycocoevalcap run on Java
JAVA = pytest.mark.requires("java", how="install a Java runtime (e.g. apt-get install -y "
                                        "default-jre) for pycocoevalcap's tokenizer and METEOR")


# ----------------------------------------------------------------------------- metrics
@JAVA
def test_perfect_predictions_score_at_the_maxima_and_spice_is_skipped_once(capfd, fresh_warning,
                                                                         tmp_path):
    # the references differ from the prediction only in case and punctuation, which the
    # PTB tokenization removes; captions differ across images (CIDEr's IDF needs that)
    references = {k: [c.capitalize() + ".", c, c.upper(), f"{c} !", f'"{c}"']
                  for k, c in CAPTIONS.items()}
    scores = score_captions([{"image_id": k, "caption": c} for k, c in CAPTIONS.items()],
                            references, spice_jar_dir=tmp_path)  # a folder without the jars
    assert set(scores) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
    for n in range(1, 5):  # the paper's scale: 100 x pycocoevalcap's
        assert scores[f"BLEU-{n}"] == pytest.approx(100.0, abs=1e-4)
    assert scores["METEOR"] == pytest.approx(100.0, abs=1e-1)
    assert scores["ROUGE-L"] == pytest.approx(100.0, abs=1e-7)
    assert scores["CIDEr"] == pytest.approx(1000.0, abs=1e-4)  # 100 x CIDEr-D's maximum 10

    shifted = {k: CAPTIONS[k % 4 + 1] for k in CAPTIONS}  # every image gets another's caption
    worse = score_captions(shifted, references, spice_jar_dir=tmp_path)
    assert worse["CIDEr"] < 200.0 and worse["BLEU-4"] < 50.0 and worse["METEOR"] < 50.0
    warnings = SPICE_WARNING.findall(capfd.readouterr().err)
    assert len(warnings) == 1 and str(tmp_path) in warnings[0]


def test_bad_prediction_ids_are_a_user_error():
    with pytest.raises(UserError, match="without reference captions: \\[7\\]"):
        score_captions({7: "a red circle"}, {1: ["a red circle"]}, spice=False)


@JAVA
def test_scores_are_100_times_pycocoevalcap_the_papers_scale():
    """A constructed case: lower-case captions without punctuation (the PTB tokenizer leaves
    them as they are), CIDEr-D computed by pycocoevalcap itself on the same strings."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    references = {1: ["a red circle on the left", "a red ring"],
                  2: ["two blue squares", "blue squares side by side"],
                  3: ["a green triangle above a circle", "a small green triangle"]}
    predictions = {1: "a red circle", 2: "two blue circles", 3: "a green square"}
    gts, res = references, {k: [v] for k, v in predictions.items()}
    cider = Cider().compute_score(gts, res)[0]
    bleu1 = Bleu(4).compute_score(gts, res, verbose=0)[0][0]
    assert 0.5 < cider < 5 and 0 < bleu1 < 1  # a non-trivial case
    paper = score_captions(predictions, references, spice=False)
    assert paper["CIDEr"] == pytest.approx(100 * cider, rel=1e-12)
    assert paper["BLEU-1"] == pytest.approx(100 * bleu1, rel=1e-12)
    raw = score_captions(predictions, references, spice=False, scale=1.0)
    assert raw["CIDEr"] == pytest.approx(cider, rel=1e-12)
    assert paper == pytest.approx({k: 100 * v for k, v in raw.items()}, rel=1e-12)


def test_spice_jars_are_looked_for_where_configured(tmp_path, monkeypatch):
    monkeypatch.setenv("VIRTEX_SPICE_JARS", str(tmp_path))
    assert caption_metrics.spice_dir() == tmp_path
    assert caption_metrics.spice_missing() == list(caption_metrics.CORENLP_JARS)
    for name in caption_metrics.CORENLP_JARS:
        (tmp_path / name).write_bytes(b"")
    assert caption_metrics.spice_missing() == []
    assert caption_metrics.spice_missing(tmp_path / "other") == list(caption_metrics.CORENLP_JARS)


@pytest.mark.slow
@JAVA
def test_scores_equal_pycocoevalcap_run_its_own_way(shapes_root):
    """Our tokenizer call and METEOR client against pycocoevalcap's own classes."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    records = read_coco_captions(shapes_root / "coco", "val2017")
    references = {r.image_id: r.captions for r in records}
    # imperfect predictions: each image gets the first caption of the next image
    predictions = {r.image_id: records[(i + 1) % len(records)].captions[0] + " ."
                   for i, r in enumerate(records)}
    ours = score_captions(predictions, references, spice=False)

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
    res = tok.tokenize({k: [{"caption": c}] for k, c in predictions.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor = Meteor()
    reference = {**{f"BLEU-{n + 1}": b for n, b in enumerate(bleu)},
                 "METEOR": meteor.compute_score(gts, res)[0],
                 "ROUGE-L": Rouge().compute_score(gts, res)[0],
                 "CIDEr": Cider().compute_score(gts, res)[0]}
    del meteor
    assert ours == pytest.approx({k: 100 * v for k, v in reference.items()}, rel=1e-12,
                                 abs=1e-10)
    assert 0 < ours["CIDEr"] < 1000


# ----------------------------------------------------------------------------- evaluator
@JAVA
def test_coco_captioning_on_one_checkpoint(tiny, tmp_path, monkeypatch, capfd, fresh_warning):
    monkeypatch.setenv("VIRTEX_CACHE", str(tiny["cache"]))
    ckpt = tiny["checkpoints"] / "step_0000004.pt"
    run = tmp_path / "run"
    assert evaluate(tiny, ckpt, run) == 0
    assert len(SPICE_WARNING.findall(capfd.readouterr().err)) == 1

    metrics = json.loads((run / "metrics.json").read_text())
    names = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
    assert sorted(metrics) == sorted(f"coco_captioning/{n}" for n in names)
    assert all(math.isfinite(v) and v >= 0 for v in metrics.values())
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("coco_captioning/CIDEr" in row for row in logged)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    # predictions.json: COCO results format, and exactly the captions the checkpoint gives
    records = read_coco_captions(tiny["coco"], "val2017")
    predictions = json.loads((run / "predictions.json").read_text())
    assert [p["image_id"] for p in predictions] == [r.image_id for r in records]
    model = tiny_model(tiny)
    load_captioning_checkpoint(model, ckpt)
    model.eval()
    transform = eval_transform(32, 32)
    images = torch.stack([transform({"image": load_image(r.path)})["image"] for r in records])
    # ... with the original VirTex search, the spec's decoder
    ids = model.generate(images, beam_size=5, decoder="paper")
    expected = [model.tokenizer.decode(row) for row in ids]
    assert [p["caption"] for p in predictions] == expected


@JAVA
def test_coco_captioning_sweeps_a_checkpoint_directory(tiny, tmp_path, monkeypatch, capfd,
                                                       fresh_warning):
    monkeypatch.setenv("VIRTEX_CACHE", str(tiny["cache"]))
    run = tmp_path / "sweep"
    assert evaluate(tiny, tiny["checkpoints"], run) == 0
    assert len(SPICE_WARNING.findall(capfd.readouterr().err)) == 1  # once, not per checkpoint
    with open(run / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert all(math.isfinite(float(r["coco_captioning/CIDEr"])) for r in rows)
    for step in (2, 4):  # one run per checkpoint, its metrics at the checkpoint's step
        member = run / f"step_{step:07d}"
        predictions = json.loads((member / "predictions.json").read_text())
        assert len(predictions) == 12 and all(set(p) == {"image_id", "caption"} for p in predictions)
        logged = [json.loads(line) for line in (member / "metrics.jsonl").read_text().splitlines()]
        assert [row["step"] for row in logged if "coco_captioning/CIDEr" in row] == [step]
        assert "predictions.json" in (member / "summary.md").read_text()
    summary = (run / "summary.md").read_text()
    assert summary.splitlines()[0].startswith("| run | step | coco_captioning/")


def test_checkpoint_of_another_size_is_a_user_error(tiny, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("VIRTEX_CACHE", str(tiny["cache"]))
    ckpt = tiny["checkpoints"] / "step_0000002.pt"
    assert evaluate(tiny, ckpt, tmp_path / "run", "textual_size='L1_H32_A2_F64'") == 2
    err = capfd.readouterr().err
    assert "virtex: error:" in err and "does not fit the BicaptioningModel" in err
    assert "shape mismatch (checkpoint vs model): textual.visual_projection.weight (64, 512) vs " \
        "(32, 512)" in err
    assert "Traceback" not in err


def test_checkpoint_without_a_captioning_head_is_a_user_error(tiny, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("VIRTEX_CACHE", str(tiny["cache"]))
    state = torch.load(tiny["checkpoints"] / "step_0000002.pt", weights_only=True)["model"]
    state = {k: v for k, v in state.items() if k.startswith("visual.")}
    state["classifier.weight"] = torch.zeros(300, 512)  # a token classification model
    ckpt = tmp_path / "token_classification.pt"
    torch.save({"model": state}, ckpt)
    assert evaluate(tiny, ckpt, tmp_path / "run") == 2
    err = capfd.readouterr().err
    assert f"checkpoint '{ckpt}' is not a captioning model: it has no 'textual.*' weights" in err
    assert "classifier.*" in err


def _published(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our bicaptioning state dict written with the published VirTex key names."""
    out = {}
    for key, value in state.items():
        prefix, _, rest = key.partition(".")
        if prefix == "visual":
            if not rest.startswith("cnn.fc."):
                out[key] = value
            continue
        prefix = {"textual": "textual", "textual_backward": "backward_textual"}[prefix]
        m = re.fullmatch(r"layers\.(\d+)\.(self_attn|cross_attn)\.([qkv])_proj\.(weight|bias)", rest)
        if m:
            if m[3] == "q":
                attn = "multihead_attn" if m[2] == "cross_attn" else "self_attn"
                parts = [state[f"{key.rsplit('.', 2)[0]}.{p}_proj.{m[4]}"] for p in "qkv"]
                out[f"{prefix}.transformer.layers.{m[1]}.{attn}.in_proj_{m[4]}"] = torch.cat(parts)
            continue
        rest = re.sub(r"^layers\.", "transformer.layers.", rest).replace("cross_attn", "multihead_attn")
        out[f"{prefix}.{rest}"] = value
    return out


def test_published_virtex_checkpoint_is_recognised_and_converted(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("VIRTEX_CACHE", str(tiny["cache"]))
    source = tiny_model(tiny).eval()
    path = tmp_path / "published.pth"
    torch.save({"model": _published(source.state_dict()), "optimizer": {}}, path)
    loaded = tiny_model(tiny).eval()
    load_captioning_checkpoint(loaded, path)
    images = torch.randn(3, 3, 32, 32)
    assert loaded.generate(images) == source.generate(images)
