"""COCO caption metrics with pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr(-D), SPICE.

Captions are lowercased and tokenized with the Stanford PTB tokenizer (Java) and
punctuation tokens are dropped, as the COCO evaluation server does. METEOR runs on
Java too. SPICE also needs the Stanford CoreNLP 3.6.0 jars, which pycocoevalcap does
not ship (it would download them at first use; we never do): SPICE runs when they are
in ``spice_jar_dir`` (default ``$VIRTEX_SPICE_JARS``, else pycocoevalcap's own
``spice/lib``) and is otherwise skipped with one warning per process.

Scores are on the paper's scale, as the original VirTex evaluation reports them: 100 times
pycocoevalcap's (BLEU, METEOR, ROUGE-L, SPICE 0..100; CIDEr-D 0..1000). ``scale=1.0`` gives
pycocoevalcap's own numbers.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from virtex.errors import UserError

CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",",
                ":", "-", "--", "...", ";"}
_spice_warned = False


def _package_dir() -> Path:
    try:
        import pycocoevalcap
    except ImportError:
        raise UserError("caption metrics need pycocoevalcap: pip install pycocoevalcap") from None
    return Path(next(iter(pycocoevalcap.__path__)))


def _java(args: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["java", *args], check=True, capture_output=True, **kwargs)
    except FileNotFoundError:
        raise UserError(f"{what} needs Java: install a JRE (e.g. apt-get install default-jre)") from None
    except subprocess.CalledProcessError as exc:
        tail = exc.stderr.decode(errors="replace").strip().splitlines()[-1:] if exc.stderr else []
        raise RuntimeError(f"{what} failed (java exit {exc.returncode}): {' '.join(tail)}") from None


def ptb_tokenize(captions: list[str]) -> list[str]:
    """Lowercase PTB tokenization (one output line per caption), punctuation dropped."""
    if not captions:
        return []
    jar = _package_dir() / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    with tempfile.TemporaryDirectory(prefix="virtex-ptb-") as tmp:
        path = Path(tmp) / "captions.txt"
        path.write_text("\n".join(c.replace("\n", " ").replace("\r", " ") for c in captions),
                        encoding="utf-8")
        out = _java(["-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                     "-lowerCase", str(path)], "the PTB tokenizer").stdout.decode("utf-8")
    lines = out.split("\n")[: len(captions)]
    if len(lines) != len(captions):
        raise RuntimeError(f"PTB tokenizer returned {len(lines)} lines for {len(captions)} captions")
    return [" ".join(w for w in line.split() if w not in _PUNCTUATION) for line in lines]


def spice_dir(path: str | os.PathLike | None = None) -> Path:
    """Where the CoreNLP jars for SPICE are looked for (argument, env, pycocoevalcap)."""
    if path is None:
        path = os.environ.get("VIRTEX_SPICE_JARS") or _package_dir() / "spice" / "lib"
    return Path(path)


def spice_missing(path: str | os.PathLike | None = None) -> list[str]:
    """The CoreNLP jars SPICE needs that ``spice_dir(path)`` lacks (empty: can run)."""
    directory = spice_dir(path)
    return [name for name in CORENLP_JARS if not (directory / name).is_file()]


def _warn_once(message: str) -> None:
    global _spice_warned
    if not _spice_warned:
        _spice_warned = True
        print(f"virtex: warning: {message}", file=sys.stderr, flush=True)


def spice_score(tokenized_refs: dict, tokenized_preds: dict, jar_dir: str | Path | None) -> float:
    """Mean SPICE F-score with ``java -cp spice-1.0.jar:<jar_dir>/* edu.anu.spice.SpiceScorer``."""
    spice_jar = _package_dir() / "spice" / "spice-1.0.jar"
    classpath = os.pathsep.join([str(spice_jar), str(spice_dir(jar_dir) / "*")])
    rows = [{"image_id": k, "test": tokenized_preds[k], "refs": tokenized_refs[k]}
            for k in sorted(tokenized_refs)]
    with tempfile.TemporaryDirectory(prefix="virtex-spice-") as tmp:
        inp, out = Path(tmp) / "in.json", Path(tmp) / "out.json"
        inp.write_text(json.dumps(rows))
        _java(["-Xmx8G", "-cp", classpath, "edu.anu.spice.SpiceScorer", str(inp), "-out", str(out),
               "-subset", "-silent"], "SPICE", cwd=tmp)
        results = json.loads(out.read_text())
    scores = [float(r["scores"]["All"]["f"]) for r in results]
    return sum(scores) / max(1, len(scores))


class _Meteor:
    """A running ``meteor-1.5.jar -stdio`` process (its start takes ~10 s: loaded once)."""

    def __init__(self):
        try:
            self.proc = subprocess.Popen(
                ["java", "-Xmx2G", "-jar", "meteor-1.5.jar", "-", "-", "-stdio", "-l", "en", "-norm"],
                cwd=_package_dir() / "meteor", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL)
        except FileNotFoundError:
            raise UserError("METEOR needs Java: install a JRE (e.g. apt-get install default-jre)") from None

    def _ask(self, line: str, answers: int = 1) -> list[str]:
        self.proc.stdin.write((line + "\n").encode("utf-8"))
        self.proc.stdin.flush()
        out = [self.proc.stdout.readline().decode("utf-8").strip() for _ in range(answers)]
        if not all(out):
            raise RuntimeError(f"METEOR process ended (exit {self.proc.poll()})")
        return out

    def score(self, gts: dict, res: dict) -> float:
        """Corpus METEOR of ``res[k][0]`` against ``gts[k]`` (pycocoevalcap's protocol)."""
        stats = []
        for k in gts:
            hyp = res[k][0].replace("|||", "").replace("  ", " ")
            stats.append(self._ask(" ||| ".join(["SCORE", *gts[k], hyp]))[0])
        return float(self._ask(" ||| ".join(["EVAL", *stats]), len(stats) + 1)[-1])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.kill()
            self.proc.wait()


_meteor: _Meteor | None = None


def start_meteor() -> None:
    """Start the METEOR process now (e.g. while captions are being generated)."""
    global _meteor
    if _meteor is None or _meteor.proc.poll() is not None:
        _meteor = _Meteor()
        atexit.register(_meteor.close)


def meteor_score(gts: dict, res: dict) -> float:
    """METEOR 1.5 (English, normalised) with the process kept for the next call."""
    global _meteor
    start_meteor()
    try:
        return _meteor.score(gts, res)
    except (RuntimeError, BrokenPipeError, ValueError):
        _meteor.close()
        _meteor = None
        raise


def _as_mapping(predictions: Mapping | Iterable[Mapping]) -> dict:
    if isinstance(predictions, Mapping):
        return dict(predictions)
    return {p["image_id"]: p["caption"] for p in predictions}


def score_captions(predictions: Mapping | Iterable[Mapping],
                   references: Mapping[object, list[str]],
                   spice: bool = True, spice_jar_dir: str | Path | None = None,
                   scale: float = 100.0) -> dict[str, float]:
    """Score one caption per image against that image's reference captions.

    ``predictions``: ``{image_id: caption}`` or COCO results ``[{"image_id", "caption"}]``;
    ``references``: ``{image_id: [caption, ...]}``. Every predicted image must have
    references; images without a prediction are ignored. Returns ``BLEU-1`` .. ``BLEU-4``,
    ``METEOR``, ``ROUGE-L``, ``CIDEr`` and, when its jars are present, ``SPICE``, each
    ``scale`` times pycocoevalcap's value (default 100: the paper's scale).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    preds = _as_mapping(predictions)
    if not preds:
        raise UserError("no predictions to score")
    unknown = [k for k in preds if not references.get(k)]
    if unknown:
        raise UserError(f"predictions for images without reference captions: {unknown[:5]}")
    ids = sorted(preds)
    ref_counts = [len(references[k]) for k in ids]
    flat = ptb_tokenize([str(preds[k]) for k in ids] +
                        [c for k in ids for c in references[k]])
    res = {k: [flat[i]] for i, k in enumerate(ids)}
    gts, at = {}, len(ids)
    for k, n in zip(ids, ref_counts):
        gts[k], at = flat[at: at + n], at + n

    metrics: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    metrics.update({f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)})
    metrics["METEOR"] = meteor_score(gts, res)
    metrics["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    metrics["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if spice:
        missing = spice_missing(spice_jar_dir)
        if missing:
            _warn_once(
                f"SPICE skipped: {', '.join(missing)} not found in {spice_dir(spice_jar_dir)}; "
                "install Stanford CoreNLP 3.6.0 (stanford-corenlp-full-2015-12-09.zip) and put those "
                "two jars there or in the folder named by $VIRTEX_SPICE_JARS (or the evaluator's "
                "spice_jar_dir)")
        else:
            try:
                metrics["SPICE"] = spice_score(gts, {k: v[0] for k, v in res.items()}, spice_jar_dir)
            except (RuntimeError, OSError, ValueError, KeyError) as exc:
                _warn_once(f"SPICE skipped: {exc}")
    return {k: scale * v for k, v in metrics.items()}
