"""Readers on the synthetic shapes tree (real formats) and on deliberately broken copies."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from virtex.data.readers import (
    DataFormatError,
    coco_annotations,
    coco_categories,
    read_caption_strings,
    read_coco_captions,
    read_coco_instance_labels,
    read_image_folder,
    read_inat,
    read_voc_classification,
)

VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor"]


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- COCO
@pytest.mark.parametrize("split", ["train2017", "val2017"])
def test_coco_captions_match_json(shapes_root: Path, split: str) -> None:
    coco = shapes_root / "coco"
    data = _json(coco / "annotations" / f"captions_{split}.json")
    records = read_coco_captions(coco, split)
    assert len(records) == len(data["images"]) > 0
    assert [r.image_id for r in records] == sorted(im["id"] for im in data["images"])
    by_id: dict[int, list[str]] = {}
    for a in data["annotations"]:
        by_id.setdefault(a["image_id"], []).append(a["caption"])
    for r in records:
        assert len(r.captions) == 5
        assert r.captions == by_id[r.image_id]
        assert r.path == coco / split / f"{r.image_id:012d}.jpg" and r.path.is_file()


def test_caption_strings(shapes_root: Path) -> None:
    path = shapes_root / "coco/annotations/captions_train2017.json"
    assert read_caption_strings(path) == [a["caption"] for a in _json(path)["annotations"]]


def test_coco_instance_labels_match_instances(shapes_root: Path) -> None:
    """Class ids 1..K in the file's category order; images without an instance left out."""
    coco = shapes_root / "coco"
    data = _json(coco / "annotations/instances_train2017.json")
    labels, names = read_coco_instance_labels(coco, "train2017")
    assert names == [c["name"] for c in data["categories"]]
    index = {c["id"]: k for k, c in enumerate(data["categories"], start=1)}
    expected: dict[int, set[int]] = {}
    for a in data["annotations"]:
        expected.setdefault(a["image_id"], set()).add(index[a["category_id"]])
    assert labels == {i: sorted(expected[i]) for i in sorted(expected)}
    assert any(len(v) > 1 for v in labels.values())  # some images have 2-3 shapes


def test_coco_categories_map_sparse_ids_in_sorted_order(tmp_path: Path) -> None:
    """COCO uses 80 of the ids 1..90: :func:`coco_categories` maps them to 0..K-1 in sorted
    id order, and :func:`coco_annotations` yields each annotation's class index."""
    path = tmp_path / "instances_x.json"
    cats = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"},
            {"id": 13, "name": "stop sign"}]
    index, names = coco_categories(cats, path)
    assert index == {1: 0, 13: 1, 90: 2}
    assert names == ["person", "stop sign", "toothbrush"]
    anns = [{"image_id": 7, "category_id": 90}, {"image_id": 7, "category_id": 13}]
    assert [(w, i, k) for w, _, i, k in coco_annotations(anns, path, {7}, index)] == [
        (f"{path}: annotations[0]", 7, 2), (f"{path}: annotations[1]", 7, 1)]
    with pytest.raises(DataFormatError, match=r"categories\[2\]: duplicate category id 1"):
        coco_categories([*cats, {"id": 1, "name": "again"}][1:], path)
    with pytest.raises(DataFormatError, match=r"annotations\[0\]: image_id 8 is not in 'images'"):
        list(coco_annotations([{"image_id": 8, "category_id": 1}], path, {7}, index))


def test_coco_missing_annotations_names_path_and_layout(shapes_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataFormatError) as e:
        read_coco_captions(tmp_path, "train2017")
    msg = str(e.value)
    assert str(tmp_path / "annotations" / "captions_train2017.json") in msg
    assert "expected layout" in msg
    assert isinstance(e.value, ValueError)


def test_coco_missing_image_is_named(shapes_root: Path, tmp_path: Path) -> None:
    coco = _copy(shapes_root / "coco", tmp_path / "coco")
    victim = coco / "val2017" / "000000000005.jpg"
    victim.unlink()
    with pytest.raises(DataFormatError, match="missing on disk") as e:
        read_coco_captions(coco, "val2017")
    assert str(victim) in str(e.value)


