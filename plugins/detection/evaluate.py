"""Detection metrics from predictions: COCO (pycocotools), LVIS (the lvis API), PASCAL VOC.

Predictions are :class:`Prediction` per test image, boxes in the image's own pixel
coordinates. All APs are in percent, as detectron2 reports them (NaN where
nothing of that kind is in the ground truth).

VOC follows what detectron2's ``PascalVOCDetectionEvaluator`` reports on ``voc_2007_test``
(the numbers of the paper): the VOC2007 11-point interpolated AP per class, at IoU
thresholds 0.50, 0.55, ..., 0.95; ``AP`` is the mean over thresholds and ``AP50`` /
``AP75`` the mean over classes at 0.5 / 0.75. Boxes are compared in VOC's inclusive
1-based pixel convention (width ``x1 - x0 + 1``), difficult objects are neither true nor
false positives, and a class with no non-difficult object in the test set is left out of
the mean (detectron2 counts it as AP 0; real VOC2007 test has objects of every class).
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .datasets import DetectionData

VOC_IOUS = tuple(round(0.5 + 0.05 * k, 2) for k in range(10))


@dataclass
class Prediction:
    """Detections of one test image (``index`` into the test records)."""

    index: int
    boxes: np.ndarray  # (N, 4) x0 y0 x1 y1
    scores: np.ndarray  # (N,)
    labels: np.ndarray  # (N,) in 0..K-1
    masks: list[dict] | None = None  # RLEs ({"size", "counts": str}) at image size


def encode_masks(masks: np.ndarray) -> list[dict]:
    """(N, H, W) binary masks as COCO RLEs with ``str`` counts (JSON-ready)."""
    from pycocotools import mask as mask_utils

    rles = mask_utils.encode(np.asfortranarray(masks.astype(np.uint8).transpose(1, 2, 0)))
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


def coco_results(data: DetectionData, predictions: list[Prediction]) -> list[dict]:
    """Predictions in the COCO results format (``bbox`` xywh, dataset category ids)."""
    out = []
    for p in predictions:
        image_id = data.records[p.index].image_id
        for k in range(len(p.scores)):
            x0, y0, x1, y1 = (float(v) for v in p.boxes[k])
            row = {"image_id": image_id, "category_id": data.category_ids[int(p.labels[k])],
                   "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(p.scores[k])}
            if p.masks is not None:
                row["segmentation"] = p.masks[k]
            out.append(row)
    return out


_COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _results_for(results: list[dict], iou_type: str) -> list[dict]:
    """The results an evaluation of ``iou_type`` reads: box ones without the masks."""
    if iou_type == "segm":
        return results
    return [{k: v for k, v in r.items() if k != "segmentation"} for r in results]


def coco_metrics(data: DetectionData, predictions: list[Prediction],
                 iou_types: tuple[str, ...] = ("bbox", "segm")) -> dict[str, float]:
    """COCO box / mask AP with pycocotools' COCOeval on the test annotation file."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(data.annotation_file))
    results = coco_results(data, predictions)
    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        if not results:  # nothing detected: every AP is 0 (pycocotools cannot load no results)
            metrics.update({f"{iou_type}_{k}": 0.0 for k in _COCO_KEYS})
            continue
        rows = _results_for(results, iou_type)
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes(rows)
        ev = COCOeval(gt, dt, iou_type)
        ev.params.imgIds = [r.image_id for r in data.records]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        metrics.update({f"{iou_type}_{k}": _percent(v) for k, v in zip(_COCO_KEYS, ev.stats)})
    return metrics


@contextlib.contextmanager
def lvis_numpy_compat() -> Iterator[None]:
    """The lvis API (0.5.3, the latest release) calls ``np.float``, which NumPy 1.24 removed:
    provide the alias while LVIS evaluation runs (also for detectron2's LVISEvaluator)."""
    added = "float" not in np.__dict__
    if added:
        np.float = float  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if added:
            del np.float  # type: ignore[attr-defined]


def lvis_metrics(data: DetectionData, predictions: list[Prediction], max_dets: int = 300,
                 iou_types: tuple[str, ...] = ("bbox", "segm")) -> dict[str, float]:
    """LVIS AP, AP50, AP75, APs/m/l and APr / APc / APf with the lvis API (LVISEval)."""
    from lvis import LVIS, LVISEval, LVISResults

    gt = LVIS(str(data.annotation_file))
    results = coco_results(data, predictions)
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        if not results:
            metrics.update({f"{iou_type}_{k}": 0.0 for k in keys})
            continue
        rows = _results_for(results, iou_type)
        ev = LVISEval(gt, LVISResults(gt, rows, max_dets=max_dets), iou_type)
        with lvis_numpy_compat():
            ev.run()
        ev.print_results()
        got = ev.get_results()
        metrics.update({f"{iou_type}_{k}": _percent(got[k]) for k in keys})
    return metrics


