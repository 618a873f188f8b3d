"""Vocabulary and caption tokens against the original VirTex code's figures
(../shared/fidelity: vocab/, encodings.json)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fidelity import FIDELITY, needs_fidelity

from virtex.data.datasets import caption_tokens, collate_captions
from virtex.data.tokenizer import SentencePieceTokenizer, build_vocab, normalize_caption

pytestmark = needs_fidelity
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def encodings() -> dict:
    return json.loads((FIDELITY / "encodings.json").read_text())


@pytest.fixture(scope="module")
def golden() -> SentencePieceTokenizer:
    return SentencePieceTokenizer(FIDELITY / "vocab" / "golden_1k.model")


def _records(encodings: dict) -> list[dict]:
    return encodings["captions"] + encodings["extra_not_in_corpus"]


def test_special_ids_read_from_the_model(golden: SentencePieceTokenizer,
                                         encodings: dict) -> None:
    assert golden.special_ids == {"pad": 0, "unk": 0, "sos": 1, "eos": 2, "mask": 3}
    assert golden.vocab_size == encodings["vocab_size"] == 1000
    for name, want in encodings["special_ids"].items():
        assert golden.token_to_id(name) == want, name
    assert golden.pad_id == encodings["padding_value"]


def test_normalisation_is_the_datasets(encodings: dict) -> None:
    for record in _records(encodings):
        assert normalize_caption(record["caption"]) == record["dataset_text"], record["caption"]


def test_forward_and_backward_tokens(golden: SentencePieceTokenizer, encodings: dict) -> None:
    records = _records(encodings)
    assert len(records) == 110 and sum(r["truncated"] for r in records) >= 19
    for record in records:
        forward, backward = caption_tokens(golden, record["caption"],
                                           encodings["max_caption_length"])
        assert forward == record["caption_tokens"], record["caption"]
        assert backward == record["noitpac_tokens"], record["caption"]
        assert len(forward) == record["caption_length"]
        assert [golden.id_to_token(i) for i in forward] == record["pieces"]
        assert golden.decode(forward) == record["decoded"]


def test_collate(golden: SentencePieceTokenizer, encodings: dict) -> None:
    want = encodings["collated_first8"]
    items = []
    for record in encodings["captions"][:8]:
        forward, backward = caption_tokens(golden, record["caption"])
        items.append({"image": torch.zeros(3, 2, 2), "image_id": torch.tensor(0),
                      "caption_tokens": torch.tensor(forward),
                      "noitpac_tokens": torch.tensor(backward),
                      "caption_lengths": torch.tensor(len(forward))})
    batch = collate_captions(items, pad_id=golden.pad_id)
    for key in ("caption_tokens", "noitpac_tokens", "caption_lengths"):
        assert batch[key].tolist() == want[key], key


def test_vocabulary_built_by_the_original_recipe(tmp_path: Path) -> None:
    captions = [a["caption"] for a in
                json.loads((FIDELITY / "captions.json").read_text())["annotations"]]
    model = build_vocab(captions, tmp_path / "ours", vocab_size=1000)
    golden_vocab = (FIDELITY / "vocab" / "golden_1k.vocab").read_bytes()
    assert model.with_suffix(".vocab").read_bytes() == golden_vocab  # pieces and scores
    ours = SentencePieceTokenizer(model)
    golden = SentencePieceTokenizer(FIDELITY / "vocab" / "golden_1k.model")
    for caption in captions:
        assert ours.encode(caption) == golden.encode(caption)


def test_build_vocab_cli_defaults_to_the_original_recipe(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "virtex.tools.build_vocab", "--captions",
         str(FIDELITY / "captions.json"), "--out", str(tmp_path / "cli"), "--vocab_size", "1000"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "cli.vocab").read_bytes() == \
        (FIDELITY / "vocab" / "golden_1k.vocab").read_bytes()
    done = subprocess.run(
        [sys.executable, "-m", "virtex.tools.build_vocab", "--captions",
         str(FIDELITY / "captions.json"), "--out", str(tmp_path / "big"), "--vocab_size", "9000"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == ("build_vocab: error: vocab_size=9000 is more pieces than "
                                   "these captions allow: at most 2621 can be built from them")
