"""Tests for the synthetic captioned-shapes generator and its real-format outputs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from virtex.tools.make_shapes import CLASSES, COLOURS, FORMATS, SHAPES, ensure_shapes, generate

REPO = Path(__file__).resolve().parents[1]
N = 60  # the shapes_root fixture's size


def _coco(path: Path):
    from pycocotools.coco import COCO

    return COCO(str(path))


def _centre(bbox: list[float]) -> tuple[float, float]:
    return bbox[0] + bbox[2] / 2, bbox[1] + bbox[3] / 2


def test_public_constants_and_manifest(shapes_root: Path) -> None:
    assert len(CLASSES) == 20 and CLASSES[0] == "red_circle" and CLASSES[1] == "red_square"
    assert CLASSES[-1] == "purple_star"
    assert CLASSES == [f"{c}_{s}" for c in COLOURS for s in SHAPES]
    m = json.loads((shapes_root / "shapes.json").read_text())
    assert m == {"images": N, "seed": 0, "classes": CLASSES, "version": 2,
                 "min_size": 64, "max_size": 128, "formats": list(FORMATS)}


def test_coco_captions(shapes_root: Path) -> None:
    ids = []
    for split in ("train", "val"):
        coco = _coco(shapes_root / f"coco/annotations/captions_{split}2017.json")
        assert {"info", "licenses", "images", "annotations"} <= set(coco.dataset)
        for img_id, img in coco.imgs.items():
            ids.append(img_id)
            caps = coco.imgToAnns[img_id]
            assert len(caps) == 5 and all(c["caption"].strip() for c in caps)
            path = shapes_root / f"coco/{split}2017" / img["file_name"]
            assert img["file_name"] == f"{img_id:012d}.jpg"
            with Image.open(path) as im:
                assert im.format == "JPEG" and im.size == (img["width"], img["height"])
                assert 64 <= im.width <= 128 and 64 <= im.height <= 128
    assert sorted(ids) == list(range(1, N + 1))
    n_val = len(json.loads((shapes_root / "coco/annotations/captions_val2017.json")
                           .read_text())["images"])
    assert n_val == N // 5


def test_coco_instances(shapes_root: Path) -> None:
    for split in ("train", "val"):
        coco = _coco(shapes_root / f"coco/annotations/instances_{split}2017.json")
        cats = coco.loadCats(coco.getCatIds())
        assert [c["id"] for c in cats] == list(range(1, 21))
        assert cats[0] == {"id": 1, "name": "red circle", "supercategory": "circle"}
        for ann in coco.dataset["annotations"]:
            img = coco.imgs[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= img["width"] and y + h <= img["height"]
            assert ann["iscrowd"] == 0 and w > 3 and h > 3
            assert 0.25 < ann["area"] / (w * h) <= 1.0
            poly = ann["segmentation"][0]
            assert len(poly) % 2 == 0 and len(poly) >= 6
            if coco.cats[ann["category_id"]]["supercategory"] == "circle":
                assert 16 <= len(poly) // 2 <= 24
            mask = coco.annToMask(ann)
            assert mask.shape == (img["height"], img["width"])
            assert abs(int(mask.sum()) - ann["area"]) <= 0.35 * ann["area"] + 10


def _objects_by_image(shapes_root: Path, split: str):
    coco = _coco(shapes_root / f"coco/annotations/instances_{split}2017.json")
    caps = _coco(shapes_root / f"coco/annotations/captions_{split}2017.json")
    for img_id, img in coco.imgs.items():
        objs = [(coco.cats[a["category_id"]]["name"], a) for a in coco.imgToAnns[img_id]]
        yield img, objs, [c["caption"] for c in caps.imgToAnns[img_id]]


def test_captions_mention_every_object(shapes_root: Path) -> None:
    counts = defaultdict(int)
    for split in ("train", "val"):
        for _img, objs, caps in _objects_by_image(shapes_root, split):
            counts[len(objs)] += 1
            assert 1 <= len(objs) <= 3
            assert len({name for name, _ in objs}) == len(objs)  # one object per class
            for cap in caps:
                for name, _ in objs:
                    assert name in cap, (name, cap)
    assert set(counts) == {1, 2, 3}


REL = re.compile(r"^a (small|large) (\w+) (\w+) (?:to the |on the )?(left|right) of "
                 r"a (small|large) (\w+) (\w+)$")


def test_left_right_relations_match_geometry(shapes_root: Path) -> None:
    checked = singles = 0
    for split in ("train", "val"):
        for img, objs, caps in _objects_by_image(shapes_root, split):
            by_name = dict(objs)
            if len(objs) == 2:
                m = REL.match(caps[0])  # the first caption of a pair is "X left/right of Y"
                assert m, caps[0]
                _, c1, s1, rel, _, c2, s2 = m.groups()
                x1 = _centre(by_name[f"{c1} {s1}"]["bbox"])[0]
                x2 = _centre(by_name[f"{c2} {s2}"]["bbox"])[0]
                assert (x1 < x2) == (rel == "left"), (caps[0], x1, x2)
                checked += 1
            elif len(objs) == 1:
                x = _centre(objs[0][1]["bbox"])[0]
                for cap in caps:
                    if "left" in cap:
                        assert x < img["width"] / 2
                    if "right" in cap:
                        assert x > img["width"] / 2
                singles += 1
            assert all(("left" in c or "right" in c) for c in caps) or len(objs) == 1
    assert checked >= 5 and singles >= 5


def test_voc2007(shapes_root: Path) -> None:
    voc = shapes_root / "VOC2007"
    main = voc / "ImageSets" / "Main"
    split_ids = {s: (main / f"{s}.txt").read_text().split() for s in
                 ("train", "val", "trainval", "test")}
    assert sorted(split_ids["train"] + split_ids["val"]) == sorted(split_ids["trainval"])
    assert not set(split_ids["trainval"]) & set(split_ids["test"])
    assert len(split_ids["trainval"]) + len(split_ids["test"]) == N
    objects = {}
    for img_id in split_ids["trainval"] + split_ids["test"]:
        root = ET.parse(voc / "Annotations" / f"{img_id}.xml").getroot()
        assert root.tag == "annotation" and root.findtext("folder") == "VOC2007"
        assert root.findtext("filename") == f"{img_id}.jpg" and len(img_id) == 6
        w, h = int(root.findtext("size/width")), int(root.findtext("size/height"))
        assert root.findtext("size/depth") == "3" and root.findtext("segmented") == "0"
        with Image.open(voc / "JPEGImages" / f"{img_id}.jpg") as im:
            assert im.size == (w, h)
        objects[img_id] = []
        for obj in root.iter("object"):
            assert obj.findtext("name") in CLASSES and obj.findtext("pose") == "Unspecified"
            assert obj.findtext("truncated") == "0"
            box = [int(obj.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax")]
            assert 1 <= box[0] < box[2] <= w and 1 <= box[1] < box[3] <= h
            objects[img_id].append((obj.findtext("name"), int(obj.findtext("difficult"))))
    seen = set()
    for cls in CLASSES:
        for split, ids in split_ids.items():
            lines = (main / f"{cls}_{split}.txt").read_text().splitlines()
            assert [ln.split()[0] for ln in lines] == ids
            for ln in lines:
                assert re.fullmatch(r"\d{6} ( 1| 0|-1)", ln), ln
                img_id, flag = ln.split()
                diffs = [d for n, d in objects[img_id] if n == cls]
                want = -1 if not diffs else 1 if 0 in diffs else 0
                assert int(flag) == want
                seen.add(int(flag))
    assert {1, -1} <= seen


def test_imagenet_folders(shapes_root: Path) -> None:
    total = 0
    for split in ("train", "val"):
        dirs = sorted(p.name for p in (shapes_root / "imagenet" / split).iterdir())
        assert dirs == sorted(CLASSES)
        for f in (shapes_root / "imagenet" / split).glob("*/*.JPEG"):
            with Image.open(f) as im:
                assert im.format == "JPEG"
            total += 1
    assert total == N


def test_inat2018(shapes_root: Path) -> None:
    root = shapes_root / "inat2018"
    cats = json.loads((root / "categories.json").read_text())
    assert [c["id"] for c in cats] == list(range(20))
    keys = {"id", "name", "supercategory", "kingdom", "phylum", "class", "order", "family",
            "genus"}
    assert all(set(c) == keys for c in cats)
    n = 0
    for split in ("train", "val"):
        d = json.loads((root / f"{split}2018.json").read_text())
        assert d["categories"] == cats and {"info", "licenses"} <= set(d)
        img_ids = {im["id"] for im in d["images"]}
        assert sorted(a["image_id"] for a in d["annotations"]) == sorted(img_ids)
        cat_of = {a["image_id"]: a["category_id"] for a in d["annotations"]}
        for im in d["images"]:
            assert (root / im["file_name"]).is_file()
            _, sup, cid, _ = im["file_name"].split("/")
            assert int(cid) == cat_of[im["id"]] and sup == cats[int(cid)]["supercategory"]
            n += 1
    assert n == N


def test_lvis_v1(shapes_root: Path) -> None:
    from lvis import LVIS

    for split in ("train", "val"):
        lv = LVIS(str(shapes_root / "lvis" / f"lvis_v1_{split}.json"))
        assert {c["frequency"] for c in lv.cats.values()} == {"r", "c", "f"}
        for img_id, img in lv.imgs.items():
            rel = "/".join(img["coco_url"].split("/")[-2:])
            assert (shapes_root / "coco" / rel).is_file()
            present = {a["category_id"] for a in lv.img_ann_map[img_id]}
            assert img["neg_category_ids"] and not present & set(img["neg_category_ids"])
            assert img["not_exhaustive_category_ids"] == []
        assert lv.get_ann_ids(img_ids=list(lv.imgs)[:3])
        assert all("iscrowd" not in a for a in lv.anns.values())
        cat = lv.cats[1]
        assert cat["synset"] == "red_circle.n.01" and cat["name"] == "red_circle"


def test_deterministic(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", images=10, seed=3)
    b = generate(tmp_path / "b", images=10, seed=3)
    c = generate(tmp_path / "c", images=10, seed=4)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    cap = "coco/annotations/captions_train2017.json"
    jpg = "coco/train2017/000000000001.jpg"
    assert (a / cap).read_bytes() != (c / cap).read_bytes()
    assert (a / jpg).read_bytes() != (c / jpg).read_bytes()


def test_ensure_shapes(tmp_path: Path) -> None:
    root = tmp_path / "data" / "shapes"
    assert ensure_shapes(root, images=5, seed=0) == root
    manifest = root / "shapes.json"
    assert json.loads(manifest.read_text())["images"] == 5
    mtime = manifest.stat().st_mtime_ns
    ensure_shapes(root, images=5, seed=0)
    assert manifest.stat().st_mtime_ns == mtime  # complete: left alone
    ensure_shapes(root, images=5, seed=1)
    assert json.loads(manifest.read_text())["seed"] == 1  # different seed: regenerated
    manifest.unlink()  # a half-finished tree has no manifest
    (root / "junk.txt").write_text("stale")
    ensure_shapes(root, images=5, seed=1)
    assert manifest.is_file() and not (root / "junk.txt").exists()
    assert sorted(os.listdir(root.parent)) == ["shapes"]  # no temp dirs left behind


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "virtex.tools.make_shapes", "--out", str(out),
                        "--images", "20", "--seed", "1"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 1 and "20" in r.stdout
    assert json.loads((out / "shapes.json").read_text())["seed"] == 1


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate(tmp_path, images=0)


def test_shards_are_webdataset_tars_of_the_train_scenes(shapes_root: Path, tmp_path: Path) -> None:
    import tarfile

    import webdataset as wds

    shards = sorted((shapes_root / "shards").glob("train-*.tar"))
    sizes = json.loads((shapes_root / "shards" / "sizes.json").read_text())
    assert [p.name for p in shards] == sorted(sizes) and len(shards) == 8
    captions = json.loads((shapes_root / "coco/annotations/captions_train2017.json").read_text())
    first = {}
    for a in captions["annotations"]:
        first.setdefault(a["image_id"], a["caption"])
    keys = []
    for path in shards:
        with tarfile.open(path) as tar:
            names = tar.getnames()
        assert names == [f"{k}.{e}" for k in dict.fromkeys(n.split(".")[0] for n in names)
                         for e in ("jpg", "txt", "json")]
        samples = list(wds.WebDataset(str(path), shardshuffle=False))  # webdataset's own reader
        assert len(samples) == sizes[path.name]
        for s in samples:
            assert s["txt"].decode() == first[int(s["__key__"])]
            assert json.loads(s["json"])["caption"] == s["txt"].decode()
            keys.append(int(s["__key__"]))
    assert sorted(keys) == sorted(first)  # every train scene once
    only = generate(tmp_path / "only", images=N, seed=0, formats=("shards",))
    assert sorted(p.name for p in only.iterdir()) == ["shapes.json", "shards"]
    for path in shards:  # byte-identical for the same arguments
        assert (only / "shards" / path.name).read_bytes() == path.read_bytes()