@pytest.mark.parametrize("edit, key", [
    (lambda d: d["annotations"][3].pop("caption"), "'caption'"),
    (lambda d: d["annotations"][3].update(caption=42), "42"),
    (lambda d: d["annotations"][3].update(image_id=999999), "999999"),
    (lambda d: d.pop("images"), "'images'"),
])
def test_coco_bad_json_content(shapes_root: Path, tmp_path: Path, edit, key: str) -> None:
    coco = _copy(shapes_root / "coco", tmp_path / "coco")
    path = coco / "annotations/captions_val2017.json"
    data = _json(path)
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(DataFormatError) as e:
        read_coco_captions(coco, "val2017")
    assert str(path) in str(e.value) and key in str(e.value)


def test_coco_invalid_json(tmp_path: Path) -> None:
    (tmp_path / "annotations").mkdir()
    path = tmp_path / "annotations/instances_val2017.json"
    path.write_text('{"images": [')
    with pytest.raises(DataFormatError, match="not valid JSON") as e:
        read_coco_instance_labels(tmp_path, "val2017")
    assert str(path) in str(e.value)


def test_coco_unknown_category(shapes_root: Path, tmp_path: Path) -> None:
    coco = _copy(shapes_root / "coco", tmp_path / "coco")
    path = coco / "annotations/instances_val2017.json"
    data = _json(path)
    data["annotations"][0]["category_id"] = 77
    path.write_text(json.dumps(data))
    with pytest.raises(DataFormatError, match="category_id 77"):
        read_coco_instance_labels(coco, "val2017")


# ----------------------------------------------------------------------------- VOC
def _xml_flags(xml: Path, classes: list[str]) -> list[int]:
    present: dict[str, bool] = {}
    for obj in ET.parse(xml).getroot().iter("object"):
        name, difficult = obj.findtext("name"), obj.findtext("difficult") == "1"
        present[name] = present.get(name, False) or not difficult
    return [(1 if present[c] else 0) if c in present else -1 for c in classes]


@pytest.mark.parametrize("split", ["trainval", "train", "val", "test"])
def test_voc_flags_match_xml(shapes_root: Path, split: str) -> None:
    voc = shapes_root / "VOC2007"
    paths, labels, classes = read_voc_classification(voc, split)
    ids = (voc / "ImageSets/Main" / f"{split}.txt").read_text().split()
    assert [p.stem for p in paths] == ids
    assert classes == sorted(classes) and len(classes) == 20
    assert labels.shape == (len(ids), 20) and labels.dtype == np.int8
    for path, row in zip(paths, labels):
        assert path.is_file()
        assert row.tolist() == _xml_flags(voc / "Annotations" / f"{path.stem}.xml", classes)
    assert set(np.unique(labels)) <= {-1, 0, 1}


