"""The torchvision backend: torchvision's Mask R-CNN (ResNet-FPN) and a Faster R-CNN on
ResNet-C4 built from torchvision parts, trained with virtex's engine and evaluated with
pycocotools / the lvis API / the VOC protocol.

C4 (torchvision has no builder for it): the backbone is the ResNet stem to ``layer3``
(stride 16), the RPN runs on that one map with 15 anchors per position (sizes 32..512,
ratios 0.5, 1, 2), boxes are pooled 14x14 with RoIAlign and the box head is ``layer4``
(its first block has stride 2), an optional extra norm, then global average pooling.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from virtex import dist
from virtex.context import Context
from virtex.data.loader import data_loader
from virtex.data.source import MapSource, StepBatchSampler
from virtex.engine import Trainer
from virtex.evaluation.api import EvalRequest, gather, inference, shard
from virtex.models.visual import RESNETS

from .datasets import DetectionData, DetectionDataset, load_rgb
from .evaluate import Prediction, encode_masks
from .settings import DetectionSettings


class SyncBN(nn.BatchNorm2d):
    """A BatchNorm2d that becomes ``nn.SyncBatchNorm`` when several CUDA processes train."""


def _norm(kind: str | None):
    if kind is None:
        return None
    return {"BN": nn.BatchNorm2d, "SyncBN": SyncBN, "FrozenBN": FrozenBatchNorm2d}[kind]


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every :class:`SyncBN` in ``module`` by an equivalent ``nn.SyncBatchNorm``."""
    if isinstance(module, SyncBN):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        setattr(module, name, sync_batchnorm(child))
    return module


def build_resnet(name: str, norm: str, state: dict[str, torch.Tensor]) -> nn.Module:
    """A torchvision ResNet with ``norm`` layers holding ``state`` (the virtex backbone's)."""
    cnn = RESNETS[name](weights=None, norm_layer=_norm(norm))
    own = cnn.state_dict()
    state = {k: v for k, v in state.items() if k in own}
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"backbone state lacks {missing[:3]}")
    cnn.load_state_dict(state, strict=False)
    return cnn


def _width(layer: nn.Sequential) -> int:
    block = layer[-1]
    return getattr(block, "conv3", block.conv2).out_channels


class C4Backbone(nn.Sequential):
    """ResNet stem .. layer3: one stride-16 feature map."""

    def __init__(self, cnn: nn.Module):
        super().__init__(OrderedDict((k, getattr(cnn, k)) for k in (
            "conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")))
        self.out_channels = _width(cnn.layer3)


class Res5Head(nn.Module):
    """Box head of C4 detectors: res5 (``layer4``) on 14x14 RoI features, extra norm, pool."""

    def __init__(self, layer4: nn.Sequential, norm: str | None):
        super().__init__()
        self.res5 = layer4
        self.out_channels = _width(layer4)
        self.norm = _norm(norm)(self.out_channels) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.res5(x)).mean(dim=(2, 3))


def build_detector(s: DetectionSettings, backbone_name: str,
                   state: dict[str, torch.Tensor]) -> nn.Module:
    """The torchvision detector of ``s`` with its ResNet initialised from ``state``."""
    cnn = build_resnet(backbone_name, s.norm, state)
    common = dict(
        min_size=s.min_size_train, max_size=s.max_size,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
        rpn_pre_nms_top_n_train=s.rpn_pre_nms_train, rpn_pre_nms_top_n_test=s.rpn_pre_nms_test,
        rpn_post_nms_top_n_train=s.rpn_post_nms_train,
        rpn_post_nms_top_n_test=s.rpn_post_nms_test,
        box_batch_size_per_image=s.roi_batch_size, box_score_thresh=s.score_thresh,
        box_detections_per_img=s.detections_per_image,
    )
    if s.arch == "mask_rcnn_fpn":
        widths = [_width(getattr(cnn, f"layer{k}")) for k in range(1, 5)]
        backbone = BackboneWithFPN(
            cnn, {f"layer{k + 1}": str(k) for k in range(4)}, widths, 256,
            extra_blocks=LastLevelMaxPool(), norm_layer=_norm(s.fpn_norm))
        return MaskRCNN(backbone, num_classes=s.num_classes + 1, **common)
    backbone = C4Backbone(cnn)
    anchors = AnchorGenerator(((32, 64, 128, 256, 512),), ((0.5, 1.0, 2.0),))
    head = Res5Head(cnn.layer4, s.norm if s.extra_norm else None)
    return FasterRCNN(
        backbone, rpn_anchor_generator=anchors,
        rpn_head=RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0]),
        box_roi_pool=MultiScaleRoIAlign(["0"], 14, sampling_ratio=0), box_head=head,
        box_predictor=FastRCNNPredictor(head.out_channels, s.num_classes + 1), **common)


