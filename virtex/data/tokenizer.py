"""SentencePiece caption tokenizer and vocabulary builder, in the original VirTex conventions.

Special ids are read from the loaded model, never assumed. The original layout (what
:func:`build_vocab` writes and the published VirTex vocabularies have) is ``<unk>`` = 0,
which is also the padding id, ``[SOS]`` = 1, ``[EOS]`` = 2, ``[MASK]`` = 3. Vocabularies of
the first virtex releases (``[PAD]`` 0, ``[UNK]`` 1, ``[SOS]`` 2, ``[EOS]`` 3, ``[MASK]`` 4)
load too: their ids are found the same way.

Text is normalised as the original dataset did before tokenising (and before training the
vocabulary): lowercased, Unicode NFKD, combining marks dropped ("Crème" -> "creme").
"""

from __future__ import annotations

import io
import os
import re
import tempfile
import unicodedata
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from virtex.errors import UserError

# The pieces the original vocabulary recipe adds as control symbols, in id order after <unk>.
CONTROL_SYMBOLS = ("[SOS]", "[EOS]", "[MASK]")
_UNK_PIECES = ("<unk>", "[UNK]")
_PAD_PIECES = ("[PAD]", "<pad>")


class VocabularyError(UserError, ValueError):
    """A vocabulary file virtex cannot use, or one that does not fit a checkpoint."""


def normalize_caption(text: str) -> str:
    """Lowercase, NFKD, drop combining characters: the original dataset's caption text."""
    text = unicodedata.normalize("NFKD", text.lower())
    return "".join(ch for ch in text if not unicodedata.combining(ch))


class SentencePieceTokenizer:
    """Wrapper around a trained SentencePiece model (picklable) with its special ids."""

    def __init__(self, model_path: str | Path) -> None:
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {self.model_path} "
                                    "(build one with `python -m virtex.tools.build_vocab`)")
        self._load(self.model_path.read_bytes())

    def _load(self, proto: bytes) -> None:
        self._proto = proto
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=proto)
        except RuntimeError as e:
            raise VocabularyError(f"{self.model_path}: not a SentencePiece model "
                                  f"({str(e).strip().splitlines()[-1][:200]})") from None
        self.unk_id = self._find(_UNK_PIECES, "unknown")
        self.sos_id, self.eos_id, self.mask_id = (self._find((p,), p) for p in CONTROL_SYMBOLS)
        pad = [i for i in (self._id(p) for p in _PAD_PIECES) if i is not None]
        self.pad_id = pad[0] if pad else self.unk_id  # the original pads with <unk>'s id

    def _id(self, piece: str) -> int | None:
        i = self._sp.piece_to_id(piece)
        return i if self._sp.id_to_piece(i) == piece else None

    def _find(self, pieces: tuple[str, ...], what: str) -> int:
        for piece in pieces:
            if (i := self._id(piece)) is not None:
                return i
        first = [self._sp.id_to_piece(i) for i in range(min(6, self._sp.get_piece_size()))]
        raise VocabularyError(
            f"{self.model_path}: the vocabulary has no {what} piece "
            f"({' or '.join(pieces)}); its first pieces are {first}. Expected a vocabulary "
            f"with <unk>, {', '.join(CONTROL_SYMBOLS)} (python -m virtex.tools.build_vocab)")

    def __getstate__(self) -> dict:
        return {"model_path": self.model_path, "proto": self._proto}

    def __setstate__(self, state: dict) -> None:
        self.model_path = state["model_path"]
        self._load(state["proto"])

    def encode(self, text: str) -> list[int]:
        """Token ids of normalised ``text`` (no [SOS]/[EOS] added)."""
        return self._sp.encode(normalize_caption(text), out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` as sentencepiece decodes them (control pieces give no text)."""
        return self._sp.decode([int(i) for i in ids])

    def token_to_id(self, piece: str) -> int:
        """Id of a vocabulary piece (the unknown id if it is not in the vocabulary)."""
        return self._sp.piece_to_id(piece)

    def id_to_token(self, token_id: int) -> str:
        """Piece string of an id."""
        return self._sp.id_to_piece(int(token_id))

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def special_ids(self) -> dict[str, int]:
        """``{"pad", "unk", "sos", "eos", "mask"}`` -> id, as read from the model."""
        return {"pad": self.pad_id, "unk": self.unk_id, "sos": self.sos_id,
                "eos": self.eos_id, "mask": self.mask_id}

    def describe(self) -> dict:
        """What a checkpoint records of its vocabulary: piece count and special ids."""
        return {"pieces": self.vocab_size, "special_ids": self.special_ids,
                "file": str(self.model_path)}

    def check_fits(self, recorded: dict, source: str) -> None:
        """Raise :class:`VocabularyError` naming both if ``recorded`` (a checkpoint's
        :meth:`describe`) is another vocabulary than this one."""
        mine = self.describe()
        if (recorded.get("pieces"), recorded.get("special_ids")) != (mine["pieces"],
                                                                     mine["special_ids"]):
            raise VocabularyError(
                f"{source} was trained with the vocabulary {recorded.get('file', '?')} "
                f"({recorded.get('pieces')} pieces, special ids {recorded.get('special_ids')}), "
                f"but the vocabulary given is {self.model_path} ({mine['pieces']} pieces, "
                f"special ids {mine['special_ids']}): bind vocab to the one it was trained with")

    def __len__(self) -> int:
        return self.vocab_size


_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")


def build_vocab(captions: Iterable[str], out_prefix: str | Path, vocab_size: int = 10000,
                model_type: str = "bpe", input_sentence_size: int = 0,
                seed: int = 0) -> Path:
    """Train a SentencePiece model on normalised ``captions``; returns ``<out_prefix>.model``.

    The original VirTex recipe: BPE, character coverage 1.0, no BOS/EOS pieces, control
    symbols [SOS], [EOS], [MASK] (so ``<unk>`` = 0, [SOS] = 1, [EOS] = 2, [MASK] = 3),
    sentencepiece's default normalisation, on captions lowercased with accents stripped.
    The same captions give the same pieces, scores and ids as the original script. A
    corpus too small for ``vocab_size`` pieces is an error that says the size it can
    reach (sentencepiece is never allowed to shrink the vocabulary silently).

    Also writes ``<out_prefix>.vocab`` (``piece<TAB>score`` lines). Deterministic: one
    thread, a fixed sampling seed, and the model proto holds no paths. Both files
    appear atomically (written in a temp dir beside them, then ``os.replace``).
    """
    sentences = [normalize_caption(c) for c in captions]
    if not any(s.strip() for s in sentences):
        raise ValueError("no non-empty captions to train on")
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    if vocab_size <= 1 + len(CONTROL_SYMBOLS):
        raise ValueError(f"vocab_size={vocab_size} must exceed the "
                         f"{1 + len(CONTROL_SYMBOLS)} special pieces")
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    # The original wrote one caption per line to a file for the trainer: split the same way.
    lines = "\n".join(sentences).split("\n")
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, character_coverage=1.0, bos_id=-1, eos_id=-1,
            control_symbols=list(CONTROL_SYMBOLS), input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True, num_threads=1, minloglevel=2)
    except RuntimeError as e:  # sentencepiece reports bad settings as RuntimeError
        if m := _TOO_HIGH.search(str(e)):
            raise ValueError(f"vocab_size={vocab_size} is more pieces than these captions "
                             f"allow: at most {m[2]} can be built from them") from None
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
