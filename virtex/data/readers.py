"""Readers for the real on-disk formats of COCO, PASCAL VOC, ImageNet folders and iNat.

Each reader returns plain records (paths, ids, numpy arrays) and checks what it reads:
every problem with the input raises one :class:`DataFormatError` that names the file,
the key or line, the offending value and what was expected.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Container, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from virtex.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")

_COCO_LAYOUT = ("<root>/annotations/{kind}_<split>.json and images in <root>/<split>/ "
                "(e.g. coco/annotations/{kind}_train2017.json, coco/train2017/*.jpg)")
_VOC_LAYOUT = ("<root>/JPEGImages/<id>.jpg and <root>/ImageSets/Main/{<split>,<class>_<split>}.txt"
               " (e.g. VOC2007/ImageSets/Main/aeroplane_trainval.txt)")


class DataFormatError(UserError, ValueError):
    """A dataset file is missing or does not have the expected format."""


@dataclass(frozen=True)
class CaptionRecord:
    """One COCO image with all of its captions."""

    image_id: int
    path: Path
    captions: list[str]


# ------------------------------------------------- helpers (public: plugins read COCO-style files)
def load_json(path: Path, layout: str) -> Any:
    """The JSON in ``path``; a missing file names ``layout`` (the expected files),
    invalid JSON names the file."""
    if not path.is_file():
        raise DataFormatError(f"annotations file not found: {path}; expected layout: {layout}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataFormatError(f"{path}: not valid JSON ({e})") from None


def json_field(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``obj[key]``, checked to be a dict entry of type ``kind``; ``where`` names the spot."""
    if not isinstance(obj, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise DataFormatError(f"{where}: missing key {key!r}")
    value = obj[key]
    # bool is an int subclass; an id of `true` is still a format error.
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DataFormatError(f"{where}: key {key!r} = {value!r}, expected {names}")
    return value


def _list_field(obj: Any, key: str, path: Path) -> list:
    return json_field(obj, key, list, str(path))


def _image_table(images: list, path: Path) -> dict[int, str]:
    """``{image id: file_name}`` from a COCO-style ``images`` list."""
    table: dict[int, str] = {}
    for i, im in enumerate(images):
        where = f"{path}: images[{i}]"
        image_id = json_field(im, "id", int, where)
        if image_id in table:
            raise DataFormatError(f"{where}: duplicate image id {image_id}")
        table[image_id] = json_field(im, "file_name", str, where)
    return table


def check_files(paths: Iterable[Path], listed_in: Path) -> None:
    """Raise naming the first path that is not on disk (and ``listed_in``, the file that
    lists it); each folder is listed once."""
    listings: dict[Path, set[str]] = {}
    for p in paths:
        folder = p.parent
        if folder not in listings:
            try:
                listings[folder] = set(os.listdir(folder))
            except OSError:
                raise DataFormatError(
                    f"image folder not found: {folder} (needed for {p.name}, listed in {listed_in})"
                ) from None
        if p.name not in listings[folder]:
            raise DataFormatError(f"image listed in {listed_in} is missing on disk: {p}")


def _contiguous(category_ids: Iterable[int]) -> dict[int, int]:
    """Map category ids to 0..K-1 in sorted id order."""
    return {cid: k for k, cid in enumerate(sorted(category_ids))}


def coco_categories(cats: list, path: Path) -> tuple[dict[int, int], list[str]]:
    """A COCO-style ``categories`` list of ``path`` -> (``{category id: class index
    0..K-1}`` in sorted id order, the class names in that order); ids checked unique."""
    names: dict[int, str] = {}
    for i, c in enumerate(cats):
        where = f"{path}: categories[{i}]"
        cid = json_field(c, "id", int, where)
        if cid in names:
            raise DataFormatError(f"{where}: duplicate category id {cid}")
        names[cid] = json_field(c, "name", str, where)
    if not names:
        raise DataFormatError(f"{path}: 'categories' is empty")
    index = _contiguous(names)
    return index, [names[cid] for cid in sorted(names)]


def coco_annotations(anns: list, path: Path, images: Container[int], index: dict[int, int],
                     categories: str = "'categories'") -> Iterator[tuple[str, dict, int, int]]:
    """``(where, annotation, image_id, class index)`` for each COCO-style annotation of
    ``path``, its ``image_id`` checked against ``images`` and its ``category_id`` against
    ``index`` (from :func:`coco_categories`; ``categories`` names where they came from)."""
    for i, a in enumerate(anns):
        where = f"{path}: annotations[{i}]"
        image_id = json_field(a, "image_id", int, where)
        cid = json_field(a, "category_id", int, where)
        if image_id not in images:
            raise DataFormatError(f"{where}: image_id {image_id} is not in 'images'")
        if cid not in index:
            raise DataFormatError(f"{where}: category_id {cid} is not in {categories}")
        yield where, a, image_id, index[cid]


# ----------------------------------------------------------------------------- COCO
def read_caption_strings(path: str | Path) -> list[str]:
    """All caption strings of a COCO captions JSON (``annotations[*].caption``), in file order."""
    path = Path(path)
    data = load_json(path, _COCO_LAYOUT.format(kind="captions"))
    anns = _list_field(data, "annotations", path)
    return [json_field(a, "caption", str, f"{path}: annotations[{i}]") for i, a in enumerate(anns)]


def read_coco_captions(root: str | Path, split: str = "train2017") -> list[CaptionRecord]:
    """COCO captions: one record per image (sorted by id) with all its captions.

    Reads ``root/annotations/captions_{split}.json``; images are ``root/{split}/{file_name}``.
    Images without any caption are left out (none in real COCO 2017). Blank captions
    (nothing but white space) are dropped with one warning that counts them and the
    images they leave without a caption, which are left out too: trained on, such an
    image would only teach ``[SOS] [EOS]``.
    """
    root = Path(root)
    path = root / "annotations" / f"captions_{split}.json"
    data = load_json(path, _COCO_LAYOUT.format(kind="captions"))
    files = _image_table(_list_field(data, "images", path), path)
    captions: dict[int, list[str]] = {}
    for i, a in enumerate(_list_field(data, "annotations", path)):
        where = f"{path}: annotations[{i}]"
        image_id = json_field(a, "image_id", int, where)
        if image_id not in files:
            raise DataFormatError(f"{where}: image_id {image_id} is not in 'images'")
        captions.setdefault(image_id, []).append(json_field(a, "caption", str, where))
    blank = sum(not c.strip() for cs in captions.values() for c in cs)
    if blank:
        kept = {i: [c for c in cs if c.strip()] for i, cs in captions.items()}
        emptied = sorted(i for i, cs in kept.items() if not cs)
        captions = {i: cs for i, cs in kept.items() if cs}
        first = f" (the first: image_id {emptied[0]}, {files[emptied[0]]})" if emptied else ""
        print(f"virtex: warning: {path}: {blank} blank caption(s) dropped; {len(emptied)} "
              f"image(s) left without a caption are not used{first}", file=sys.stderr)
    records = [CaptionRecord(i, root / split / files[i], captions[i])
               for i in sorted(captions)]
    check_files((r.path for r in records), path)
    return records


def read_coco_instance_labels(root: str | Path, split: str = "train2017"
                              ) -> tuple[dict[int, list[int]], list[str]]:
    """The original VirTex multilabel targets from ``root/annotations/instances_{split}.json``.

    Category ids are renumbered 1..K in the order of the file's ``categories`` list
    (0 is background); returns ``({image_id: sorted distinct class ids}, category names
    in that order)`` for the images with at least one instance only.
    """
    root = Path(root)
    path = root / "annotations" / f"instances_{split}.json"
    data = load_json(path, _COCO_LAYOUT.format(kind="instances"))
    cats = _list_field(data, "categories", path)
    coco_categories(cats, path)  # checks ids and names
    index = {c["id"]: k for k, c in enumerate(cats, start=1)}
    names = [c["name"] for c in cats]
    images = _image_table(_list_field(data, "images", path), path)
    found: dict[int, set[int]] = {}
    anns = _list_field(data, "annotations", path)
    for _, _, image_id, k in coco_annotations(anns, path, images, index):
        found.setdefault(image_id, set()).add(k)
    return {i: sorted(found[i]) for i in sorted(found)}, names


# ----------------------------------------------------------------------------- VOC
def _read_lines(path: Path, what: str) -> list[tuple[int, str]]:
    if not path.is_file():
        raise DataFormatError(f"{what} not found: {path}; expected layout: {_VOC_LAYOUT}")
    text = path.read_text(encoding="utf-8", errors="replace")
    return [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def read_voc_classification(root: str | Path, split: str = "trainval"
                            ) -> tuple[list[Path], np.ndarray, list[str]]:
    """PASCAL VOC classification labels for ``split`` of a ``VOC20XX`` directory.

    Classes are the ``ImageSets/Main/<class>_<split>.txt`` files, sorted (on real VOC:
    the 20 standard classes in the standard order); image ids come from
    ``ImageSets/Main/<split>.txt``. Returns ``(paths, labels, classes)`` with ``labels``
    an int8 array (N, K) of the VOC flags: 1 present, -1 absent, 0 difficult only.
    """
    root = Path(root)
    main = root / "ImageSets" / "Main"
    if not main.is_dir():
        raise DataFormatError(f"VOC folder not found: {main}; expected layout: {_VOC_LAYOUT}")
    ids = []
    for n, line in _read_lines(main / f"{split}.txt", "VOC split file"):
        if len(line.split()) != 1:
            raise DataFormatError(f"{main / f'{split}.txt'}:{n}: malformed line {line!r}; "
                                  "expected one image id per line")
        ids.append(line.strip())
    row = {image_id: n for n, image_id in enumerate(ids)}
    if len(row) != len(ids):
        raise DataFormatError(f"{main / f'{split}.txt'}: duplicate image ids")
    suffix = f"_{split}.txt"
    classes = sorted(p.name[: -len(suffix)] for p in main.glob(f"*{suffix}"))
    if not classes:
        raise DataFormatError(f"no class files {main}/<class>{suffix}; expected layout: "
                              f"{_VOC_LAYOUT}")
    labels = np.zeros((len(ids), len(classes)), dtype=np.int8)
    for k, cls in enumerate(classes):
        path = main / f"{cls}{suffix}"
        seen = np.zeros(len(ids), dtype=bool)
        for n, line in _read_lines(path, "VOC class file"):
            parts = line.split()
            if len(parts) != 2 or parts[1] not in ("1", "-1", "0"):
                raise DataFormatError(f"{path}:{n}: malformed line {line!r}; expected "
                                      "'<image id> <flag>' with flag 1, -1 or 0")
            if parts[0] not in row:
                raise DataFormatError(f"{path}:{n}: image id {parts[0]!r} is not in {split}.txt")
            if seen[row[parts[0]]]:
                raise DataFormatError(f"{path}:{n}: image id {parts[0]!r} is listed twice")
            seen[row[parts[0]]] = True
            labels[row[parts[0]], k] = int(parts[1])
        if not seen.all():
            absent = ids[int(np.flatnonzero(~seen)[0])]
            raise DataFormatError(f"{path}: image id {absent!r} of {split}.txt has no line")
    paths = [root / "JPEGImages" / f"{i}.jpg" for i in ids]
    check_files(paths, main / f"{split}.txt")
    return paths, labels, classes


# ----------------------------------------------------------------------------- folders, iNat
def read_image_folder(root: str | Path, split: str = "train", classes: Sequence[str] | None = None
                      ) -> tuple[list[Path], np.ndarray, list[str]]:
    """ImageNet-style ``root/{split}/{class}/*.{jpg,jpeg,png,webp}`` (any case).

    Classes are the sorted sub-folders, or ``classes`` when given (e.g. the training
    classes, so a split with fewer folders keeps the same targets). Returns
    ``(paths, int64 targets, classes)``, sorted by class then file name.
    """
    folder = Path(root) / split
    if not folder.is_dir():
        raise DataFormatError(f"image folder not found: {folder}; expected layout: "
                              "<root>/<split>/<class>/<image>.jpg (e.g. imagenet/train/n01440764/)")
    found = sorted(d.name for d in folder.iterdir() if d.is_dir())
    classes = list(classes) if classes is not None else found
    extra = sorted(set(found) - set(classes))
    if extra:
        raise DataFormatError(f"{folder}: class folder {extra[0]!r} is not one of the "
                              f"{len(classes)} given classes")
    paths: list[Path] = []
    targets: list[int] = []
    for k, cls in enumerate(classes):
        if not (folder / cls).is_dir():
            continue
        names = sorted(f.name for f in os.scandir(folder / cls)
                       if f.name.lower().endswith(IMAGE_EXTENSIONS) and f.is_file())
        paths += [folder / cls / n for n in names]
        targets += [k] * len(names)
    if not paths:
        raise DataFormatError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}/<class>/")
    return paths, np.asarray(targets, dtype=np.int64), classes


def read_inat(root: str | Path, split: str = "train2018"
              ) -> tuple[list[Path], np.ndarray, list[str]]:
    """iNaturalist 2018 (``root/{split}.json``, ``file_name`` relative to ``root``).

    Category ids map to 0..K-1 in sorted id order; categories come from the split JSON,
    or ``root/categories.json`` when the split JSON has none. Returns
    ``(paths, int64 targets, category names)`` sorted by image id.
    """
    root = Path(root)
    path = root / f"{split}.json"
    layout = "<root>/{train2018,val2018}.json with file_name relative to <root>"
    data = load_json(path, layout)
    cats = data.get("categories") if isinstance(data, dict) else None
    if not cats:
        cats_path = root / "categories.json"
        cats = load_json(cats_path, layout + " and <root>/categories.json")
        if not isinstance(cats, list):
            raise DataFormatError(f"{cats_path}: expected a JSON list of categories")
        path_for_cats = cats_path
    else:
        path_for_cats = path
    index, names = coco_categories(cats, path_for_cats)
    files = _image_table(_list_field(data, "images", path), path)
    target: dict[int, int] = {}
    anns = _list_field(data, "annotations", path)
    for where, _, image_id, k in coco_annotations(anns, path, files, index, "the categories"):
        if image_id in target:
            raise DataFormatError(f"{where}: image {image_id} has a second annotation")
        target[image_id] = k
    unlabelled = sorted(set(files) - set(target))
    if unlabelled:
        raise DataFormatError(f"{path}: image {unlabelled[0]} ({files[unlabelled[0]]}) has no "
                              "annotation (the test split is unlabelled and cannot be read here)")
    ids = sorted(files)
    paths = [root / files[i] for i in ids]
    check_files(paths, path)
    return paths, np.asarray([target[i] for i in ids], dtype=np.int64), names
