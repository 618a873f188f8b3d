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
from pathlib import Path
from typing import Literal

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
from .settings import DetectionSettings

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


class _Detection:
    """What the three evaluators share: the data (``root``, ``train``, ``test``, ``image_root``),
    the ``backend``, and the run's :class:`DetectionSettings` (``settings``, the specs'
    ``@detection_settings()``; None: ``DetectionSettings()``)."""

    name = ""
    prefix = ""
    arch = "mask_rcnn_fpn"
    default_train: object = None
    default_test: object = None

    def __init__(self, root: str, train: object = None, test: object = None,
                 image_root: str | None = None,
                 backend: Literal["auto", "torchvision", "detectron2"] = "detectron2",
                 settings: DetectionSettings | None = None):
        if settings is None:
            settings = DetectionSettings()
        if not isinstance(settings, DetectionSettings):
            raise UserError(f"evaluators.{self.name}.settings = {settings!r}: expected "
                            "@detection_settings()")
        self.root, self.image_root, self.backend = root, image_root, backend
        self.train = self.default_train if train is None else train
        self.test = self.default_test if test is None else test
        self.settings = settings.for_task(self.arch)
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
        if self.settings.batch_size % request.world_size:
            raise UserError(f"detection_settings.batch_size = {self.settings.batch_size} "
                            f"is not divisible by the {request.world_size} processes")
        train, test = self.data()
        settings = self.settings.for_task(self.arch, len(train.classes))
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
    default_train, default_test = "train2017", "val2017"

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
    default_train, default_test = "train", "val"

    def data(self) -> tuple[DetectionData, DetectionData]:
        if self.image_root is None:
            raise UserError(f"evaluators.{self.name}.image_root is not set: the COCO directory "
                            "holding train2017/ and val2017/ (LVIS v1 uses COCO's images)")
        return (read_lvis_instances(self.root, self.image_root, self.train),
                read_lvis_instances(self.root, self.image_root, self.test))

    def metrics(self, test: DetectionData, predictions: list) -> dict[str, float]:
        from .evaluate import lvis_metrics

        return lvis_metrics(test, predictions, max_dets=self.settings.detections_per_image)


class VocDetection(_Detection):
    """PASCAL VOC detection: Faster R-CNN R50-C4 trained on ``train`` (a list of
    ``(directory, split)``, directories relative to ``root`` or absolute), tested on
    ``test`` (one pair); ``voc_det/AP50``, ``voc_det/AP``, ``voc_det/AP75`` (the VOC2007
    11-point metric over IoU 0.5:0.95, see ``evaluate.py``)."""

    name, prefix, arch = "voc_detection", "voc_det", "faster_rcnn_c4"
    default_train = (("VOC2007", "trainval"), ("VOC2012", "trainval"))
    default_test = ("VOC2007", "test")

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
