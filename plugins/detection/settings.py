"""What a detection task asks of a backend: the model, the schedule, test-time options.

One :class:`DetectionSettings` holds them all: specs bind it as ``detection_settings``
(``evaluators.coco_instance_seg.settings = @detection_settings()``), each value is checked
once, when it is built, and the evaluator hands it, with its architecture and number of
classes filled in, to the backend. A spec running two detection evaluators gives each its
own scope: ``@coco/detection_settings()`` with ``coco/detection_settings.lr = ...``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Literal

import gin

from virtex.checks import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
    Probability,
    checked_as,
)
from virtex.errors import UserError

Arch = Literal["mask_rcnn_fpn", "faster_rcnn_c4"]
Norm = Literal["BN", "SyncBN", "FrozenBN"]
ARCHS: tuple[str, ...] = typing.get_args(Arch)
NORMS: tuple[str, ...] = typing.get_args(Norm)

# Region proposals per architecture (detectron2's configs): FPN counts before NMS are per
# level, C4 ones per image; after NMS always per image.
RPN_DEFAULTS = {
    "mask_rcnn_fpn": {"pre_nms_train": 2000, "pre_nms_test": 1000,
                      "post_nms_train": 1000, "post_nms_test": 1000},
    "faster_rcnn_c4": {"pre_nms_train": 12000, "pre_nms_test": 6000,
                       "post_nms_train": 2000, "post_nms_test": 1000},
}


@gin.configurable("detection_settings", denylist=["arch", "num_classes"])
@checked_as("detection_settings")
@dataclass(frozen=True)
class DetectionSettings:
    """One detection fine-tuning run. Field defaults: the paper's COCO Mask R-CNN R50-FPN
    (``specs/downstream/lvis.gin`` and ``voc_det.gin`` bind their own).

    ``arch`` and ``num_classes`` are the evaluator's to set (:meth:`for_task`), not a
    spec's; the ``rpn_*`` counts left None are the architecture's (:data:`RPN_DEFAULTS`).
    """

    norm: Norm = "SyncBN"  # backbone norm (no frozen stages: every layer trains)
    fpn_norm: Norm | None = "SyncBN"
    extra_norm: bool = False  # C4: a norm layer after res5 in the box head
    min_size_train: tuple[PositiveInt, ...] = (640, 672, 704, 736, 768, 800)
    min_size_test: PositiveInt = 800
    max_size: PositiveInt = 1333
    batch_size: PositiveInt = 16
    lr: NonNegativeFloat = 0.02
    max_steps: NonNegativeInt = 180_000
    milestones: tuple[NonNegativeInt, ...] = (120_000, 160_000)
    warmup_steps: NonNegativeInt = 1000
    momentum: NonNegativeFloat = 0.9
    weight_decay: NonNegativeFloat = 1e-4
    rpn_pre_nms_train: PositiveInt | None = None
    rpn_pre_nms_test: PositiveInt | None = None
    rpn_post_nms_train: PositiveInt | None = None
    rpn_post_nms_test: PositiveInt | None = None
    roi_batch_size: PositiveInt = 512
    score_thresh: Probability = 0.05
    detections_per_image: PositiveInt = 100
    precise_bn_iters: NonNegativeInt = 200
    repeat_threshold: NonNegativeFloat | None = None  # LVIS repeat-factor sampling; 0: none
    amp: Literal["fp16", "bf16"] | None = None
    checkpoint_every: PositiveInt = 5000
    num_workers: NonNegativeInt = 4
    cpu_threads: PositiveInt | None = None
    log_every: PositiveInt = 20
    arch: Arch | None = None
    num_classes: PositiveInt | None = None

    def __post_init__(self) -> None:
        if not self.min_size_train:
            raise UserError("detection_settings.min_size_train = (): expected at least one "
                            "training size")
        fixed = {"min_size_train": tuple(int(s) for s in self.min_size_train),
                 "milestones": tuple(int(s) for s in self.milestones),
                 "repeat_threshold": self.repeat_threshold or None}
        if self.arch is not None:
            for key, value in RPN_DEFAULTS[self.arch].items():
                if getattr(self, f"rpn_{key}") is None:
                    fixed[f"rpn_{key}"] = value
        for key, value in fixed.items():
            object.__setattr__(self, key, value)

    def for_task(self, arch: str, num_classes: int | None = None) -> DetectionSettings:
        """These settings for a task's ``arch`` (its RPN counts where none are given) and
        ``num_classes`` (None: still unknown)."""
        if self.arch is not None and self.arch != arch:  # RPN counts of another arch
            raise ValueError(f"settings of {self.arch} used for {arch}")
        return dataclasses.replace(self, arch=arch, num_classes=num_classes)

    @property
    def with_masks(self) -> bool:
        return self.arch == "mask_rcnn_fpn"
