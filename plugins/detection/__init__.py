"""Object detection and instance segmentation transfer (the paper's Section 4.4 / Table 3):
fine-tune a detector from the backbone, evaluate it with the official metrics.

Evaluators ``coco_instance_seg``, ``lvis_instance_seg`` and ``voc_detection``; each trains
with the ``backend`` it is given: ``'detectron2'`` (the default and the paper specs' choice:
detectron2's model zoo, DefaultTrainer and evaluators, what the paper used; without
detectron2 importable this is one error saying how to install it), ``'torchvision'``
(torchvision detectors, virtex's engine) or ``'auto'`` (detectron2 when it is importable,
else torchvision). The backend used is recorded in the metrics as
``<prefix>/backend_detectron2`` (1.0: detectron2, 0.0: torchvision) and in ``summary.md``.
Training checkpoints go to ``run_dir/detection/<task>-<backend>-<weights hash>``, so a
killed run resumes there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from virtex import dist, hookimpl
from virtex.errors import UserError
from virtex.evaluation.api import EvalRequest, EvalResult
from virtex.evaluation.features import weights_hash
from virtex.models.visual import RESNETS

from .datasets import (
    DetectionData,
    concat,
    read_coco_instances,
    read_lvis_instances,
    read_voc_instances,
    voc_classes,
)
from .settings import ARCHS, NORMS, Settings

BACKENDS = ("auto", "torchvision", "detectron2")
D2_INSTALL = ("install it as in its documentation (an official build) or with 'bash "
              ".ci/detectron2.sh' (detectron2 0.6, Python code only), or choose the torchvision "
              "detectors knowingly with --gin_param backend=torchvision (not the paper's protocol)")


def detectron2_missing() -> str | None:
    """Why detectron2 cannot be imported (None: it can)."""
    try:
        import detectron2  # noqa: F401
    except ImportError as exc:
        return str(exc) or type(exc).__name__
    return None


def detectron2_available() -> bool:
    return detectron2_missing() is None


_SCHEDULE_2X = dict(max_steps=180_000, milestones=(120_000, 160_000), warmup_steps=1000)
_FPN_SIZES = (640, 672, 704, 736, 768, 800)


class _Detection:
    """Arguments common to the three evaluators; ``None`` means the task's default (the
    paper's setting, in each class's ``defaults``)."""

    name = ""
    prefix = ""
    arch = "mask_rcnn_fpn"
    defaults: dict = {}

    def __init__(self, root: str, train: object = None, test: object = None,
                 image_root: str | None = None, backend: str = "detectron2", norm: str = "SyncBN",
                 fpn_norm: str | None = "SyncBN", extra_norm: bool | None = None,
                 min_size_train: Sequence[int] | None = None, min_size_test: int = 800,
                 max_size: int = 1333, batch_size: int = 16, lr: float = 0.02,
                 max_steps: int | None = None, milestones: Sequence[int] | None = None,
                 warmup_steps: int | None = None, momentum: float = 0.9,
                 weight_decay: float = 1e-4, rpn_pre_nms_train: int | None = None,
                 rpn_pre_nms_test: int | None = None, rpn_post_nms_train: int | None = None,
                 rpn_post_nms_test: int | None = None, roi_batch_size: int = 512,
                 score_thresh: float | None = None, detections_per_image: int | None = None,
                 repeat_threshold: float | None = None, precise_bn_iters: int = 200,
                 amp: str | None = None, checkpoint_every: int = 5000, num_workers: int = 4,
                 cpu_threads: int | None = None, log_every: int = 20):
        where = f"evaluators.{self.name}"
        if backend not in BACKENDS:
            raise UserError(f"{where}.backend = {backend!r}: expected one of {', '.join(BACKENDS)}")
        if norm not in NORMS:
            raise UserError(f"{where}.norm = {norm!r}: expected one of {', '.join(NORMS)}")
        if fpn_norm is not None and fpn_norm not in NORMS:
            raise UserError(f"{where}.fpn_norm = {fpn_norm!r}: expected None or one of "
                            f"{', '.join(NORMS)}")
        if amp not in (None, "fp16", "bf16"):
            raise UserError(f"{where}.amp = {amp!r}: expected None, 'fp16' or 'bf16'")
        given = dict(
            train=train, test=test, extra_norm=extra_norm, min_size_train=min_size_train,
            max_steps=max_steps, milestones=milestones, warmup_steps=warmup_steps,
            score_thresh=score_thresh, detections_per_image=detections_per_image,
            repeat_threshold=repeat_threshold)
        chosen = {k: self.defaults.get(k) if v is None else v for k, v in given.items()}
        if batch_size < 1 or chosen["max_steps"] < 0 or not chosen["min_size_train"]:
            raise UserError(f"{where}: batch_size >= 1, max_steps >= 0 and a non-empty "
                            "min_size_train are needed")
        self.root, self.image_root, self.backend = root, image_root, backend
        self.train, self.test = chosen.pop("train"), chosen.pop("test")
        self.options = dict(
            norm=norm, fpn_norm=fpn_norm, extra_norm=bool(chosen.pop("extra_norm")),
            min_size_train=tuple(chosen.pop("min_size_train")), min_size_test=min_size_test,
            max_size=max_size, batch_size=batch_size, lr=lr,
            milestones=tuple(chosen.pop("milestones")), momentum=momentum,
            weight_decay=weight_decay, rpn_pre_nms_train=rpn_pre_nms_train,
            rpn_pre_nms_test=rpn_pre_nms_test, rpn_post_nms_train=rpn_post_nms_train,
            rpn_post_nms_test=rpn_post_nms_test, roi_batch_size=roi_batch_size,
            precise_bn_iters=precise_bn_iters, amp=amp, checkpoint_every=checkpoint_every,
            num_workers=num_workers, cpu_threads=cpu_threads, log_every=log_every, **chosen)
        self.options["repeat_threshold"] = self.options["repeat_threshold"] or None
        assert self.arch in ARCHS
        if backend == "detectron2":
            self.resolved_backend()  # fail before any checkpoint or data is read

    # -- what a task defines ----------------------------------------------------------
    def data(self) -> tuple[DetectionData, DetectionData]:
        """(training data, test data)."""
        raise NotImplementedError

    def metrics(self, test: DetectionData, predictions: list) -> dict[str, float]:
        raise NotImplementedError

    # -- the run ----------------------------------------------------------------------
    def resolved_backend(self) -> str:
        if self.backend == "auto":
            return "detectron2" if detectron2_available() else "torchvision"
        if self.backend == "detectron2" and (why := detectron2_missing()) is not None:
            raise UserError(f"evaluators.{self.name}.backend = 'detectron2' (the paper's "
                            f"protocol), but detectron2 is not installed ({why}): {D2_INSTALL}")
        return self.backend

    def __call__(self, request: EvalRequest) -> EvalResult:
        backbone = request.backbone
        if getattr(backbone, "name", None) not in RESNETS or not hasattr(backbone, "cnn"):
            raise UserError(f"evaluators.{self.name} needs a torchvision ResNet backbone "
                            f"(experiment.backbone = @backbones.resnet50 or another of "
                            f"{', '.join(RESNETS)}), got {type(backbone).__name__}")
        backend = self.resolved_backend()
        if self.options["batch_size"] % request.world_size:
            raise UserError(f"evaluators.{self.name}.batch_size = {self.options['batch_size']} "
                            f"is not divisible by the {request.world_size} processes")
        train, test = self.data()
        settings = Settings(arch=self.arch, num_classes=len(train.classes), **self.options)
        work_dir = (request.run_dir / "detection"
                    / f"{self.name}-{backend}-{weights_hash(backbone.cnn)[:10]}")
        if backend == "torchvision":
            from .torchvision_backend import run

            predictions = run(request, settings, train, test, work_dir)
            raw = None
            if request.rank == 0:  # the official evaluation once, its numbers to every process
                raw = {**self.metrics(test, predictions),
                       "images": len({p.index for p in predictions})}
            raw = dist.gather_objects(raw)[0]
        else:
            from .detectron2_backend import run as run_d2

            raw = run_d2(request, settings, train, test, work_dir, self.name)
        metrics = {f"{self.prefix}/{k}": float(v) for k, v in raw.items()}  # images: evaluated
        metrics[f"{self.prefix}/backend_detectron2"] = float(backend == "detectron2")
        summary = [f"{self.name}: {backend} backend, {settings.arch} ({backbone.name}), "
                   f"{settings.max_steps} steps; checkpoints in {work_dir}"]
        request.log({k: v for k, v in metrics.items() if math.isfinite(v)}, settings.max_steps)
        return EvalResult(metrics, summary)


class CocoInstanceSeg(_Detection):
    """COCO instance segmentation: Mask R-CNN R50-FPN on ``train`` (a split of ``root``,
    default train2017), box and mask AP by the COCO API on ``test`` (val2017).
    Metrics ``coco/bbox_AP``, ``coco/segm_AP``, ``..._AP50`` ... (percent)."""

    name, prefix, arch = "coco_instance_seg", "coco", "mask_rcnn_fpn"
    defaults = dict(train="train2017", test="val2017", extra_norm=False,
                    min_size_train=_FPN_SIZES, score_thresh=0.05, detections_per_image=100,
                    **_SCHEDULE_2X)

    def data(self) -> tuple[DetectionData, DetectionData]:
        return read_coco_instances(self.root, self.train), read_coco_instances(self.root, self.test)

    def metrics(self, test: DetectionData, predictions: list) -> dict[str, float]:
        from .evaluate import coco_metrics

        return coco_metrics(test, predictions)


class LvisInstanceSeg(_Detection):
    """LVIS v1 instance segmentation: Mask R-CNN R50-FPN with repeat-factor sampling on
    ``root/lvis_v1_{train}.json`` (images under ``image_root``, the COCO directory);
    ``lvis/segm_AP``, ``lvis/segm_APr`` / ``APc`` / ``APf`` (and ``bbox_*``) by the LVIS API."""

    name, prefix, arch = "lvis_instance_seg", "lvis", "mask_rcnn_fpn"
    defaults = dict(train="train", test="val", extra_norm=False, min_size_train=_FPN_SIZES,
                    score_thresh=0.0001, detections_per_image=300, repeat_threshold=0.001,
                    **_SCHEDULE_2X)

    def data(self) -> tuple[DetectionData, DetectionData]:
        if self.image_root is None:
            raise UserError(f"evaluators.{self.name}.image_root is not set: the COCO directory "
                            "holding train2017/ and val2017/ (LVIS v1 uses COCO's images)")
        return (read_lvis_instances(self.root, self.image_root, self.train),
                read_lvis_instances(self.root, self.image_root, self.test))

    def metrics(self, test: DetectionData, predictions: list) -> dict[str, float]:
        from .evaluate import lvis_metrics

        return lvis_metrics(test, predictions, max_dets=self.options["detections_per_image"])


class VocDetection(_Detection):
    """PASCAL VOC detection: Faster R-CNN R50-C4 trained on ``train`` (a list of
    ``(directory, split)``, directories relative to ``root`` or absolute), tested on
    ``test`` (one pair); ``voc_det/AP50``, ``voc_det/AP``, ``voc_det/AP75`` (the VOC2007
    11-point metric over IoU 0.5:0.95, see ``evaluate.py``)."""

    name, prefix, arch = "voc_detection", "voc_det", "faster_rcnn_c4"
    defaults = dict(train=(("VOC2007", "trainval"), ("VOC2012", "trainval")),
                    test=("VOC2007", "test"), extra_norm=True,
                    min_size_train=(480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800),
                    max_steps=24_000, milestones=(18_000, 22_000), warmup_steps=100,
                    score_thresh=0.05, detections_per_image=100)

    def _pairs(self, value: object, what: str) -> list[tuple[Path, str]]:
        """``train``: a list of (directory, split); ``test``: one such pair."""
        out = []
        for pair in [value] if what == "test" else value:  # type: ignore[union-attr]
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                    and all(isinstance(v, str) for v in pair)):
                raise UserError(f"evaluators.{self.name}.{what}: {pair!r} is not a "
                                "('VOC20XX', 'split') pair")
            out.append((Path(self.root) / pair[0], pair[1]))
        return out

    def data(self) -> tuple[DetectionData, DetectionData]:
        train_sets = self._pairs(self.train, "train")
        (test_dir, test_split), = self._pairs(self.test, "test")
        classes = voc_classes(*train_sets[0])
        train = concat([read_voc_instances(d, s, classes) for d, s in train_sets])
        return train, read_voc_instances(test_dir, test_split, classes)

    def metrics(self, test: DetectionData, predictions: list) -> dict[str, float]:
        from .evaluate import voc_metrics

        return voc_metrics(test, predictions)


@hookimpl
def virtex_evaluators() -> dict:
    return {"coco_instance_seg": CocoInstanceSeg, "lvis_instance_seg": LvisInstanceSeg,
            "voc_detection": VocDetection}