def _fake_voc(root: Path, split: str = "train") -> Path:
    main = root / "ImageSets/Main"
    main.mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    ids = ["000005", "000007"]
    (main / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    (main / "trainval.txt").write_text("000005\n")  # other splits' files must be ignored
    for cls in VOC_CLASSES:
        (main / f"{cls}_{split}.txt").write_text("000005 -1\n000007  1\n")
        (main / f"{cls}_trainval.txt").write_text("000005  0\n")
    for i in ids:
        (root / "JPEGImages" / f"{i}.jpg").write_bytes(b"")
    return main


def test_voc_standard_class_order(tmp_path: Path) -> None:
    _fake_voc(tmp_path, "train")  # the class "train" has a file "train_train.txt"
    _, labels, classes = read_voc_classification(tmp_path, "train")
    assert classes == VOC_CLASSES
    assert labels[:, 0].tolist() == [-1, 1]


@pytest.mark.parametrize("line", ["000007 2", "000007", "000007 1 extra", "000007 yes"])
def test_voc_malformed_line_is_named(tmp_path: Path, line: str) -> None:
    main = _fake_voc(tmp_path)
    bad = main / "dog_train.txt"
    bad.write_text(f"000005 -1\n{line}\n")
    with pytest.raises(DataFormatError, match="malformed line") as e:
        read_voc_classification(tmp_path, "train")
    assert f"{bad}:2" in str(e.value) and repr(line) in str(e.value)


def test_voc_class_file_missing_an_id(tmp_path: Path) -> None:
    main = _fake_voc(tmp_path)
    (main / "cat_train.txt").write_text("000005 -1\n")
    with pytest.raises(DataFormatError, match="'000007'.*has no line"):
        read_voc_classification(tmp_path, "train")


def test_voc_missing_split_file(shapes_root: Path, tmp_path: Path) -> None:
    voc = _copy(shapes_root / "VOC2007", tmp_path / "VOC2007")
    (voc / "ImageSets/Main/val.txt").unlink()
    with pytest.raises(DataFormatError, match="expected layout") as e:
        read_voc_classification(voc, "val")
    assert str(voc / "ImageSets/Main/val.txt") in str(e.value)


def test_voc_missing_image(shapes_root: Path, tmp_path: Path) -> None:
    voc = _copy(shapes_root / "VOC2007", tmp_path / "VOC2007")
    first = (voc / "ImageSets/Main/test.txt").read_text().split()[0]
    (voc / "JPEGImages" / f"{first}.jpg").unlink()
    with pytest.raises(DataFormatError, match=f"{first}.jpg"):
        read_voc_classification(voc, "test")


def test_voc_not_a_voc_dir(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="ImageSets"):
        read_voc_classification(tmp_path, "trainval")


# ----------------------------------------------------------------------------- folders, iNat
@pytest.mark.parametrize("split", ["train", "val"])
def test_image_folder(shapes_root: Path, split: str) -> None:
    folder = shapes_root / "imagenet" / split
    paths, targets, classes = read_image_folder(shapes_root / "imagenet", split)
    assert classes == sorted(d.name for d in folder.iterdir()) and len(classes) == 20
    assert len(paths) == len(list(folder.glob("*/*.JPEG"))) == len(targets)
    for p, t in zip(paths, targets):
        assert p.parent.name == classes[t]
    assert targets.dtype == np.int64


def test_image_folder_extensions_and_fixed_classes(tmp_path: Path) -> None:
    for cls, names in {"b": ["1.JPG", "2.png", "3.WebP", "notes.txt"], "a": ["x.jpeg"]}.items():
        (tmp_path / "train" / cls).mkdir(parents=True)
        for n in names:
            (tmp_path / "train" / cls / n).write_bytes(b"")
    paths, targets, classes = read_image_folder(tmp_path, "train")
    assert classes == ["a", "b"]
    assert [p.name for p in paths] == ["x.jpeg", "1.JPG", "2.png", "3.WebP"]
    assert targets.tolist() == [0, 1, 1, 1]
    _, targets, classes = read_image_folder(tmp_path, "train", classes=["z", "a", "b"])
    assert targets.tolist() == [1, 2, 2, 2]
    with pytest.raises(DataFormatError, match="'b' is not one of"):
        read_image_folder(tmp_path, "train", classes=["a"])


def test_image_folder_missing(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError) as e:
        read_image_folder(tmp_path, "val")
    assert str(tmp_path / "val") in str(e.value)


@pytest.mark.parametrize("split", ["train2018", "val2018"])
def test_inat(shapes_root: Path, split: str) -> None:
    root = shapes_root / "inat2018"
    data = _json(root / f"{split}.json")
    paths, targets, names = read_inat(root, split)
    cats = sorted(data["categories"], key=lambda c: c["id"])
    assert names == [c["name"] for c in cats]
    files = {im["id"]: im["file_name"] for im in data["images"]}
    truth = {a["image_id"]: a["category_id"] for a in data["annotations"]}
    assert len(paths) == len(files)
    for p, t, image_id in zip(paths, targets, sorted(files)):
        assert p == root / files[image_id] and p.is_file()
        assert cats[t]["id"] == truth[image_id]


def test_inat_missing_image(shapes_root: Path, tmp_path: Path) -> None:
    root = _copy(shapes_root / "inat2018", tmp_path / "inat2018")
    rel = _json(root / "val2018.json")["images"][0]["file_name"]
    (root / rel).unlink()
    with pytest.raises(DataFormatError, match="missing on disk") as e:
        read_inat(root, "val2018")
    assert rel in str(e.value)


def test_inat_unlabelled_split(shapes_root: Path, tmp_path: Path) -> None:
    root = _copy(shapes_root / "inat2018", tmp_path / "inat2018")
    data = _json(root / "val2018.json")
    data["annotations"] = []
    (root / "test2018.json").write_text(json.dumps(data))
    with pytest.raises(DataFormatError, match="has no annotation"):
        read_inat(root, "test2018")
