"""Synthetic "captioned shapes" data, written in the real formats of real datasets.

Every scene is a pale background with one to three coloured shapes and five captions
that describe colour, size, shape and left/right relations (true of the drawn
geometry, judged by bounding-box centres). The same scenes are written as COCO 2017
(captions + instances), PASCAL VOC 2007, ImageNet-style folders, iNaturalist 2018,
LVIS v1 and caption shards (the webdataset layout img2dataset writes: ``shards/train-NNNNN.tar``
with ``KEY.jpg``, ``KEY.txt``, ``KEY.json``, and ``sizes.json``), so the ordinary readers
of those datasets read them with no special case.

    python -m virtex.tools.make_shapes --out data/shapes --images 1000 --seed 0
    python -m virtex.tools.make_shapes --out data/shapes --format shards   # only the shards
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = ["red", "green", "blue", "yellow", "purple"]
SHAPES = ["circle", "square", "triangle", "star"]
CLASSES: list[str] = [f"{c}_{s}" for c in COLOURS for s in SHAPES]
VERSION = 2
FORMATS = ("coco", "voc", "imagenet", "inat", "lvis", "shards")

_RGB = {
    "red": (220, 30, 30), "green": (30, 165, 50), "blue": (30, 70, 220),
    "yellow": (240, 205, 20), "purple": (140, 40, 180),
}
_TINTS = [(245, 245, 240), (235, 242, 250), (250, 244, 232), (238, 248, 238), (246, 238, 246)]
# Mild long tail over classes (fixed, seed independent), so LVIS-style frequencies mean something.
_CLASS_WEIGHTS = [0.93 ** ((7 * k) % len(CLASSES)) for k in range(len(CLASSES))]
_SIZE_WORDS = {"small": ["small", "little"], "large": ["large", "big"]}
_DATE = "2017/09/01"
_CAPTURED = "2017-09-01 00:00:00"
_LICENSES = [{"id": 1, "name": "Attribution License",
              "url": "http://creativecommons.org/licenses/by/2.0/"}]
_INFO = {"description": "virtex captioned shapes (synthetic)", "url": "", "version": "1.0",
         "year": 2017, "contributor": "virtex", "date_created": _DATE}


@dataclass
class _Obj:
    cls: int
    size: str
    poly: list[tuple[float, float]]
    difficult: bool
    r: float  # drawn half-extent
    bbox: list[float] = field(default_factory=list)  # x, y, w, h
    area: float = 0.0

    @property
    def colour(self) -> str:
        return COLOURS[self.cls // len(SHAPES)]

    @property
    def shape(self) -> str:
        return SHAPES[self.cls % len(SHAPES)]

    @property
    def cx(self) -> float:
        return self.bbox[0] + self.bbox[2] / 2

    @property
    def cy(self) -> float:
        return self.bbox[1] + self.bbox[3] / 2


@dataclass
class _Scene:
    image_id: int
    split: str  # "train" or "val"
    width: int
    height: int
    objects: list[_Obj]
    captions: list[str]
    jpeg: bytes

    @property
    def main_cls(self) -> int:
        """Class of the largest object by drawn scale (the image-level label)."""
        return max(self.objects, key=lambda o: o.r).cls


# ----------------------------------------------------------------------------- geometry
def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    """Vertices of a shape of half-extent ``r`` (every vertex lies within ``r`` of the centre)."""
    if shape == "circle":
        pts = [(r, 2 * math.pi * k / 20) for k in range(20)]
    elif shape == "square":  # half side 0.8 r, |rot| <= 12 deg keeps it inside the r-box
        pts = [(0.8 * r * math.sqrt(2), math.pi / 4 + rot + math.pi / 2 * k) for k in range(4)]
    elif shape == "triangle":
        pts = [(r, -math.pi / 2 + rot + 2 * math.pi / 3 * k) for k in range(3)]
    else:  # five-pointed star
        pts = [(r if k % 2 == 0 else 0.45 * r, -math.pi / 2 + rot + math.pi / 5 * k)
               for k in range(10)]
    return [(round(cx + d * math.cos(a), 2), round(cy + d * math.sin(a), 2)) for d, a in pts]


def _finish(o: _Obj, w: int, h: int) -> _Obj:
    xs, ys = [p[0] for p in o.poly], [p[1] for p in o.poly]
    x0, y0 = max(0.0, min(xs)), max(0.0, min(ys))
    x1, y1 = min(float(w), max(xs)), min(float(h), max(ys))
    o.bbox = [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]
    n = len(o.poly)
    o.area = round(abs(sum(o.poly[i][0] * o.poly[(i + 1) % n][1]
                           - o.poly[(i + 1) % n][0] * o.poly[i][1] for i in range(n))) / 2, 2)
    return o


def _fits(o: _Obj, placed: list[_Obj]) -> bool:
    """No bounding-box overlap, and a clear horizontal offset so left/right is unambiguous."""
    x, y, w, h = o.bbox
    for p in placed:
        px, py, pw, ph = p.bbox
        apart = x + w + 1 <= px or px + pw + 1 <= x or y + h + 1 <= py or py + ph + 1 <= y
        if not apart or abs(o.cx - p.cx) < 0.25 * (w + pw):
            return False
    return True


# ----------------------------------------------------------------------------- captions
def _desc(o: _Obj, rng: random.Random, full: bool = False) -> str:
    if full:
        return f"a {o.size} {o.colour} {o.shape}"
    if rng.random() < 0.65:
        return f"a {rng.choice(_SIZE_WORDS[o.size])} {o.colour} {o.shape}"
    return f"a {o.colour} {o.shape}"


_POS = {
    "left": ["on the left side of the picture", "on the left", "on the left of the image",
             "at the left side"],
    "middle": ["in the middle of the picture", "in the middle", "in the centre of the image",
               "at the center"],
    "right": ["on the right side of the picture", "on the right", "on the right of the image",
              "at the right side"],
}
_ONE = ["{a} {p}", "there is {a} {p}", "a picture of {a} {p}", "one shape: {a} {p}",
        "{a} drawn {p}", "an image showing {a} {p}", "{p}, {a} on a plain background"]
_REL2 = ["{a} left of {b}", "{a} to the left of {b}", "{a} on the left of {b}",
         "{b} right of {a}", "{b} to the right of {a}", "{b} on the right of {a}"]
_TWO = ["there is {a} on the left and {b} on the right",
        "two shapes: {a} on the left and {b} on the right",
        "on the left {a}, on the right {b}", "{a} with {b} to its right",
        "{b} with {a} to its left"]
_THREE = ["{a}, {b} and {c} from left to right", "from left to right: {a}, {b} and {c}",
          "from right to left: {c}, {b} and {a}",
          "{a} on the left, {b} in the middle and {c} on the right",
          "{b} between {a} on the left and {c} on the right",
          "three shapes: {a} on the left, {c} on the right and {b} in between",
          "{c} to the right of {b}, which is to the right of {a}",
          "{a} left of {b}, and {c} on the right"]


def _captions(objs: list[_Obj], w: int, h: int, rng: random.Random) -> list[str]:
    """Five distinct-template captions; every caption names every object's colour and shape."""
    objs = sorted(objs, key=lambda o: o.cx)  # left to right

    def fill(t: str, full: bool = False) -> str:
        d = dict(zip("abc", (_desc(o, rng, full) for o in objs), strict=False))
        if len(objs) == 1:
            cx = objs[0].cx
            where = "left" if cx < 0.42 * w else "right" if cx > 0.58 * w else "middle"
            d["p"] = rng.choice(_POS[where])
        return t.format(**d)

    if len(objs) == 1:
        return [fill(t) for t in rng.sample(_ONE, 5)]
    if len(objs) == 3:
        return [fill(t) for t in rng.sample(_THREE, 5)]
    first = rng.choice(_REL2)  # the first caption always has the "X left/right of Y" form
    rest = [t for t in _REL2 if t != first] + _TWO
    a, b = objs
    if abs(a.cy - b.cy) > 0.25 * h:
        side = "left" if a.cy < b.cy else "right"  # the upper object's side
        rest.append("{a} above and to the left of {b}" if side == "left"
                    else "{b} above and to the right of {a}")
    return [fill(first, full=True)] + [fill(t) for t in rng.sample(rest, 4)]


