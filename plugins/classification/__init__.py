"""Transfer by classification: the ImageNet linear probe and iNaturalist 2018 fine-tuning.

Both train with :class:`virtex.engine.Trainer` (deterministic order, exact resume, DDP,
AMP) built from a gin-scoped trainer factory given by the spec (``@linear/trainer``,
``@inat/trainer``), then measure top-1 / top-5 on the validation split. Training state
lives in ``run_dir/<name>/<hash of the initial backbone weights>``: re-running the same
command resumes it, and another backbone (a sweep's next checkpoint, a random-init
baseline) never picks up a foreign checkpoint.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from virtex import dist, hookimpl
from virtex.data import transforms as T
from virtex.data.datasets import ImageClassificationDataset
from virtex.data.loader import data_loader
from virtex.data.readers import read_image_folder, read_inat
from virtex.errors import UserError
from virtex.evaluation.api import EvalRequest, EvalResult, inference, shard
from virtex.evaluation.features import weights_hash
from virtex.io import write_json

HEADS = ("linear", "bn_linear")
CLASSIFIER_INITS = ("virtex", "pytorch")


def _check_choice(binding: str, value: str, choices: tuple[str, ...], meaning: str) -> None:
    if value not in choices:
        raise UserError(f"{binding}: unknown {value!r}, expected one of "
                        f"{', '.join(map(repr, choices))} ({meaning})")


def classifier(in_features: int, num_classes: int, init: str = "virtex") -> nn.Linear:
    """A new linear classifier. ``init='virtex'``: weight N(0, 0.01), bias 0, as the
    original's ImageNet / iNaturalist script re-initialises its ``fc``; ``'pytorch'``:
    ``nn.Linear``'s default (uniform) initialisation."""
    _check_choice("classifier_init", init, CLASSIFIER_INITS,
                  "'virtex': N(0, 0.01) weight, zero bias; 'pytorch': nn.Linear's default")
    fc = nn.Linear(in_features, num_classes)
    if init == "virtex":
        nn.init.normal_(fc.weight, mean=0.0, std=0.01)
        nn.init.zeros_(fc.bias)
    return fc


class LinearProbe(nn.Module):
    """A frozen backbone (always in eval mode), pooled features and a linear classifier,
    the only trained weights. ``head='linear'`` (the original VirTex): the classifier on
    the pooled features; ``'bn_linear'``: BatchNorm without affine parameters first."""

    def __init__(self, visual: nn.Module, num_classes: int, head: str = "linear",
                 classifier_init: str = "virtex"):
        super().__init__()
        _check_choice("head", head, HEADS, "'linear': fc on pooled features, as the "
                      "original; 'bn_linear': BatchNorm1d without affine, then fc")
        self.visual = visual.requires_grad_(False)
        channels = visual.out_channels
        self.bn = nn.BatchNorm1d(channels, affine=False) if head == "bn_linear" else nn.Identity()
        self.fc = classifier(channels, num_classes, classifier_init)

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.visual.eval()
        return self

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.visual(images).float().mean(dim=(2, 3))
        return self.fc(self.bn(feats))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict:
        loss = F.cross_entropy(self.logits(batch["image"]), batch["target"])
        return {"loss": loss, "losses": {"cross_entropy": loss.detach()}}


class FineTune(nn.Module):
    """The whole backbone and a new linear classifier on its pooled features."""

    def __init__(self, visual: nn.Module, num_classes: int, classifier_init: str = "virtex"):
        super().__init__()
        self.visual = visual.requires_grad_(True)
        self.fc = classifier(visual.out_channels, num_classes, classifier_init)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.visual(images).mean(dim=(2, 3)))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict:
        loss = F.cross_entropy(self.logits(batch["image"]), batch["target"])
        return {"loss": loss, "losses": {"cross_entropy": loss.detach()}}


def train_transform(size: int = 224, scale: tuple[float, float] = (0.08, 1.0)) -> T.Compose:
    """Classification training augmentation: random resized crop, horizontal flip, normalise."""
    return T.Compose([T.RandomResizedCrop(size, tuple(scale)), T.HorizontalFlip(0.5),
                      T.Normalize()])


def _eval_transform(size: int, resize: int | None, resize_mode: str) -> T.Compose:
    return T.eval_transform(resize or round(size * 256 / 224), size, resize_mode)


