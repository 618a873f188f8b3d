"""PASCAL VOC2007 linear-SVM classification: the paper's main representation benchmark.

The batched SVM solver is this plugin's ``svm`` module."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from virtex import hookimpl
from virtex.data.readers import read_voc_classification
from virtex.data.transforms import Compose, check_resize_mode, eval_min_side, eval_transform
from virtex.errors import UserError
from virtex.evaluation.api import EvalRequest, EvalResult
from virtex.evaluation.features import cached_features
from virtex.io import write_json

from .svm import voc07_svm_map


class VOC07SVM:
    """Frozen pooled features of VOC2007 trainval/test; per-class linear SVMs, costs by 3-fold CV.

    Returns ``voc07/mAP`` (percent) and ``voc07/AP/<class>``; ``run_dir/voc07_svm.json``
    also records each class's chosen cost. Images: short side to ``resize`` (None:
    ``image_size``), central ``image_size`` crop; ``resize_mode='exact'`` is the original's
    transform pixel for pixel, ``'antialias'`` ours (see :func:`eval_transform`). Features are cached per backbone weights,
    transform and image list (:func:`virtex.evaluation.features.cached_features`), so
    evaluating the same checkpoint again only re-fits the SVMs.
    """

    def __init__(self, root: str, costs: Sequence[float] = (0.01, 0.1, 1.0, 10.0),
                 image_size: int = 224, resize: int | None = None,
                 resize_mode: str = "exact", folds: int = 3, pos_weight: float = 2.0,
                 batch_size: int = 64, num_workers: int = 2, train_split: str = "trainval",
                 test_split: str = "test"):
        self.root, self.costs, self.image_size = root, tuple(costs), image_size
        self.resize = image_size if resize is None else resize
        self.resize_mode = check_resize_mode(resize_mode, "evaluators.voc07_svm.resize_mode")
        self.folds, self.pos_weight = folds, pos_weight
        self.batch_size, self.num_workers = batch_size, num_workers
        self.train_split, self.test_split = train_split, test_split

    def transform(self) -> Compose:
        """The image transform of both splits."""
        return eval_transform(self.resize, self.image_size, self.resize_mode)

    def features(self, request: EvalRequest, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Cached pooled features ``(N, C)``, VOC flags ``(N, K)`` and class names of ``split``."""
        paths, labels, classes = read_voc_classification(self.root, split)
        feats = cached_features(request.backbone, paths, self.transform(), request.device,
                                tag=f"voc07-{split}", batch_size=self.batch_size, num_workers=self.num_workers,
                                min_side=eval_min_side(self.resize, self.resize_mode))
        return feats, torch.as_tensor(labels), classes

    def __call__(self, request: EvalRequest) -> EvalResult:
        train_x, train_y, classes = self.features(request, self.train_split)
        test_x, test_y, test_classes = self.features(request, self.test_split)
        if test_classes != classes:
            missing = sorted(set(classes) ^ set(test_classes))
            raise UserError(f"{self.root}/ImageSets/Main: the classes of '{self.train_split}' "
                            f"and '{self.test_split}' differ ({', '.join(missing[:3])}); "
                            "expected a <class>_<split>.txt file for every class in both")
        result = voc07_svm_map(train_x, train_y, test_x, test_y, costs=self.costs,
                               folds=self.folds, pos_weight=self.pos_weight, device=request.device)
        metrics = {"voc07/mAP": float(result["mAP"])}
        for name, ap in zip(classes, result["ap"]):
            metrics[f"voc07/AP/{name}"] = float(ap)
        if request.rank != 0:
            return EvalResult(metrics)
        path = request.run_dir / "voc07_svm.json"
        write_json(path, {
            "step": request.step, "checkpoint": str(request.ckpt) if request.ckpt else None,
            "mAP": result["mAP"], "classes": [
                {"class": c, "ap": ap, "cost": cost}
                for c, ap, cost in zip(classes, result["ap"], result["best_cost"])]})
        return EvalResult(metrics, files=[path])


@hookimpl
def virtex_evaluators() -> dict:
    return {"voc07_svm": VOC07SVM}