# ----------------------------------------------------------------------------- scenes
def _scene(seed: int, index: int, min_size: int, max_size: int) -> _Scene:
    rng = random.Random(f"shapes-{seed}-{index}")
    w, h = rng.randint(min_size, max_size), rng.randint(min_size, max_size)
    s = min(w, h)
    placed: list[_Obj] = []
    for _ in range(rng.choices([1, 2, 3], weights=[0.3, 0.45, 0.25])[0]):
        taken = {o.cls for o in placed}
        free = [k for k in range(len(CLASSES)) if k not in taken]
        cls = rng.choices(free, weights=[_CLASS_WEIGHTS[k] for k in free])[0]
        size = rng.choice(["small", "large"])
        for _try in range(40):
            r = s * (rng.uniform(0.08, 0.12) if size == "small" else rng.uniform(0.17, 0.24))
            cx, cy = rng.uniform(r + 1, w - 1 - r), rng.uniform(r + 1, h - 1 - r)
            rot = math.radians(rng.uniform(-12, 12))
            poly = _polygon(SHAPES[cls % len(SHAPES)], cx, cy, r, rot)
            o = _finish(_Obj(cls, size, poly, size == "small" and rng.random() < 0.1, r), w, h)
            if _fits(o, placed):
                placed.append(o)
                break
    # Pixels: pale tint + light noise, then flat vivid shapes.
    nrng = np.random.default_rng([seed, index])
    tint = np.array(rng.choice(_TINTS), dtype=np.int16) + nrng.integers(-5, 6, size=3)
    amp = int(nrng.integers(0, 7))
    noise = nrng.integers(-amp, amp + 1, size=(h, w, 3), dtype=np.int16)
    img = Image.fromarray(np.clip(tint + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for o in placed:
        fill = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in _RGB[o.colour])
        if o.shape == "circle":
            xs, ys = [p[0] for p in o.poly], [p[1] for p in o.poly]
            draw.ellipse([min(xs), min(ys), max(xs), max(ys)], fill=fill)
        else:
            draw.polygon(o.poly, fill=fill)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    split = "val" if index % 5 == 4 else "train"
    return _Scene(index + 1, split, w, h, placed, _captions(placed, w, h, rng), buf.getvalue())


# ----------------------------------------------------------------------------- writers
def _dump(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _coco_image(sc: _Scene) -> dict:
    name = f"{sc.image_id:012d}.jpg"
    return {"id": sc.image_id, "file_name": name, "width": sc.width, "height": sc.height,
            "license": 1, "coco_url": f"http://images.cocodataset.org/{sc.split}2017/{name}",
            "flickr_url": f"http://farm1.staticflickr.com/shapes/{name}",
            "date_captured": _CAPTURED}


def _instance(ann_id: int, sc: _Scene, o: _Obj) -> dict:
    seg = [v for p in o.poly for v in p]
    return {"id": ann_id, "image_id": sc.image_id, "category_id": o.cls + 1, "bbox": o.bbox,
            "area": o.area, "iscrowd": 0, "segmentation": [seg]}


def _write_coco(out: Path, scenes: list[_Scene]) -> None:
    cats = [{"id": k + 1, "name": c.replace("_", " "), "supercategory": SHAPES[k % len(SHAPES)]}
            for k, c in enumerate(CLASSES)]
    cap_id = ann_id = 0
    for split in ("train", "val"):
        images, caps, insts = [], [], []
        for sc in (s for s in scenes if s.split == split):
            images.append(_coco_image(sc))
            _write(out / "coco" / f"{split}2017" / images[-1]["file_name"], sc.jpeg)
            for c in sc.captions:
                cap_id += 1
                caps.append({"id": cap_id, "image_id": sc.image_id, "caption": c})
            for o in sc.objects:
                ann_id += 1
                insts.append(_instance(ann_id, sc, o))
        head = {"info": _INFO, "licenses": _LICENSES, "images": images}
        _dump(out / "coco/annotations" / f"captions_{split}2017.json", {**head, "annotations": caps})
        _dump(out / "coco/annotations" / f"instances_{split}2017.json",
              {**head, "annotations": insts, "categories": cats})


def _voc_xml(sc: _Scene) -> str:
    objs = []
    for o in sc.objects:
        x, y, bw, bh = o.bbox
        box = (max(1, math.floor(x) + 1), max(1, math.floor(y) + 1),
               min(sc.width, math.ceil(x + bw)), min(sc.height, math.ceil(y + bh)))
        objs.append(
            "\t<object>\n"
            f"\t\t<name>{CLASSES[o.cls]}</name>\n\t\t<pose>Unspecified</pose>\n"
            f"\t\t<truncated>0</truncated>\n\t\t<difficult>{int(o.difficult)}</difficult>\n"
            "\t\t<bndbox>\n"
            + "".join(f"\t\t\t<{t}>{v}</{t}>\n" for t, v in zip(
                ("xmin", "ymin", "xmax", "ymax"), box, strict=True))
            + "\t\t</bndbox>\n\t</object>\n")
    return ("<annotation>\n\t<folder>VOC2007</folder>\n"
            f"\t<filename>{sc.image_id:06d}.jpg</filename>\n"
            "\t<source>\n\t\t<database>The VOC2007 Database</database>\n"
            "\t\t<annotation>PASCAL VOC2007</annotation>\n\t\t<image>virtex shapes</image>\n"
            "\t</source>\n"
            f"\t<size>\n\t\t<width>{sc.width}</width>\n\t\t<height>{sc.height}</height>\n"
            "\t\t<depth>3</depth>\n\t</size>\n\t<segmented>0</segmented>\n"
            + "".join(objs) + "</annotation>\n")


def _write_voc(out: Path, scenes: list[_Scene]) -> None:
    root = out / "VOC2007"
    for sc in scenes:
        _write(root / "JPEGImages" / f"{sc.image_id:06d}.jpg", sc.jpeg)
        _write(root / "Annotations" / f"{sc.image_id:06d}.xml", _voc_xml(sc).encode())
    trainval = [s for s in scenes if s.split == "train"]
    splits = {"train": trainval[0::2], "val": trainval[1::2], "trainval": trainval,
              "test": [s for s in scenes if s.split == "val"]}
    main = root / "ImageSets" / "Main"
    main.mkdir(parents=True, exist_ok=True)
    for name, group in splits.items():
        (main / f"{name}.txt").write_text("".join(f"{s.image_id:06d}\n" for s in group))
        for k, cls in enumerate(CLASSES):
            lines = []
            for s in group:
                mine = [o for o in s.objects if o.cls == k]
                flag = -1 if not mine else 1 if any(not o.difficult for o in mine) else 0
                lines.append(f"{s.image_id:06d} {flag:2d}\n")
            (main / f"{cls}_{name}.txt").write_text("".join(lines))


def _write_imagenet(out: Path, scenes: list[_Scene]) -> None:
    for split in ("train", "val"):
        for cls in CLASSES:  # every class folder exists, even if empty for tiny N
            (out / "imagenet" / split / cls).mkdir(parents=True, exist_ok=True)
    for sc in scenes:
        cls = CLASSES[sc.main_cls]
        name = (f"{cls}_{sc.image_id}.JPEG" if sc.split == "train"
                else f"ILSVRC2012_val_{sc.image_id:08d}.JPEG")
        _write(out / "imagenet" / sc.split / cls / name, sc.jpeg)


def _inat_categories() -> list[dict]:
    cats = []
    for k, cls in enumerate(CLASSES):
        colour, shape = cls.split("_")
        sup = shape.capitalize()
        cats.append({"id": k, "name": f"{colour} {shape}", "supercategory": sup,
                     "kingdom": "Shapes", "phylum": "Curves" if shape == "circle" else "Polygons",
                     "class": sup, "order": f"{sup}iformes", "family": f"{sup}idae",
                     "genus": f"{sup} {colour}"})
    return cats


def _write_inat(out: Path, scenes: list[_Scene], seed: int) -> None:
    root, cats = out / "inat2018", _inat_categories()
    for split in ("train", "val"):
        images, anns = [], []
        for sc in (s for s in scenes if s.split == split):
            cat = cats[sc.main_cls]
            digest = hashlib.md5(f"{seed}-{sc.image_id}".encode()).hexdigest()
            rel = f"train_val2018/{cat['supercategory']}/{cat['id']}/{digest}.jpg"
            _write(root / rel, sc.jpeg)
            images.append({"id": sc.image_id, "file_name": rel, "width": sc.width,
                           "height": sc.height, "license": 1, "rights_holder": "virtex shapes"})
            anns.append({"id": sc.image_id, "image_id": sc.image_id, "category_id": cat["id"]})
        _dump(root / f"{split}2018.json", {"info": _INFO, "images": images, "annotations": anns,
                                           "categories": cats, "licenses": _LICENSES})
    _dump(root / "categories.json", cats)


def _write_lvis(out: Path, scenes: list[_Scene], seed: int) -> None:
    train = [s for s in scenes if s.split == "train"]
    img_count = [sum(any(o.cls == k for o in s.objects) for s in train) for k in range(20)]
    inst_count = [sum(o.cls == k for s in train for o in s.objects) for k in range(20)]
    # Frequency by rank of training image count: the 6 most common "f", the next 7 "c",
    # the 7 rarest "r" (the long-tailed class weights make the ranks meaningful).
    order = sorted(range(20), key=lambda k: (-img_count[k], k))
    freq = {k: "f" if i < 6 else "c" if i < 13 else "r" for i, k in enumerate(order)}
    cats = [{"id": k + 1, "name": cls, "synset": f"{cls}.n.01",
             "synonyms": [cls, cls.replace("_", " ")],
             "def": f"a {cls.replace('_', ' ')} drawn on a plain background",
             "frequency": freq[k], "image_count": img_count[k], "instance_count": inst_count[k]}
            for k, cls in enumerate(CLASSES)]
    rng = random.Random(f"lvis-{seed}")
    ann_id = 0
    for split in ("train", "val"):
        images, anns = [], []
        for sc in (s for s in scenes if s.split == split):
            present = {o.cls + 1 for o in sc.objects}
            absent = [c for c in range(1, 21) if c not in present]
            im = _coco_image(sc)
            images.append({"id": sc.image_id, "coco_url": im["coco_url"], "height": sc.height,
                           "width": sc.width, "not_exhaustive_category_ids": [],
                           "neg_category_ids": sorted(rng.sample(absent, 3)), "license": 1,
                           "flickr_url": im["flickr_url"], "date_captured": _CAPTURED})
            for o in sc.objects:
                ann_id += 1
                ann = _instance(ann_id, sc, o)
                del ann["iscrowd"]
                anns.append(ann)
        _dump(out / "lvis" / f"lvis_v1_{split}.json",
              {"info": _INFO, "licenses": _LICENSES, "images": images, "annotations": anns,
               "categories": cats})


def _write_shards(out: Path, scenes: list[_Scene], shards: int = 8) -> None:
    """The train scenes as webdataset tar shards (one sample per image: its first caption in
    ``KEY.txt``, all five in ``KEY.json``), at least ``shards`` of them, byte-deterministic."""
    import tarfile

    train = [sc for sc in scenes if sc.split == "train"]
    per_shard = max(1, min(1000, math.ceil(len(train) / shards)))
    sizes = {}
    for n, first in enumerate(range(0, len(train), per_shard)):
        name = f"train-{n:05d}.tar"
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for sc in train[first:first + per_shard]:
                key = f"{sc.image_id:012d}"
                meta = {"caption": sc.captions[0], "captions": sc.captions,
                        "width": sc.width, "height": sc.height}
                for ext, data in (("jpg", sc.jpeg), ("txt", sc.captions[0].encode()),
                                  ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))
        _write(out / "shards" / name, buffer.getvalue())
        sizes[name] = len(train[first:first + per_shard])
    _dump(out / "shards" / "sizes.json", sizes)


# ----------------------------------------------------------------------------- public API
def generate(out: str | Path, images: int = 1000, seed: int = 0, min_size: int = 64,
             max_size: int = 128, formats: tuple[str, ...] = FORMATS) -> Path:
    """Write ``images`` scenes under ``out`` in ``formats`` (default: every one, see
    :data:`FORMATS`); returns ``out`` as a Path.

    Deterministic: the same arguments give byte-identical files. ``shapes.json`` is
    written last and marks a complete tree.
    """
    if images < 1 or not 16 <= min_size <= max_size:
        raise ValueError("need images >= 1 and 16 <= min_size <= max_size")
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown format(s) {', '.join(unknown)}; expected {', '.join(FORMATS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scenes = [_scene(seed, i, min_size, max_size) for i in range(images)]
    writers = {"coco": _write_coco, "voc": _write_voc, "imagenet": _write_imagenet,
               "inat": lambda o, sc: _write_inat(o, sc, seed),
               "lvis": lambda o, sc: _write_lvis(o, sc, seed), "shards": _write_shards}
    for name in FORMATS:
        if name in formats:
            writers[name](out, scenes)
    _dump(out / "shapes.json", {"images": images, "seed": seed, "classes": CLASSES,
                                "version": VERSION, "min_size": min_size, "max_size": max_size,
                                "formats": [f for f in FORMATS if f in formats]})
    return out


def _complete(root: Path, images: int, seed: int) -> bool:
    try:
        m = json.loads((root / "shapes.json").read_text())
    except (OSError, ValueError):
        return False
    return (m.get("images") == images and m.get("seed") == seed and m.get("version") == VERSION
            and set(m.get("formats", ())) >= set(FORMATS))


def ensure_shapes(root: str | Path, images: int = 1000, seed: int = 0) -> Path:
    """Generate under ``root`` unless a complete tree with these images/seed is there.

    Generation goes to a temp dir beside ``root`` that is renamed into place, so ``root``
    is either complete or absent, even after an interrupted or concurrent run.
    """
    root = Path(root)
    if _complete(root, images, seed):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        generate(tmp, images, seed)
        if root.exists():
            if _complete(root, images, seed):  # a concurrent run finished first
                return root
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.replace(root, old / "x")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, root)
        except OSError:
            if not _complete(root, images, seed):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints a one-line summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output root")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min_size", type=int, default=64)
    ap.add_argument("--max_size", type=int, default=128)
    ap.add_argument("--format", action="append", choices=FORMATS, dest="formats",
                    help="write only this format (repeatable; default: every format)")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    root = generate(a.out, a.images, a.seed, a.min_size, a.max_size,
                    tuple(a.formats or FORMATS))
    n_val = sum(1 for i in range(a.images) if i % 5 == 4)
    print(f"make_shapes: {a.images} scenes ({a.images - n_val} train / {n_val} val, "
          f"seed {a.seed}) written to {root} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
