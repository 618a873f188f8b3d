"""Captioning evaluators: caption sample images, score COCO captions, caption any folder.

- ``evaluators.caption_samples``: a few held-out images beside their references.
- ``evaluators.coco_captioning``: COCO val2017 captions scored with BLEU, METEOR, ROUGE-L,
  CIDEr and SPICE (specs/downstream/captioning.gin).
- ``evaluators.caption_folder``: ``captions.json`` and an HTML gallery for every image of a
  folder (specs/inference/caption_folder.gin).
- ``train_hooks.sample_captions``: a pretraining run with ``trainer.sample_dataset`` captions
  a few of its images at every checkpoint, to tensorboard.

The latter two caption with the run's pretrained model, or build ``model`` (a task factory
such as ``@tasks.bicaptioning``) and load the run's checkpoint (``experiment.ckpt``) into it.

This plugin's own modules: ``captioner`` (batched captioning of image files),
``caption_model`` (which model to caption with; checkpoint loading), ``caption_metrics``
(pycocoevalcap scoring) and ``gallery`` (the HTML page).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch

from virtex import dist, hookimpl
from virtex.data.readers import read_coco_captions
from virtex.data.transforms import check_resize_mode, eval_transform, load_image
from virtex.errors import UserError
from virtex.evaluation.api import (
    EvalRequest,
    EvalResult,
    gather,
    inference,
    is_captioning_model,
    shard,
)
from virtex.io import write_json, write_text
from virtex.models.decoding import DECODERS, METHODS, PAPER_METHODS

from . import caption_metrics
from .caption_model import ModelSource
from .captioner import caption_files, list_images
from .gallery import render_gallery
from .sample_captions import sample_captions

_WORD = re.compile(r"[a-z]+")


class CaptionSamples:
    """Caption the first ``num_images`` images of a COCO-format split with beam search
    (``decoder``: ``'paper'``, the original VirTex search, or ``'standard'``, ours).

    Writes ``caption_samples.json`` (generated caption beside the references) to the
    run directory, adds a few examples to the run summary, and returns
    ``captions/word_precision``: the fraction of generated words that occur in the
    image's reference captions. Needs a captioning model (skipped otherwise). Images:
    short side to ``resize`` (None: ``image_size``), central ``image_size`` crop, resized
    as ``resize_mode`` says (see :func:`eval_transform`).
    """

    def __init__(self, root: str, split: str = "val2017", num_images: int = 16,
                 image_size: int = 224, beam_size: int = 5, max_length: int = 30,
                 show: int = 4, resize: int | None = None, resize_mode: str = "exact",
                 decoder: str = "paper"):
        self.decoder = _decoding("caption_samples", "beam", beam_size, max_length, decoder,
                                 resize_mode)["decoder"]
        self.root, self.split, self.num_images = root, split, num_images
        self.image_size, self.beam_size, self.max_length, self.show = (
            image_size, beam_size, max_length, show)
        self.resize = image_size if resize is None else resize
        self.resize_mode = check_resize_mode(resize_mode, "evaluators.caption_samples.resize_mode")

    def __call__(self, request: EvalRequest) -> EvalResult:
        model = request.model
        if model is None or not is_captioning_model(model):
            return EvalResult()
        records = read_coco_captions(self.root, self.split)[: self.num_images]
        transform = eval_transform(self.resize, self.image_size, self.resize_mode)
        images = torch.stack([transform({"image": load_image(r.path)})["image"] for r in records])
        with inference(model):
            tokens = model.generate(images.to(request.device), method="beam",
                                    beam_size=self.beam_size, max_length=self.max_length,
                                    decoder=self.decoder)
        rows, hits, total = [], 0, 0
        for record, ids in zip(records, tokens):
            caption = model.tokenizer.decode(ids)
            reference_words = set(_WORD.findall(" ".join(record.captions).lower()))
            words = _WORD.findall(caption.lower())
            hits += sum(w in reference_words for w in words)
            total += len(words)
            rows.append({"image_id": record.image_id, "file": str(record.path),
                         "caption": caption, "references": record.captions})
        result = EvalResult({"captions/word_precision": 100.0 * hits / max(1, total)})
        if request.rank == 0:
            path = request.run_dir / "caption_samples.json"
            write_json(path, rows)
            result.files.append(path)
            result.summary.append("Example captions (beam search):")
            result.summary += [f"  {r['file'].rsplit('/', 1)[-1]}: {r['caption']}"
                               for r in rows[: self.show]]
            for r in rows[: self.show]:
                request.text("captions/samples", f"{r['image_id']}: {r['caption']}")
        return result


def _decoding(evaluator: str, method: str, beam_size: int, max_length: int, decoder: str,
              resize_mode: str, **rest) -> dict:
    """Checked decoding (and image) options of a captioning evaluator."""
    check_resize_mode(resize_mode, f"evaluators.{evaluator}.resize_mode")
    if decoder not in DECODERS:
        raise UserError(f"evaluators.{evaluator}.decoder = {decoder!r}: expected one of "
                        f"{', '.join(DECODERS)}")
    if method not in METHODS:
        raise UserError(f"evaluators.{evaluator}.method = {method!r}: expected one of "
                        f"{', '.join(METHODS)}")
    if decoder == "paper" and method not in PAPER_METHODS:
        raise UserError(f"evaluators.{evaluator}.method = {method!r} needs decoder = "
                        f"'standard' (decoder 'paper' has {', '.join(PAPER_METHODS)})")
    if beam_size < 1 or max_length < 1:
        raise UserError(f"evaluators.{evaluator}: beam_size and max_length must be >= 1 "
                        f"(got {beam_size}, {max_length})")
    return {"method": method, "beam_size": beam_size, "max_length": max_length,
            "decoder": decoder, "resize_mode": resize_mode, **rest}


class CocoCaptioning:
    """Caption COCO ``root/<split>`` (references in ``root/annotations/captions_<split>.json``)
    and score against the references with pycocoevalcap.

    Writes ``predictions.json`` (COCO results format) into the run directory (in a sweep,
    each checkpoint's run has its own). Returns ``coco_captioning/<metric>``
    for BLEU-1..4, METEOR, ROUGE-L, CIDEr and SPICE (skipped with a warning when the
    Stanford CoreNLP jars are not in ``spice_jar_dir``; see caption_metrics.py), on
    the paper's scale (100 x pycocoevalcap's: CIDEr 0..1000). ``num_images`` limits the
    images (None: all). ``decoder``: ``'paper'`` (the original VirTex search) or
    ``'standard'`` (ours).
    """

    def __init__(self, root: str, split: str = "val2017",
                 model: Callable[[], torch.nn.Module] | None = None, image_size: int = 224,
                 resize: int = 256, resize_mode: str = "exact", method: str = "beam",
                 beam_size: int = 5, max_length: int = 30, batch_size: int = 32,
                 num_workers: int = 2, num_images: int | None = None, spice: bool = True,
                 spice_jar_dir: str | None = None, show: int = 4, decoder: str = "paper"):
        self.root, self.split, self.source = root, split, ModelSource(model, "coco_captioning")
        self.decoding = _decoding("coco_captioning", method, beam_size, max_length, decoder,
                                  resize_mode,
                                  image_size=image_size, resize=resize, batch_size=batch_size,
                                  num_workers=num_workers)
        self.num_images, self.spice, self.spice_jar_dir = num_images, spice, spice_jar_dir
        self.show = show

    def __call__(self, request: EvalRequest) -> EvalResult:
        model = self.source(request)
        if model is None:
            request.info("coco_captioning skipped: no captioning model or checkpoint in this run")
            return EvalResult()
        records = read_coco_captions(self.root, self.split)[: self.num_images]
        if request.rank == 0:
            caption_metrics.start_meteor()  # its JVM loads while the images are captioned
        mine = shard(records, request.rank, request.world_size)
        captions, errors = caption_files(model, [r.path for r in mine], request.device,
                                         log=request.info, progress=request.rank == 0,
                                         desc=f"captioning {self.split}", **self.decoding)
        if errors:
            index, reason = errors[0]
            raise UserError(f"COCO image {mine[index].path} is unreadable: {reason}")
        rows = gather([{"image_id": mine[c.index].image_id, "caption": c.caption}
                       for c in captions])
        if request.rank != 0:
            return EvalResult()
        rows.sort(key=lambda r: r["image_id"])
        name = "predictions.json"
        write_json(request.run_dir / name, rows)
        references = {r.image_id: r.captions for r in records}
        scores = caption_metrics.score_captions(rows, references, spice=self.spice,
                                                spice_jar_dir=self.spice_jar_dir)
        metrics = {f"coco_captioning/{k}": v for k, v in scores.items()}
        request.log(metrics)
        request.info(f"{name}: {len(rows)} captions; " + ", ".join(
            f"{k} {v:.2f}" for k, v in scores.items()))
        summary = [f"COCO {self.split} captions ({name}), e.g.:"]
        summary += [f"  {r['image_id']}: {r['caption']}" for r in rows[: self.show]]
        return EvalResult(metrics, summary, [request.run_dir / name])


class CaptionFolder:
    """Caption every JPEG, PNG and WebP image in ``images`` (``recursive``: subfolders too).

    Writes ``captions.json`` (``[{"filename", "caption"}]``, filenames relative to
    ``images``; with ``all_beams``, also ``"beams": [{"caption", "score"}]``, score = sum of
    token log-probs) and ``captions.html`` (a self-contained gallery) into ``output``
    (a folder, or a ``.json`` path with the page beside it; default: the run directory).
    Unreadable and non-image files are reported one line each and skipped. ``decoder``:
    ``'paper'`` (the original VirTex search) or ``'standard'`` (ours).
    """

    def __init__(self, images: str, model: Callable[[], torch.nn.Module] | None = None,
                 recursive: bool = False, output: str | None = None, all_beams: bool = False,
                 image_size: int = 224, resize: int = 256, resize_mode: str = "exact",
                 method: str = "beam", beam_size: int = 5, max_length: int = 30,
                 batch_size: int = 32, num_workers: int = 2, thumbnail_size: int = 256,
                 decoder: str = "paper"):
        self.folder, self.recursive, self.output = Path(images), recursive, output
        self.source = ModelSource(model, "caption_folder")
        self.all_beams, self.thumbnail_size = all_beams, thumbnail_size
        self.decoding = _decoding("caption_folder", method, beam_size, max_length, decoder,
                                  resize_mode,
                                  image_size=image_size, resize=resize, batch_size=batch_size,
                                  num_workers=num_workers)

    def _outputs(self, request: EvalRequest) -> tuple[Path, Path]:
        out = Path(self.output) if self.output else request.run_dir
        json_path = out if out.suffix.lower() == ".json" else out / "captions.json"
        return json_path, json_path.with_suffix(".html")

    def __call__(self, request: EvalRequest) -> EvalResult:
        if not self.folder.is_dir():
            raise UserError(f"evaluators.caption_folder.images: '{self.folder}' is not a folder")
        paths, others, folders = list_images(self.folder, self.recursive)
        if not paths:
            raise UserError(f"no JPEG, PNG or WebP images in '{self.folder}'"
                            + ("" if self.recursive else " (subfolders: set recursive=True)"))
        json_path, html_path = self._outputs(request)
        if request.rank == 0:  # an unwritable output fails now, not after the work
            write_text(json_path.with_name(f".{json_path.name}.probe"), "")
            json_path.with_name(f".{json_path.name}.probe").unlink()
        model = self.source(request)
        if model is None:
            request.info("caption_folder skipped: no captioning model or checkpoint in this run")
            return EvalResult()

        def name(path: Path) -> str:
            return path.relative_to(self.folder).as_posix()

        journal = CaptionJournal(request.run_dir, request.rank)
        done = journal.read()
        todo = [p for p in paths if name(p) not in done]
        if len(todo) < len(paths):
            request.info(f"caption_folder: {len(paths) - len(todo)} image(s) already "
                         f"captioned ({journal.pattern} in {request.run_dir}), {len(todo)} to go")
        mine = shard(todo, request.rank, request.world_size)

        def record(captions: list, errors: list) -> None:
            rows = [{"filename": name(mine[c.index]), "caption": c.caption,
                     **({"beams": c.beams} if self.all_beams else {}),
                     "thumbnail": c.thumbnail} for c in captions]
            rows += [{"filename": name(mine[i]), "error": reason} for i, reason in errors]
            journal.append(rows)

        caption_files(model, mine, request.device, all_beams=self.all_beams,
                      thumbnail=self.thumbnail_size, log=request.info,
                      progress=request.rank == 0, on_batch=record, **self.decoding)
        journal.close()
        dist.barrier()  # every process has written its journal
        if request.rank != 0:
            return EvalResult()
        done = journal.read()
        skipped = [(name(p), "not a JPEG, PNG or WebP file") for p in others]
        skipped += [(name(p), done[name(p)]["error"]) for p in paths
                    if "error" in done.get(name(p), {})]
        for filename, reason in skipped:
            request.info(f"skipped {filename}: {reason}")
        if folders:
            request.info(f"{folders} subfolder(s) of {self.folder} not searched "
                         "(recursive=False)")
        items = [done[name(p)] for p in paths if "caption" in done.get(name(p), {})]
        rows = [{k: v for k, v in item.items() if k != "thumbnail"} for item in items]
        write_text(json_path, json.dumps(rows, indent=2) + "\n")
        write_text(html_path, render_gallery(items, skipped, title=f"Captions: {self.folder}"))
        journal.remove()
        request.info(f"{len(rows)} image(s) captioned, {len(skipped)} file(s) skipped: "
                     f"{json_path}, {html_path}")
        return EvalResult({"caption_folder/images": float(len(rows)),
                           "caption_folder/skipped": float(len(skipped))},
                          files=[json_path, html_path])


class CaptionJournal:
    """Captions written as they are made, one JSON line per image, in
    ``RUN_DIR/captions.partial.<rank>.jsonl``: a killed run of a million images resumes
    with the images no process has written yet. A torn last line (the kill) is ignored.
    Removed once ``captions.json`` and the gallery are written."""

    pattern = "captions.partial.*.jsonl"

    def __init__(self, run_dir: Path, rank: int):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / f"captions.partial.{rank}.jsonl"
        self._file = None

    def read(self) -> dict[str, dict]:
        """Every process's rows so far, by file name."""
        rows: dict[str, dict] = {}
        for path in sorted(self.run_dir.glob(self.pattern)):
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and "filename" in row:
                    rows[row["filename"]] = row
        return rows

    def append(self, rows: list[dict]) -> None:
        if not rows:
            return
        if self._file is None:
            torn = self.path.is_file() and not self.path.read_bytes().endswith(b"\n") \
                and self.path.stat().st_size > 0
            self._file = open(self.path, "a", encoding="utf-8")
            if torn:  # end a killed writer's last line, so that the next one stands alone
                self._file.write("\n")
        self._file.write("".join(json.dumps(r) + "\n" for r in rows))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def remove(self) -> None:
        for path in self.run_dir.glob(self.pattern):
            path.unlink(missing_ok=True)


@hookimpl
def virtex_evaluators() -> dict:
    return {"caption_samples": CaptionSamples, "coco_captioning": CocoCaptioning,
            "caption_folder": CaptionFolder}


@hookimpl
def virtex_train_hooks() -> dict:
    return {"sample_captions": sample_captions}