def _percent(v: float) -> float:
    """A COCO/LVIS AP in percent; their -1 ("no ground truth of that kind", e.g. no large
    objects) becomes NaN, as detectron2 reports it."""
    v = float(v)
    return math.nan if v < 0 else 100.0 * v


def voc_ap11(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2007 11-point AP: mean over t in {0, 0.1, ..., 1} of the best precision at recall >= t
    (the grid is ``np.arange(0, 1.1, 0.1)``, exactly as detectron2 evaluates it)."""
    total = 0.0
    for t in np.arange(0.0, 1.1, 0.1):
        above = recall >= t
        total += float(precision[above].max()) if above.any() else 0.0
    return total / 11.0


def _iou_inclusive(box: np.ndarray, gts: np.ndarray) -> np.ndarray:
    iw = np.clip(np.minimum(gts[:, 2], box[2]) - np.maximum(gts[:, 0], box[0]) + 1, 0, None)
    ih = np.clip(np.minimum(gts[:, 3], box[3]) - np.maximum(gts[:, 1], box[1]) + 1, 0, None)
    inter = iw * ih
    area = (box[2] - box[0] + 1) * (box[3] - box[1] + 1)
    areas = (gts[:, 2] - gts[:, 0] + 1) * (gts[:, 3] - gts[:, 1] + 1)
    return inter / (area + areas - inter)


def voc_class_ap(gt: dict[int, tuple[np.ndarray, np.ndarray]], dets: list[tuple[float, int, np.ndarray]],
                 iou: float) -> float | None:
    """AP of one class: ``gt[image] = (boxes, difficult)``, ``dets = [(score, image, box)]``,
    all boxes in VOC's 1-based inclusive convention; ``None`` without positives."""
    npos = sum(int((~d).sum()) for _, d in gt.values())
    if npos == 0:
        return None
    order = np.argsort(-np.asarray([d[0] for d in dets], dtype=np.float64), kind="stable")
    used = {i: np.zeros(len(b), dtype=bool) for i, (b, _) in gt.items()}
    tp = np.zeros(len(dets))
    fp = np.zeros(len(dets))
    for rank, j in enumerate(order):
        _, image, box = dets[j]
        boxes, difficult = gt.get(image, (np.zeros((0, 4)), np.zeros(0, dtype=bool)))
        if len(boxes) == 0:
            fp[rank] = 1
            continue
        overlaps = _iou_inclusive(box, boxes)
        best = int(overlaps.argmax())
        if overlaps[best] > iou:
            if difficult[best]:
                continue
            if used[image][best]:
                fp[rank] = 1
            else:
                tp[rank] = 1
                used[image][best] = True
        else:
            fp[rank] = 1
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    recall = tp / npos
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return voc_ap11(recall, precision)


def voc_metrics(data: DetectionData, predictions: list[Prediction]) -> dict[str, float]:
    """``AP`` (mean over IoU 0.50:0.95), ``AP50``, ``AP75`` of the VOC protocol (see module)."""
    K = len(data.classes)
    gts: list[dict[int, tuple[np.ndarray, np.ndarray]]] = [{} for _ in range(K)]
    for i, r in enumerate(data.records):
        boxes = r.boxes.astype(np.float64) + np.array([1.0, 1.0, 0.0, 0.0])  # back to 1-based
        difficult = r.difficult if r.difficult is not None else np.zeros(len(boxes), dtype=bool)
        for c in range(K):
            sel = r.labels == c
            gts[c][i] = (boxes[sel], difficult[sel])
    dets: list[list[tuple[float, int, np.ndarray]]] = [[] for _ in range(K)]
    for p in predictions:
        for box, score, label in zip(p.boxes, p.scores, p.labels):
            b = np.asarray(box, dtype=np.float64) + np.array([1.0, 1.0, 0.0, 0.0])
            dets[int(label)].append((float(score), p.index, b))
    per_iou = {}
    for iou in VOC_IOUS:
        aps = [voc_class_ap(gts[c], dets[c], iou) for c in range(K)]
        valid = [a for a in aps if a is not None]
        per_iou[iou] = 100.0 * float(np.mean(valid)) if valid else math.nan
    return {"AP": float(np.mean(list(per_iou.values()))), "AP50": per_iou[0.5],
            "AP75": per_iou[0.75]}