def class_counts(model: nn.Module, dataset: ImageClassificationDataset, num_classes: int,
                 request: EvalRequest, batch_size: int = 256,
                 num_workers: int = 4) -> torch.Tensor:
    """``(3, K)`` counts per class: top-1 hits, top-5 hits, images; each rank scores its
    share of ``dataset`` and the counts are summed over ranks."""
    device = request.device
    loader = data_loader(shard(dataset, request.rank, request.world_size),
                         batch_size=batch_size, num_workers=num_workers,
                         pin_memory=device.type == "cuda")
    counts = torch.zeros(3, num_classes, dtype=torch.float64, device=device)
    with inference(model):
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True)
            target = batch["target"].to(device, non_blocking=True)
            top = model.logits(images).topk(min(5, num_classes), dim=1).indices
            hits = top == target[:, None]
            for row, values in enumerate((hits[:, 0], hits.any(dim=1), torch.ones_like(target))):
                counts[row] += torch.bincount(target, weights=values.double(),
                                              minlength=num_classes)
    if request.world_size > 1:
        torch.distributed.all_reduce(counts)
    return counts.cpu()


def _fit(model: nn.Module, trainer: Callable, dataset: ImageClassificationDataset, epochs: int,
         batch_size: int, request: EvalRequest, name: str, **options: object) -> nn.Module:
    """Train for ``epochs`` (``ceil(N / batch_size)`` steps each) with a trainer from the
    factory ``trainer``; resumes from ``run_dir/name/<initial weights hash>``."""
    if not callable(trainer):
        raise UserError(f"{name}: trainer must be a trainer factory such as @{name}/trainer "
                        f"(without '()'), got {type(trainer).__name__}")
    if batch_size % request.world_size:
        raise UserError(f"{name}: batch_size {batch_size} is not divisible by the "
                        f"{request.world_size} processes")
    steps_per_epoch = math.ceil(len(dataset) / batch_size)
    # rank 0's name: a random-init backbone differs between ranks until DDP syncs it
    ckpt_dir = request.run_dir / name / dist.gather_objects(weights_hash(model.visual)[:12])[0]
    request.info(f"{name}: {epochs} epochs of {steps_per_epoch} steps, checkpoints in {ckpt_dir}")
    fit = trainer(dataset=dataset, batch_size=batch_size, max_steps=epochs * steps_per_epoch,
                  **options)
    model = fit.fit(model, request.trainer_context(), ckpt_dir=ckpt_dir)
    if request.world_size > 1:  # BatchNorm statistics drift apart per rank: take rank 0's
        for tensor in model.state_dict().values():
            torch.distributed.broadcast(tensor, 0)
    return model


def _accuracy(counts: torch.Tensor) -> tuple[float, float, float]:
    """(top-1 %, top-5 %, mean per-class top-1 % over classes with images)."""
    total = counts[2].sum().clamp_min(1)
    seen = counts[2] > 0
    per_class = counts[0][seen] / counts[2][seen]
    mean_class = float(per_class.mean()) * 100 if seen.any() else 0.0
    return float(counts[0].sum() / total) * 100, float(counts[1].sum() / total) * 100, mean_class


class ImageNetLinear:
    """Linear probe on a frozen backbone over an ImageNet-layout folder
    (``root/{train,val}/<class>/*.JPEG``). Returns ``imagenet/top1`` and ``imagenet/top5``
    (percent) on the validation split. ``head`` and ``classifier_init``: see
    :class:`LinearProbe` and :func:`classifier`. Validation images: short side to
    ``resize``, central ``image_size`` crop; ``resize_mode='exact'`` resizes as the
    original (bilinear, no antialiasing), ``'antialias'`` is ours (see
    :func:`virtex.data.transforms.eval_transform`).
    """

    def __init__(self, root: str, trainer: Callable, epochs: int = 100, batch_size: int = 256,
                 image_size: int = 224, resize: int | None = None,
                 crop_scale: Sequence[float] = (0.08, 1.0), train_split: str = "train",
                 val_split: str = "val", eval_batch_size: int = 256, num_workers: int = 4,
                 head: str = "linear", classifier_init: str = "virtex",
                 resize_mode: str = "exact"):
        _check_choice("evaluators.imagenet_linear.head", head, HEADS,
                      "'linear': fc on pooled features, as the original; 'bn_linear': "
                      "BatchNorm1d without affine, then fc")
        _check_choice("evaluators.imagenet_linear.classifier_init", classifier_init,
                      CLASSIFIER_INITS, "'virtex': N(0, 0.01) weight, zero bias; 'pytorch': "
                      "nn.Linear's default")
        self.head, self.classifier_init = head, classifier_init
        self.resize_mode = T.check_resize_mode(resize_mode,
                                               "evaluators.imagenet_linear.resize_mode")
        self.root, self.trainer, self.epochs, self.batch_size = root, trainer, epochs, batch_size
        self.image_size, self.resize, self.crop_scale = image_size, resize, tuple(crop_scale)
        self.train_split, self.val_split = train_split, val_split
        self.eval_batch_size, self.num_workers = eval_batch_size, num_workers

    def __call__(self, request: EvalRequest) -> EvalResult:
        paths, targets, classes = read_image_folder(self.root, self.train_split)
        val_paths, val_targets, _ = read_image_folder(self.root, self.val_split, classes)
        train = ImageClassificationDataset(paths, targets,
                                           train_transform(self.image_size, self.crop_scale))
        val = ImageClassificationDataset(val_paths, val_targets,
                                         _eval_transform(self.image_size, self.resize,
                                                         self.resize_mode))
        model = LinearProbe(copy.deepcopy(request.backbone), len(classes), self.head,
                            self.classifier_init)
        model = _fit(model, self.trainer, train, self.epochs, self.batch_size, request, "linear")
        counts = class_counts(model, val, len(classes), request, self.eval_batch_size,
                              self.num_workers)
        top1, top5, _ = _accuracy(counts)
        return EvalResult({"imagenet/top1": top1, "imagenet/top5": top5})


