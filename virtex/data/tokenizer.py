"""SentencePiece caption tokenizer with fixed special ids, and a deterministic vocab builder.

Special tokens: ``[PAD]`` = 0, ``[UNK]`` = 1, ``[SOS]`` = 2, ``[EOS]`` = 3, ``[MASK]`` = 4.
Text is lowercased before it is encoded (and before the vocabulary is trained).
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

SPECIALS = {"pad": ("[PAD]", 0), "unk": ("[UNK]", 1), "sos": ("[SOS]", 2),
            "eos": ("[EOS]", 3), "mask": ("[MASK]", 4)}


class SentencePieceTokenizer:
    """Lowercasing wrapper around a trained SentencePiece model (picklable)."""

    def __init__(self, model_path: str | Path) -> None:
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {self.model_path} "
                                    "(build one with `python -m virtex.tools.build_vocab`)")
        self._load(self.model_path.read_bytes())

    def _load(self, proto: bytes) -> None:
        self._proto = proto
        self._sp = spm.SentencePieceProcessor(model_proto=proto)
        for piece, want in SPECIALS.values():
            got = self._sp.piece_to_id(piece)
            if got != want or self._sp.id_to_piece(want) != piece:
                raise ValueError(f"{self.model_path}: special token {piece} has id {got}, "
                                 f"expected {want}; was it built with virtex build_vocab?")

    def __getstate__(self) -> dict:
        return {"model_path": self.model_path, "proto": self._proto}

    def __setstate__(self, state: dict) -> None:
        self.model_path = state["model_path"]
        self._load(state["proto"])

    def encode(self, text: str) -> list[int]:
        """Token ids of lowercased ``text`` (no [SOS]/[EOS] added)."""
        return self._sp.encode(text.lower(), out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; [PAD], [SOS] and [EOS] are dropped."""
        return self._sp.decode([int(i) for i in ids])

    def token_to_id(self, piece: str) -> int:
        """Id of a vocabulary piece ([UNK]'s id if it is not in the vocabulary)."""
        return self._sp.piece_to_id(piece)

    def id_to_token(self, token_id: int) -> str:
        """Piece string of an id."""
        return self._sp.id_to_piece(int(token_id))

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return SPECIALS["pad"][1]

    @property
    def unk_id(self) -> int:
        return SPECIALS["unk"][1]

    @property
    def sos_id(self) -> int:
        return SPECIALS["sos"][1]

    @property
    def eos_id(self) -> int:
        return SPECIALS["eos"][1]

    @property
    def mask_id(self) -> int:
        return SPECIALS["mask"][1]

    def __len__(self) -> int:
        return self.vocab_size


def build_vocab(captions: Iterable[str], out_prefix: str | Path, vocab_size: int = 10000,
                model_type: str = "unigram", input_sentence_size: int = 0,
                seed: int = 0) -> Path:
    """Train a SentencePiece model on lowercased ``captions``; returns ``<out_prefix>.model``.

    Also writes ``<out_prefix>.vocab`` (``piece<TAB>score`` lines). Deterministic: one
    thread, a fixed sampling seed, and the model proto holds no paths, so the same
    captions give byte-identical files. ``input_sentence_size`` > 0 samples that many
    sentences (with ``seed``); 0 uses them all. ``hard_vocab_limit`` is off, so a
    small corpus yields a smaller vocabulary instead of failing. Both files appear
    atomically (written in a temp dir beside them, then ``os.replace``).
    """
    sentences = [c.strip().lower() for c in captions]
    sentences = [s for s in sentences if s]
    if not sentences:
        raise ValueError("no non-empty captions to train on")
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    if vocab_size <= len(SPECIALS):
        raise ValueError(f"vocab_size={vocab_size} must exceed the "
                         f"{len(SPECIALS)} special tokens")
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, hard_vocab_limit=False, character_coverage=1.0,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            num_threads=1, pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece="[PAD]",
            unk_piece="[UNK]", bos_piece="[SOS]", eos_piece="[EOS]",
            user_defined_symbols=["[MASK]"], minloglevel=2)
    except RuntimeError as e:  # sentencepiece reports bad settings as RuntimeError
        raise ValueError(f"sentencepiece training failed: {e}") from None
    proto = model.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n"
                    for i in range(sp.get_piece_size()))
    final = {".model": proto, ".vocab": vocab.encode("utf-8")}
    with tempfile.TemporaryDirectory(prefix=".vocab-", dir=out_prefix.parent) as tmp:
        for ext, data in final.items():
            (Path(tmp) / ext).write_bytes(data)
        for ext in final:
            os.replace(Path(tmp) / ext, out_prefix.with_name(out_prefix.name + ext))
    return out_prefix.with_name(out_prefix.name + ".model")