class DetectorTask(nn.Module):
    """A detector as a virtex task: ``forward(batch)`` returns its summed losses."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, batch: dict[str, list]) -> dict[str, object]:
        device = next(self.detector.parameters()).device
        images = [im.to(device, non_blocking=True) for im in batch["images"]]
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()}
                   for t in batch["targets"]]
        losses = self.detector(images, targets)
        return {"loss": sum(losses.values()), "losses": losses}


class RepeatFactorSampler(StepBatchSampler):
    """:class:`StepBatchSampler` over an epoch list where image ``i`` appears
    ``floor(r_i)`` times plus once more with probability ``frac(r_i)`` (drawn anew each
    epoch, seeded by ``(seed, epoch)``), so a resumed run sees the same batches."""

    def __init__(self, factors: np.ndarray, global_batch: int, rank: int, world_size: int,
                 seed: int, start_step: int, max_steps: int):
        super().__init__(len(factors), global_batch, rank, world_size, seed, start_step, max_steps)
        self.factors = torch.as_tensor(factors, dtype=torch.float64)
        self._starts = [0]  # first position of each epoch found so far
        self._epoch: tuple[int, torch.Tensor] | None = None

    def _counts(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        whole = self.factors.floor()
        extra = torch.rand(len(self.factors), generator=g, dtype=torch.float64)
        return (whole + (extra < self.factors - whole)).long()

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        counts = self._counts(epoch)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 7_919)
        order = torch.repeat_interleave(torch.arange(len(counts)), counts)
        return order[torch.randperm(len(order), generator=g)]

    def index(self, position: int) -> int:
        while len(self._starts) < 2 or position >= self._starts[-1]:
            self._starts.append(self._starts[-1] + int(self._counts(len(self._starts) - 1).sum()))
        epoch = max(e for e, start in enumerate(self._starts[:-1]) if start <= position)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self.epoch_indices(epoch))
        return int(self._epoch[1][position - self._starts[epoch]])


class RepeatFactorSource(MapSource):
    """The map-style source over a dataset with ``repeat_factors``, sampled by
    :class:`RepeatFactorSampler`."""

    def sampler(self, seed: int, start_step: int, rank: int, world_size: int) -> StepBatchSampler:
        return RepeatFactorSampler(self.dataset.repeat_factors, self.batch_size, rank,
                                   world_size, seed, start_step, self.max_steps)


def training_source(dataset: DetectionDataset, s: DetectionSettings, ctx: Context) -> Dataset | MapSource:
    """Repeat-factor sampling when ``dataset`` has ``repeat_factors``, else ``dataset``
    (the trainer's own map-style source)."""
    if getattr(dataset, "repeat_factors", None) is None:
        return dataset
    return RepeatFactorSource(dataset, s.batch_size, s.max_steps, s.num_workers,
                              pin_memory=ctx.device.type == "cuda")


@torch.no_grad()
def precise_bn(task: DetectorTask, dataset: DetectionDataset, s: DetectionSettings,
               ctx: EvalRequest) -> None:
    """Recompute BatchNorm statistics of the final model as a plain average over
    ``s.precise_bn_iters`` training batches (detectron2's PreciseBN at test time)."""
    bns = [m for m in task.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns or s.precise_bn_iters <= 0:
        return
    loader = MapSource(dataset, s.batch_size, s.precise_bn_iters, s.num_workers).batches(
        ctx.seed + 1, 0, ctx.rank, ctx.world_size)
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    task.train()
    for batch in loader:
        task(batch)
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
        if ctx.world_size > 1:
            for buf in (m.running_mean, m.running_var):
                buf.copy_(dist.mean(buf))
    ctx.info(f"precise BN: statistics of {len(bns)} norm layers over {s.precise_bn_iters} batches")


class _TestImages(Dataset):
    def __init__(self, data: DetectionData, indices: list[int]):
        self.data, self.indices = data, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        index = self.indices[i]
        return index, load_rgb(self.data.records[index].path)


def predict(detector: nn.Module, data: DetectionData, s: DetectionSettings,
            ctx: EvalRequest) -> list[Prediction]:
    """Detections of every test image (images split over processes, gathered on all)."""
    transform = detector.transform
    train_sizes = transform.min_size
    transform.min_size = (s.min_size_test,)
    indices = shard(range(len(data.records)), ctx.rank, ctx.world_size)
    loader = data_loader(_TestImages(data, indices), batch_size=None, num_workers=s.num_workers)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(s.amp or "")
    mine = []
    try:
        with inference(detector):
            for index, image in loader:
                with torch.autocast(ctx.device.type, dtype=dtype or torch.float32,
                                    enabled=dtype is not None):
                    out = detector([image.to(ctx.device)])[0]
                masks = None
                if "masks" in out:
                    masks = encode_masks((out["masks"][:, 0] > 0.5).cpu().numpy())
                mine.append(Prediction(int(index), out["boxes"].float().cpu().numpy(),
                                       out["scores"].float().cpu().numpy(),
                                       (out["labels"] - 1).cpu().numpy(), masks))
    finally:
        transform.min_size = train_sizes
    return sorted(gather(mine), key=lambda p: p.index)


def run(ctx: EvalRequest, s: DetectionSettings, train: DetectionData, test: DetectionData,
        work_dir: Path) -> list[Prediction]:
    """Fine-tune a detector from ``ctx.backbone`` (resuming from ``work_dir``), predict ``test``."""
    cnn = ctx.backbone.cnn
    state = {k: v.detach().cpu() for k, v in cnn.state_dict().items()}
    detector = build_detector(s, ctx.backbone.name, state)
    if ctx.world_size > 1 and ctx.device.type == "cuda":
        detector = sync_batchnorm(detector)
    task = DetectorTask(detector)
    dataset = DetectionDataset(train, with_masks=s.with_masks, repeat_threshold=s.repeat_threshold)
    trainer = Trainer(
        dataset=training_source(dataset, s, ctx), batch_size=s.batch_size, max_steps=s.max_steps, optimizer="sgd",
        lr=s.lr, backbone_lr=None, momentum=s.momentum, weight_decay=s.weight_decay,
        warmup_steps=s.warmup_steps, schedule="multistep", milestones=s.milestones, gamma=0.1,
        lookahead=False, clip_grad_norm=None, amp=s.amp, num_workers=s.num_workers,
        cpu_threads=s.cpu_threads, checkpoint_every=s.checkpoint_every, keep_last=2,
        keep_every=None, log_every=s.log_every)
    ctx.info(f"detection ({s.arch}, torchvision): {len(dataset)} training images, "
             f"{s.max_steps} steps of {s.batch_size}; checkpoints in {work_dir}")
    task = trainer.fit(task, ctx.trainer_context(), ckpt_dir=work_dir)
    precise_bn(task, dataset, s, ctx)
    return predict(task.detector, test, s, ctx)
