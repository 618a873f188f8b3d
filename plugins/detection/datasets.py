"""Detection data: readers for COCO / LVIS v1 / PASCAL VOC instance annotations, the
training dataset shared by the torchvision backend, and LVIS repeat factors.

Every reader returns :class:`DetectionData`: one :class:`Instances` record per image with
boxes in absolute ``x0, y0, x1, y1`` pixel coordinates (continuous, 0-based; VOC's
1-based inclusive integer boxes get ``x0 - 1, y0 - 1`` as in detectron2), class indices
``0..K-1`` in sorted category-id order, and what evaluation needs (the annotation file,
the dataset's category ids). Bad files raise one :class:`DataFormatError`.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from virtex.data.readers import (
    DataFormatError,
    check_files,
    coco_annotations,
    coco_categories,
    json_field,
    load_json,
)

_LVIS_LAYOUT = ("<root>/lvis_v1_<split>.json, images found from each image's coco_url as "
                "<image_root>/<train2017|val2017>/<file> (e.g. lvis/lvis_v1_train.json, coco/)")
_COCO_LAYOUT = ("<root>/annotations/instances_<split>.json and images in <root>/<split>/ "
                "(e.g. coco/annotations/instances_train2017.json, coco/train2017/*.jpg)")


@dataclass
class Instances:
    """One image and its annotated objects."""

    image_id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray  # (N, 4) float32 x0 y0 x1 y1
    labels: np.ndarray  # (N,) int64 in 0..K-1
    polygons: list[list[list[float]] | None] | None = None  # per object: [x, y, ...] rings,
    # None for an RLE segmentation
    crowd: np.ndarray | None = None  # (N,) bool; crowd regions are not trained on
    difficult: np.ndarray | None = None  # (N,) bool (VOC); ignored by the VOC metric
    name: str = ""  # VOC image id (file stem)


@dataclass
class DetectionData:
    """A split: its images, class names, and the files the official evaluation reads."""

    kind: str  # "coco", "lvis" or "voc"
    records: list[Instances]
    classes: list[str]
    category_ids: list[int] = field(default_factory=list)  # dataset id of class k (COCO/LVIS)
    annotation_file: Path | None = None  # COCO / LVIS ground truth JSON
    voc_root: Path | None = None  # VOC directory and split (for the VOC protocol)
    voc_split: str = ""


# ----------------------------------------------------------------------------- COCO, LVIS
def _categories(data: Any, path: Path) -> tuple[list[int], list[str]]:
    """Category ids in sorted order and their names (the readers' checks and errors)."""
    index, names = coco_categories(json_field(data, "categories", list, str(path)), path)
    return sorted(index), names


def _polygons(ann: dict, where: str) -> list[list[float]] | None:
    """Polygon rings of an annotation; ``None`` for an RLE (crowd) segmentation."""
    seg = ann.get("segmentation")
    if seg is None or isinstance(seg, dict):
        return None
    if not isinstance(seg, list) or not all(isinstance(r, list) and len(r) >= 6 and len(r) % 2 == 0
                                            for r in seg):
        raise DataFormatError(f"{where}: 'segmentation' must be a list of polygons "
                              "[[x0, y0, x1, y1, ...], ...] with at least 3 points each, or an RLE")
    return [[float(v) for v in r] for r in seg]


def _instances_json(path: Path, data: Any, files: dict[int, Path],
                    sizes: dict[int, tuple[int, int]], kind: str) -> DetectionData:
    ids, names = _categories(data, path)
    index = {cid: k for k, cid in enumerate(ids)}
    per_image: dict[int, list[tuple[list[float], int, list | None, bool]]] = {i: [] for i in files}
    anns = json_field(data, "annotations", list, str(path))
    for where, a, image_id, k in coco_annotations(anns, path, files, index):
        bbox = json_field(a, "bbox", list, where)
        if len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
            raise DataFormatError(f"{where}: 'bbox' = {bbox!r}, expected [x, y, width, height]")
        x, y, w, h = (float(v) for v in bbox)
        crowd = bool(a.get("iscrowd", 0))
        per_image[image_id].append(([x, y, x + w, y + h], k, _polygons(a, where), crowd))
    records = []
    for image_id in sorted(files):
        objs = per_image[image_id]
        width, height = sizes[image_id]
        records.append(Instances(
            image_id=image_id, path=files[image_id], width=width, height=height,
            boxes=np.asarray([o[0] for o in objs], dtype=np.float32).reshape(-1, 4),
            labels=np.asarray([o[1] for o in objs], dtype=np.int64),
            polygons=[o[2] for o in objs],
            crowd=np.asarray([o[3] for o in objs], dtype=bool)))
    check_files((r.path for r in records), path)
    return DetectionData(kind, records, names, ids, annotation_file=path)


def _image_sizes(images: list, path: Path) -> dict[int, tuple[int, int]]:
    sizes = {}
    for i, im in enumerate(images):
        where = f"{path}: images[{i}]"
        image_id = json_field(im, "id", int, where)
        if image_id in sizes:
            raise DataFormatError(f"{where}: duplicate image id {image_id}")
        sizes[image_id] = (json_field(im, "width", int, where), json_field(im, "height", int, where))
    return sizes


def read_coco_instances(root: str | Path, split: str = "train2017") -> DetectionData:
    """COCO instances: ``root/annotations/instances_{split}.json``, images in ``root/{split}/``."""
    root = Path(root)
    path = root / "annotations" / f"instances_{split}.json"
    data = load_json(path, _COCO_LAYOUT)
    images = json_field(data, "images", list, str(path))
    sizes = _image_sizes(images, path)
    files = {im["id"]: root / split / json_field(im, "file_name", str, f"{path}: images[{i}]")
             for i, im in enumerate(images)}
    return _instances_json(path, data, files, sizes, "coco")


def read_lvis_instances(root: str | Path, image_root: str | Path,
                        split: str = "train") -> DetectionData:
    """LVIS v1: ``root/lvis_v1_{split}.json``; each image is ``image_root/<folder>/<file>``,
    folder and file taken from its ``coco_url`` (LVIS v1 reuses the COCO 2017 images)."""
    root, image_root = Path(root), Path(image_root)
    path = root / f"lvis_v1_{split}.json"
    data = load_json(path, _LVIS_LAYOUT)
    images = json_field(data, "images", list, str(path))
    sizes = _image_sizes(images, path)
    files = {}
    for i, im in enumerate(images):
        url = json_field(im, "coco_url", str, f"{path}: images[{i}]")
        parts = url.rstrip("/").split("/")
        if len(parts) < 2:
            raise DataFormatError(f"{path}: images[{i}]: coco_url {url!r} has no <folder>/<file>")
        files[im["id"]] = image_root / parts[-2] / parts[-1]
    return _instances_json(path, data, files, sizes, "lvis")


# ----------------------------------------------------------------------------- VOC
def voc_classes(root: str | Path, split: str) -> list[str]:
    """Class names of a VOC directory: its ``ImageSets/Main/<class>_<split>.txt`` files, sorted
    (on real VOC: the 20 classes in the standard order)."""
    main = Path(root) / "ImageSets" / "Main"
    suffix = f"_{split}.txt"
    classes = sorted(p.name[: -len(suffix)] for p in main.glob(f"*{suffix}"))
    if not classes:
        raise DataFormatError(f"no class files {main}/<class>{suffix}; expected a PASCAL VOC "
                              "directory (e.g. VOCdevkit/VOC2007)")
    return classes


def _xml_int(node: ET.Element, tag: str, where: str) -> int:
    child = node.find(tag)
    try:
        return int(float(child.text))  # type: ignore[union-attr, arg-type]
    except (AttributeError, TypeError, ValueError):
        raise DataFormatError(f"{where}: <{tag}> missing or not a number") from None


def read_voc_instances(root: str | Path, split: str, classes: Sequence[str]) -> DetectionData:
    """PASCAL VOC boxes of ``root/ImageSets/Main/{split}.txt`` from ``root/Annotations/*.xml``.

    Difficult objects are kept (flagged): training uses them, the VOC metric ignores them.
    """
    root = Path(root)
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        raise DataFormatError(f"VOC split file not found: {split_file}; expected "
                              "<root>/ImageSets/Main/<split>.txt and <root>/Annotations/<id>.xml")
    index = {c: k for k, c in enumerate(classes)}
    records = []
    for n, line in enumerate(split_file.read_text().splitlines(), 1):
        name = line.strip()
        if not name:
            continue
        xml = root / "Annotations" / f"{name}.xml"
        if not xml.is_file():
            raise DataFormatError(f"annotation of image {name!r} ({split_file}:{n}) not found: {xml}")
        try:
            tree = ET.parse(xml).getroot()
        except ET.ParseError as e:
            raise DataFormatError(f"{xml}: not valid XML ({e})") from None
        size = tree.find("size")
        if size is None:
            raise DataFormatError(f"{xml}: no <size>")
        width, height = _xml_int(size, "width", str(xml)), _xml_int(size, "height", str(xml))
        boxes, labels, difficult = [], [], []
        for k, obj in enumerate(tree.findall("object")):
            where = f"{xml}: object {k}"
            cls = (obj.findtext("name") or "").strip()
            if cls not in index:
                raise DataFormatError(f"{where}: class {cls!r} is not one of the {len(index)} "
                                      f"classes ({', '.join(list(index)[:5])}, ...)")
            bb = obj.find("bndbox")
            if bb is None:
                raise DataFormatError(f"{where}: no <bndbox>")
            x0, y0, x1, y1 = (_xml_int(bb, t, where) for t in ("xmin", "ymin", "xmax", "ymax"))
            boxes.append([x0 - 1.0, y0 - 1.0, float(x1), float(y1)])
            labels.append(index[cls])
            difficult.append(obj.findtext("difficult", "0").strip() == "1")
        records.append(Instances(
            image_id=len(records), path=root / "JPEGImages" / f"{name}.jpg", width=width,
            height=height, boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            labels=np.asarray(labels, dtype=np.int64), crowd=np.zeros(len(boxes), dtype=bool),
            difficult=np.asarray(difficult, dtype=bool), name=name))
    if not records:
        raise DataFormatError(f"{split_file} lists no images")
    check_files((r.path for r in records), split_file)
    return DetectionData("voc", records, list(classes), voc_root=root, voc_split=split)


def concat(parts: Sequence[DetectionData]) -> DetectionData:
    """Several splits as one training set (e.g. VOC2007 + VOC2012 trainval)."""
    first = parts[0]
    for p in parts[1:]:
        if p.classes != first.classes:
            raise DataFormatError(f"training sets disagree on the classes: {p.classes[:3]}... vs "
                                  f"{first.classes[:3]}...")
    records = []
    for p in parts:
        for r in p.records:
            records.append(Instances(**{**r.__dict__, "image_id": len(records)}))
    return DetectionData(first.kind, records, first.classes, first.category_ids,
                         first.annotation_file, first.voc_root, first.voc_split)


# ----------------------------------------------------------------------------- training
def trainable(record: Instances, with_masks: bool = False) -> Instances | None:
    """The record without crowd regions, degenerate boxes (and, ``with_masks``, objects
    without a polygon); ``None`` if nothing is left (such images are not trained on, as
    detectron2 filters empty annotations)."""
    box = record.boxes
    keep = (box[:, 2] > box[:, 0]) & (box[:, 3] > box[:, 1])
    if record.crowd is not None:
        keep &= ~record.crowd
    if with_masks:
        keep &= np.asarray([p is not None for p in record.polygons or [None] * len(box)], bool)
    if not keep.any():
        return None
    polygons = None if record.polygons is None else [p for p, k in zip(record.polygons, keep) if k]
    difficult = None if record.difficult is None else record.difficult[keep]
    return Instances(record.image_id, record.path, record.width, record.height, box[keep],
                     record.labels[keep], polygons, record.crowd[keep] if record.crowd is not None
                     else None, difficult, record.name)


def polygon_masks(polygons: Sequence[list[list[float]] | None], height: int, width: int) -> np.ndarray:
    """(N, H, W) uint8 masks of polygon objects (pycocotools rasterisation)."""
    from pycocotools import mask as mask_utils

    out = np.zeros((len(polygons), height, width), dtype=np.uint8)
    for k, rings in enumerate(polygons):
        if not rings:
            continue
        rles = mask_utils.frPyObjects(rings, height, width)
        out[k] = mask_utils.decode(mask_utils.merge(rles))
    return out


def load_rgb(path: Path) -> torch.Tensor:
    """An image file as a (3, H, W) float RGB tensor in [0, 1], as torchvision's detectors take."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    with Image.open(path) as im:
        return pil_to_tensor(im.convert("RGB")).float().div_(255)


class DetectionDataset(Dataset):
    """Training images ``(3, H, W)`` in [0, 1] (RGB) with torchvision detection targets
    (``boxes``, ``labels`` 1..K, ``masks`` when ``with_masks``); random horizontal flip."""

    def __init__(self, data: DetectionData, with_masks: bool, flip: bool = True,
                 repeat_threshold: float | None = None):
        self.records = [r for r in (trainable(x, with_masks) for x in data.records) if r is not None]
        if not self.records:
            raise DataFormatError(f"no training image with a usable annotation in {data.kind} data")
        self.with_masks, self.flip = with_masks, flip
        self.repeat_factors = (repeat_factors([r.labels for r in self.records], repeat_threshold)
                               if repeat_threshold else None)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        r = self.records[i]
        image = load_rgb(r.path)
        h, w = image.shape[1:]
        boxes = torch.from_numpy(r.boxes.copy())
        target = {"boxes": boxes, "labels": torch.from_numpy(r.labels) + 1}
        if self.with_masks:
            target["masks"] = torch.from_numpy(polygon_masks(r.polygons or [], h, w))
        if self.flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
            target["boxes"] = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0],
                                           boxes[:, 3]], dim=1)
            if self.with_masks:
                target["masks"] = target["masks"].flip(-1)
        return image, target

    @staticmethod
    def collate_fn(batch: list) -> dict[str, list]:
        return {"images": [b[0] for b in batch], "targets": [b[1] for b in batch]}


def repeat_factors(labels: Sequence[np.ndarray], threshold: float) -> np.ndarray:
    """LVIS repeat-factor sampling (Gupta et al. 2019): with ``f(c)`` the fraction of images
    containing class ``c``, ``r(c) = max(1, sqrt(t / f(c)))`` and an image repeats
    ``max_c r(c)`` times over its classes."""
    n = len(labels)
    counts: dict[int, int] = {}
    for lab in labels:
        for c in set(lab.tolist()):
            counts[c] = counts.get(c, 0) + 1
    per_class = {c: max(1.0, math.sqrt(threshold / (k / n))) for c, k in counts.items()}
    return np.asarray([max((per_class[c] for c in set(lab.tolist())), default=1.0)
                       for lab in labels], dtype=np.float64)
