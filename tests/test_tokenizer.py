"""SentencePiece vocabulary built from the shapes captions, and the build_vocab CLI."""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm

from virtex.data.readers import read_caption_strings
from virtex.data.tokenizer import SentencePieceTokenizer, VocabularyError, build_vocab

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def captions(shapes_root: Path) -> list[str]:
    return read_caption_strings(shapes_root / "coco/annotations/captions_train2017.json")


@pytest.fixture(scope="module")
def model(captions: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_vocab(captions, tmp_path_factory.mktemp("vocab") / "shapes", vocab_size=120)


@pytest.fixture(scope="module")
def tok(model: Path) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(model)


def test_files_and_special_ids(model: Path, tok: SentencePieceTokenizer) -> None:
    assert model.name == "shapes.model" and model.with_suffix(".vocab").is_file()
    # The original layout: <unk> = 0 (also padding), [SOS] 1, [EOS] 2, [MASK] 3.
    assert (tok.pad_id, tok.unk_id, tok.sos_id, tok.eos_id, tok.mask_id) == (0, 0, 1, 2, 3)
    for i, piece in enumerate(["<unk>", "[SOS]", "[EOS]", "[MASK]"]):
        assert tok.token_to_id(piece) == i and tok.id_to_token(i) == piece
    lines = model.with_suffix(".vocab").read_text().splitlines()
    assert len(lines) == tok.vocab_size == len(tok) == 120  # exactly the size asked
    assert [ln.split("\t")[0] for ln in lines[:4]] == ["<unk>", "[SOS]", "[EOS]", "[MASK]"]
    assert tok.describe() == {"pieces": 120, "file": str(model), "special_ids": {
        "pad": 0, "unk": 0, "sos": 1, "eos": 2, "mask": 3}}


def test_round_trip(captions: list[str], tok: SentencePieceTokenizer) -> None:
    for caption in captions:
        ids = tok.encode(caption)
        assert ids and min(ids) > tok.mask_id
        assert tok.decode(ids) == caption.lower()
    assert tok.encode("Crème BRÛLÉE circle") == tok.encode("creme brulee circle")
    ids = tok.encode("A Large RED circle on the Left")
    assert ids == tok.encode("a large red circle on the left")
    assert tok.decode([tok.sos_id, *ids, tok.eos_id]) == "a large red circle on the left"
    # Padding is <unk>: it decodes as sentencepiece's unknown mark, so callers strip it.
    assert tok.decode([*ids, tok.pad_id]) == "a large red circle on the left \u2047 "


def test_unknown_characters(tok: SentencePieceTokenizer) -> None:
    assert tok.unk_id in tok.encode("a zebra")  # no 'z' in the shapes captions


def test_deterministic_and_atomic(captions: list[str], model: Path, tmp_path: Path) -> None:
    again = build_vocab(list(captions), tmp_path / "again", vocab_size=120)
    assert again.read_bytes() == model.read_bytes()
    assert again.with_suffix(".vocab").read_bytes() == model.with_suffix(".vocab").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.model", "again.vocab"]


def test_bpe_and_sampling(captions: list[str], tmp_path: Path) -> None:
    a = build_vocab(captions, tmp_path / "a", vocab_size=60, model_type="unigram",
                    input_sentence_size=150)
    b = build_vocab(captions, tmp_path / "b", vocab_size=60, model_type="unigram",
                    input_sentence_size=150)
    assert a.read_bytes() == b.read_bytes()
    assert SentencePieceTokenizer(a).vocab_size == 60


def test_pickle(tok: SentencePieceTokenizer) -> None:
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("a blue star") == tok.encode("a blue star")


def test_bad_inputs(captions: list[str], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no non-empty captions"):
        build_vocab(["", "  "], tmp_path / "x")
    with pytest.raises(ValueError, match="vocab_size"):
        build_vocab(captions, tmp_path / "x", vocab_size=4)
    # Never silently smaller than asked: the error says what these captions allow.
    with pytest.raises(ValueError, match=r"vocab_size=5000 is more .* at most \d+ can be built"):
        build_vocab(captions, tmp_path / "x", vocab_size=5000)
    assert not list(tmp_path.glob("x.*"))
    with pytest.raises(FileNotFoundError, match="nope.model"):
        SentencePieceTokenizer(tmp_path / "nope.model")
    # A model without [SOS]/[EOS]/[MASK] is refused, saying what it has and what it needs.
    plain = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(captions), model_writer=plain,
                                   vocab_size=40, hard_vocab_limit=False, minloglevel=2)
    (tmp_path / "plain.model").write_bytes(plain.getvalue())
    with pytest.raises(VocabularyError, match=r"plain.model: the vocabulary has no \[SOS\] "
                       r"piece \(\[SOS\]\); its first pieces are \['<unk>', '<s>', '</s>'"):
        SentencePieceTokenizer(tmp_path / "plain.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(VocabularyError, match="junk.model: not a SentencePiece model"):
        SentencePieceTokenizer(tmp_path / "junk.model")


def test_first_release_layout(captions: list[str], tmp_path: Path) -> None:
    """Vocabularies of the first virtex releases ([PAD] 0, [UNK] 1, ...) still load; their
    ids are read from the model."""
    old = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_writer=old, vocab_size=60, pad_id=0, unk_id=1,
        bos_id=2, eos_id=3, pad_piece="[PAD]", unk_piece="[UNK]", bos_piece="[SOS]",
        eos_piece="[EOS]", user_defined_symbols=["[MASK]"], minloglevel=2)
    (tmp_path / "old.model").write_bytes(old.getvalue())
    tok = SentencePieceTokenizer(tmp_path / "old.model")
    assert tok.special_ids == {"pad": 0, "unk": 1, "sos": 2, "eos": 3, "mask": 4}


def test_check_fits(tok: SentencePieceTokenizer) -> None:
    tok.check_fits(tok.describe(), "ckpt.pt")
    other = {**tok.describe(), "pieces": 10000, "file": "coco_10k.model"}
    with pytest.raises(VocabularyError, match=r"ckpt.pt was trained with the vocabulary "
                       r"coco_10k.model \(10000 pieces.*but the vocabulary given is .*shapes"
                       r".model \(120 pieces"):
        tok.check_fits(other, "ckpt.pt")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "virtex.tools.build_vocab", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli(shapes_root: Path, model: Path, tmp_path: Path) -> None:
    captions = shapes_root / "coco/annotations/captions_train2017.json"
    done = _cli("--captions", str(captions), "--out", str(tmp_path / "cli"),
                "--vocab_size", "120")
    assert done.returncode == 0, done.stderr
    assert "240 captions" in done.stdout and "cli.model" in done.stdout
    assert (tmp_path / "cli.model").read_bytes() == model.read_bytes()
    assert (tmp_path / "cli.vocab").is_file()


def test_cli_errors(tmp_path: Path) -> None:
    missing = tmp_path / "captions_train2017.json"
    done = _cli("--captions", str(missing), "--out", str(tmp_path / "v"))
    assert done.returncode == 2
    assert str(missing) in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"annotations": [{"image_id": 1}]}))
    done = _cli("--captions", str(bad), "--out", str(tmp_path / "v"))
    assert done.returncode == 2 and "'caption'" in done.stderr and "Traceback" not in done.stderr
    assert not list(tmp_path.glob("v.*"))
