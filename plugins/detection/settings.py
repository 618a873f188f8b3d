"""What a detection task asks of a backend: the model, the schedule, test-time options."""

from __future__ import annotations

from dataclasses import dataclass

ARCHS = ("mask_rcnn_fpn", "faster_rcnn_c4")
NORMS = ("BN", "SyncBN", "FrozenBN")

# Region proposals per architecture (detectron2's configs): FPN counts before NMS are per
# level, C4 ones per image; after NMS always per image.
RPN_DEFAULTS = {
    "mask_rcnn_fpn": {"pre_nms_train": 2000, "pre_nms_test": 1000,
                      "post_nms_train": 1000, "post_nms_test": 1000},
    "faster_rcnn_c4": {"pre_nms_train": 12000, "pre_nms_test": 6000,
                       "post_nms_train": 2000, "post_nms_test": 1000},
}


@dataclass
class Settings:
    """One detection fine-tuning run (field defaults: the paper's COCO Mask R-CNN R50-FPN)."""

    arch: str = "mask_rcnn_fpn"
    num_classes: int = 80
    norm: str = "SyncBN"  # backbone norm (no frozen stages: every layer trains)
    fpn_norm: str | None = "SyncBN"
    extra_norm: bool = False  # C4: a norm layer after res5 in the box head
    min_size_train: tuple[int, ...] = (640, 672, 704, 736, 768, 800)
    min_size_test: int = 800
    max_size: int = 1333
    batch_size: int = 16
    lr: float = 0.02
    max_steps: int = 180_000
    milestones: tuple[int, ...] = (120_000, 160_000)
    warmup_steps: int = 1000
    momentum: float = 0.9
    weight_decay: float = 1e-4
    rpn_pre_nms_train: int | None = None  # None: RPN_DEFAULTS of the arch
    rpn_pre_nms_test: int | None = None
    rpn_post_nms_train: int | None = None
    rpn_post_nms_test: int | None = None
    roi_batch_size: int = 512
    score_thresh: float = 0.05
    detections_per_image: int = 100
    precise_bn_iters: int = 200
    repeat_threshold: float | None = None
    amp: str | None = None
    checkpoint_every: int = 5000
    num_workers: int = 4
    cpu_threads: int | None = None
    log_every: int = 20

    def __post_init__(self) -> None:
        for key, value in RPN_DEFAULTS[self.arch].items():
            if getattr(self, f"rpn_{key}") is None:
                setattr(self, f"rpn_{key}", value)
        self.min_size_train = tuple(int(s) for s in self.min_size_train)
        self.milestones = tuple(int(s) for s in self.milestones)

    @property
    def with_masks(self) -> bool:
        return self.arch == "mask_rcnn_fpn"
