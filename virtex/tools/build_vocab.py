"""Build the SentencePiece caption vocabulary from a COCO captions JSON.

    python -m virtex.tools.build_vocab --captions coco/annotations/captions_train2017.json \\
        --out vocab/coco_10k [--vocab_size 10000]

The original VirTex recipe (BPE; captions lowercased, NFKD, accents dropped; control
symbols [SOS], [EOS], [MASK]): a vocabulary built here from the same captions has the same
pieces and ids as one built by the original code. Writes ``<out>.model`` and
``<out>.vocab``; exits 2 with one message on a bad input (including a ``--vocab_size``
larger than the captions allow: the message gives the largest possible).
"""

from __future__ import annotations

import argparse
import sys
import time

from virtex.data.readers import DataFormatError, read_caption_strings
from virtex.data.tokenizer import SentencePieceTokenizer, build_vocab


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--captions", required=True, help="COCO captions_<split>.json")
    ap.add_argument("--out", required=True, help="output prefix (writes PREFIX.model/.vocab)")
    ap.add_argument("--vocab_size", type=int, default=10000)
    ap.add_argument("--model_type", default="bpe", choices=["bpe", "unigram", "char", "word"],
                    help="bpe (default) is the original recipe")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        captions = read_caption_strings(a.captions)
        if not any(c.strip() for c in captions):
            raise DataFormatError(f"{a.captions}: no non-empty captions under 'annotations'")
        model = build_vocab(captions, a.out, vocab_size=a.vocab_size, model_type=a.model_type)
    except (ValueError, OSError) as e:  # DataFormatError is a ValueError
        print(f"build_vocab: error: {e}", file=sys.stderr)
        return 2
    tok = SentencePieceTokenizer(model)
    print(f"build_vocab: {len(captions)} captions -> {tok.vocab_size} pieces "
          f"(asked {a.vocab_size}, {a.model_type}) written to {model} and "
          f"{model.with_suffix('.vocab')} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
