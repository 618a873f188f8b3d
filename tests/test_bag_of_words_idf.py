"""tasks.bag_of_words_idf: a pretraining objective from an installed third-party package
(examples/bag_of_words_idf), found through its entry point like any plugin."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from cli import REPO, run_cli, shapes_shards

from virtex import dist
from virtex.models.visual import ResNetBackbone

sys.path.insert(0, str(REPO / "examples" / "bag_of_words_idf"))
from virtex_bow_idf import BagOfWordsIDF  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, SPECIALS = 12, [0, 1, 2, 3]


def _model() -> BagOfWordsIDF:
    torch.manual_seed(0)
    return BagOfWordsIDF(ResNetBackbone("resnet18"), VOCAB, SPECIALS)


def _batch(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    width = max(map(len, rows))
    tokens = torch.tensor([[1, *r, 2] + [0] * (width - len(r)) for r in rows])
    return {"image": torch.randn(len(rows), 3, 32, 32), "caption_tokens": tokens}


def test_target_is_the_l1_normalised_idf_of_the_captions_tokens():
    model = _model().train()
    batch = _batch([[4, 5, 5], [4, 6], [4, 7, 8]])
    out = model(batch)
    # after this batch: 3 captions; token 4 in all 3, tokens 5..8 in one each
    assert model.documents.item() == 3
    assert model.document_frequency[[4, 5, 6, 7, 8]].tolist() == [3, 1, 1, 1, 1]
    assert model.document_frequency[SPECIALS].sum() == 0
    idf = {4: math.log(4 / 4) + 1, 5: math.log(4 / 2) + 1}
    with torch.no_grad():
        logp = F.log_softmax(model.classifier(model.visual(batch["image"]).mean((2, 3))), 1)
    rows = [{4: idf[4], 5: idf[5]}, {4: idf[4], 6: idf[5]}, {4: idf[4], 7: idf[5], 8: idf[5]}]
    expected = -sum(sum(w / sum(r.values()) * logp[i, t] for t, w in r.items())
                    for i, r in enumerate(rows)) / 3
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert out["weight"].item() == 3 and set(out["losses"]) == {"bag_of_words_idf"}


def test_counts_grow_only_in_training_and_are_checkpointed():
    model = _model()
    model.eval()(_batch([[4, 5], [6]]))
    assert model.documents.item() == 0
    model.train()(_batch([[4, 5], [6]]))
    model(_batch([[5], [5, 7]]))
    state = model.state_dict()
    assert state["documents"].item() == 4 and state["document_frequency"][5].item() == 3
    fresh = _model()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.idf(), model.idf())


def _count_on_rank(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init(rank, 2, "127.0.0.1", port, "gloo")
    try:
        model = _model().train()
        model(_batch([[4, 5], [8]] if rank == 0 else [[4, 6], [7]]))
        torch.save({"n": model.documents, "df": model.document_frequency}, f"{out}.{rank}")
    finally:
        dist.shutdown()


def test_document_frequencies_are_summed_across_ranks(tmp_path):
    out = str(tmp_path / "counts")
    mp.spawn(_count_on_rank, args=(dist.free_port(), out), nprocs=2)
    counts = [torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1)]
    for c in counts:  # every rank holds the global counts
        assert c["n"].item() == 4
        assert c["df"][[4, 5, 6, 7, 8]].tolist() == [2, 1, 1, 1, 1]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(REPO / "examples" / "bag_of_words_idf")],
        capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    return site


def test_the_installed_package_registers_the_task(site, tmp_path):
    listed = run_cli("--list", pythonpath=[site], env={"VIRTEX_CACHE": str(tmp_path)})
    assert listed.returncode == 0, listed.stderr
    assert "tasks.bag_of_words_idf" in listed.stdout
    assert "(plugin: bag_of_words_idf)" in listed.stdout
    res = run_cli("pretrain/bag_of_words_idf_r50", "--print_config", pythonpath=[site],
                  env={"VIRTEX_CACHE": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    assert "task = @tasks.bag_of_words_idf" in res.stdout


@pytest.mark.slow
def test_bag_of_words_idf_pretraining_beats_random_init_on_voc07(site, tmp_path):
    """Pretrain on the built-in caption shards: the backbone beats random init on the
    built-in VOC07."""
    spec = tmp_path / "bow_quick.gin"
    spec.write_text("\n".join([
        "include 'quickstart.gin'",
        "task = @tasks.bag_of_words_idf",
        "tasks.bag_of_words_idf.visual = %visual",
        "tasks.bag_of_words_idf.tokenizer = @tokenizer()",
        "experiment.evaluators = [@evaluators.voc07_svm()]",
        *shapes_shards(tmp_path, images=1000),
    ]) + "\n")
    run = tmp_path / "run"
    res = run_cli(str(spec), "--run_dir", str(run), "--gin_param", "shapes_dir.images=1000",
                  "--gin_param", "trainer.max_steps=400", pythonpath=[site],
                  env={"VIRTEX_CACHE": str(tmp_path / "cache")}, timeout=1500)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "datasets.caption_shards" in (run / "operative_config.gin").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["voc07/mAP"] > metrics["random_init/voc07/mAP"] + 5.0, metrics