class INaturalist:
    """Fine-tune the whole backbone with a new linear classifier on iNaturalist 2018
    (``root/{train2018,val2018}.json``); the learning rate drops by ``gamma`` (the
    trainer's) at ``milestones`` epochs. Returns ``inat/top1`` (over images) and
    ``inat/mean_class_top1`` (mean of per-class top-1), in percent; per-class accuracies
    go to ``run_dir/inat_per_class.json``. ``classifier_init``: see :func:`classifier`;
    ``resize_mode``: see :class:`ImageNetLinear`.
    """

    def __init__(self, root: str, trainer: Callable, epochs: int = 100,
                 milestones: Sequence[int] = (70, 90), batch_size: int = 256,
                 image_size: int = 224, resize: int | None = None,
                 crop_scale: Sequence[float] = (0.08, 1.0), train_split: str = "train2018",
                 val_split: str = "val2018", eval_batch_size: int = 256, num_workers: int = 4,
                 classifier_init: str = "virtex", resize_mode: str = "exact"):
        _check_choice("evaluators.inaturalist.classifier_init", classifier_init,
                      CLASSIFIER_INITS, "'virtex': N(0, 0.01) weight, zero bias; 'pytorch': "
                      "nn.Linear's default")
        self.classifier_init = classifier_init
        self.resize_mode = T.check_resize_mode(resize_mode, "evaluators.inaturalist.resize_mode")
        self.root, self.trainer, self.epochs, self.batch_size = root, trainer, epochs, batch_size
        self.milestones = tuple(milestones)
        self.image_size, self.resize, self.crop_scale = image_size, resize, tuple(crop_scale)
        self.train_split, self.val_split = train_split, val_split
        self.eval_batch_size, self.num_workers = eval_batch_size, num_workers

    def __call__(self, request: EvalRequest) -> EvalResult:
        paths, targets, classes = read_inat(self.root, self.train_split)
        val_paths, val_targets, val_classes = read_inat(self.root, self.val_split)
        if val_classes != classes:
            raise UserError(f"{Path(self.root) / self.val_split}.json: its categories differ "
                            f"from those of {self.train_split}.json ({len(val_classes)} vs "
                            f"{len(classes)}); expected the same category list")
        train = ImageClassificationDataset(paths, targets,
                                           train_transform(self.image_size, self.crop_scale))
        val = ImageClassificationDataset(val_paths, val_targets,
                                         _eval_transform(self.image_size, self.resize,
                                                         self.resize_mode))
        model = FineTune(copy.deepcopy(request.backbone), len(classes), self.classifier_init)
        steps_per_epoch = math.ceil(len(train) / self.batch_size)
        model = _fit(model, self.trainer, train, self.epochs, self.batch_size, request, "inat",
                     milestones=tuple(e * steps_per_epoch for e in self.milestones))
        counts = class_counts(model, val, len(classes), request, self.eval_batch_size,
                              self.num_workers)
        top1, top5, mean_class = _accuracy(counts)
        result = EvalResult({"inat/top1": top1, "inat/top5": top5,
                             "inat/mean_class_top1": mean_class})
        if request.rank == 0:
            path = request.run_dir / "inat_per_class.json"
            write_json(path, [
                {"class": name, "images": int(n), "top1": float(c / n) * 100 if n else None}
                for name, c, n in zip(classes, counts[0].tolist(), counts[2].tolist())])
            result.files.append(path)
        return result


@hookimpl
def virtex_evaluators() -> dict[str, Callable]:
    return {"imagenet_linear": ImageNetLinear, "inaturalist": INaturalist}


@hookimpl
def virtex_transforms() -> dict[str, Callable]:
    return {"classification_train": train_transform}
