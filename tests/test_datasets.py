"""Datasets and collate on the shapes tree: shapes, dtypes, token layout, flip before tokens."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from virtex.data import transforms as V
from virtex.data.datasets import CocoCaptionsDataset, ImageClassificationDataset, collate_captions
from virtex.data.masking import CaptionMasking
from virtex.data.readers import (
    read_caption_strings,
    read_coco_captions,
    read_image_folder,
    read_inat,
    read_voc_classification,
)
from virtex.data.source import SampleSeeded
from virtex.data.tokenizer import SentencePieceTokenizer, build_vocab

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok(shapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> SentencePieceTokenizer:
    captions = read_caption_strings(shapes_root / "coco/annotations/captions_train2017.json")
    return SentencePieceTokenizer(build_vocab(captions, tmp_path_factory.mktemp("v") / "v", vocab_size=300))


def _small() -> V.Compose:
    return V.train_transform(64)


def test_caption_item(shapes_root: Path, tok: SentencePieceTokenizer) -> None:
    ds = CocoCaptionsDataset(shapes_root / "coco", "train2017", tok, _small())
    assert len(ds) == 48
    torch.manual_seed(0)
    for index in (0, 7, 47):
        item = ds[index]
        record = ds.records[index]
        assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
        fwd, bwd = item["caption_tokens"], item["noitpac_tokens"]
        assert fwd.dtype == bwd.dtype == torch.long
        assert fwd[0] == bwd[-1] == tok.sos_id and fwd[-1] == bwd[0] == tok.eos_id
        assert torch.equal(bwd, fwd.flip(0))  # the exact reverse, as the original builds it
        assert item["caption_lengths"].item() == len(fwd) <= 30
        assert item["image_id"].item() == record.image_id
        text = tok.decode(fwd.tolist())  # a caption, maybe flipped, maybe truncated
        candidates = [c.lower() for c in record.captions]
        candidates += [V.swap_left_right_substrings(c) for c in candidates]
        assert any(c.startswith(text) for c in candidates)


def test_captions_sampled_with_torch_rng(shapes_root: Path, tok: SentencePieceTokenizer) -> None:
    ds = CocoCaptionsDataset(shapes_root / "coco", "val2017", tok, V.eval_transform(72, 64))
    torch.manual_seed(1)
    first = [ds[3]["caption_tokens"].tolist() for _ in range(20)]
    torch.manual_seed(1)
    again = [ds[3]["caption_tokens"].tolist() for _ in range(20)]
    assert first == again
    assert len({tuple(t) for t in first}) > 2  # different captions of the same image


def test_flip_happens_before_tokenisation(shapes_root: Path, tok: SentencePieceTokenizer) -> None:
    flip = V.Compose([V.Resize(64), V.CenterCrop(64), V.HorizontalFlip(p=1.0), V.Normalize()])
    plain = V.eval_transform(64, 64)
    flipped = CocoCaptionsDataset(shapes_root / "coco", "train2017", tok, flip)
    kept = CocoCaptionsDataset(shapes_root / "coco", "train2017", tok, plain)
    seen_left = False
    for index in range(10):
        torch.manual_seed(index)
        a = tok.decode(flipped[index]["caption_tokens"].tolist())
        torch.manual_seed(index)
        b_item = kept[index]
        b = tok.decode(b_item["caption_tokens"].tolist())
        assert a == V.swap_left_right_substrings(b)
        seen_left |= "left" in b
        torch.manual_seed(index)
        torch.testing.assert_close(flipped[index]["image"], b_item["image"].flip(-1))
    assert seen_left


def test_long_caption_truncated(shapes_root: Path, tok: SentencePieceTokenizer,
                                tmp_path: Path) -> None:
    coco = tmp_path / "coco"
    shutil.copytree(shapes_root / "coco", coco)
    path = coco / "annotations/captions_val2017.json"
    data = json.loads(path.read_text())
    first = data["images"][0]["id"]
    long = " ".join(["a big red circle on the left of a small blue star"] * 8)
    for a in data["annotations"]:
        if a["image_id"] == first:
            a["caption"] = long
    path.write_text(json.dumps(data))
    ds = CocoCaptionsDataset(coco, "val2017", tok, _small())
    item = ds[0]
    assert len(tok.encode(long)) > 30
    assert item["caption_tokens"].shape == (30,) and item["caption_lengths"] == 30
    # The original keeps the first 30 ids of [SOS] w1 .. wn [EOS]: no [EOS] at either end.
    assert item["caption_tokens"].tolist() == [tok.sos_id, *tok.encode(long)[:29]]
    assert item["noitpac_tokens"].tolist() == [*tok.encode(long)[:29][::-1], tok.sos_id]
    short = CocoCaptionsDataset(coco, "val2017", tok, _small(), max_caption_length=12)
    assert short[0]["caption_tokens"].shape == (12,)


def _instance_labels(coco: Path, split: str) -> dict[int, list[int]]:
    """Expected labels, straight from the JSON: categories numbered 1.. in file order."""
    data = json.loads((coco / "annotations" / f"instances_{split}.json").read_text())
    number = {c["id"]: k for k, c in enumerate(data["categories"], start=1)}
    out: dict[int, set[int]] = {}
    for a in data["annotations"]:
        out.setdefault(a["image_id"], set()).add(number[a["category_id"]])
    return {i: sorted(v) for i, v in out.items()}


def test_labels_from_instances(shapes_root: Path, tok: SentencePieceTokenizer) -> None:
    coco = shapes_root / "coco"
    ds = CocoCaptionsDataset(coco, "val2017", tok, _small(), labels_from_instances=True)
    data = json.loads((coco / "annotations/instances_val2017.json").read_text())
    assert ds.categories == [c["name"] for c in data["categories"]]
    expected = _instance_labels(coco, "val2017")
    assert len(ds) == len(expected)
    for index in range(len(ds)):
        item = ds[index]
        assert item["labels"].dtype == torch.long
        assert item["labels"].tolist() == expected[item["image_id"].item()]


def test_images_without_instances_are_dropped(shapes_root: Path, tmp_path: Path,
                                              tok: SentencePieceTokenizer) -> None:
    coco = tmp_path / "coco"
    shutil.copytree(shapes_root / "coco" / "annotations", coco / "annotations")
    (coco / "val2017").symlink_to(shapes_root / "coco" / "val2017")
    path = coco / "annotations/instances_val2017.json"
    data = json.loads(path.read_text())
    bare = sorted({a["image_id"] for a in data["annotations"]})[:2]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] not in bare]
    data["categories"] = data["categories"][::-1]  # numbering follows the file order
    path.write_text(json.dumps(data))
    everything = CocoCaptionsDataset(coco, "val2017", tok, _small())
    ds = CocoCaptionsDataset(coco, "val2017", tok, _small(), labels_from_instances=True)
    assert len(ds) == len(everything) - 2
    assert not {r.image_id for r in ds.records} & set(bare)
    expected = _instance_labels(coco, "val2017")
    assert all(ds[i]["labels"].tolist() == expected[r.image_id] for i, r in enumerate(ds.records))
    assert ds.categories[0] == data["categories"][0]["name"]
    kept = CocoCaptionsDataset(coco, "val2017", tok, _small(), labels_from_instances=True,
                               keep_unlabelled=True)
    assert len(kept) == len(everything)
    index = [r.image_id for r in kept.records].index(bare[0])
    assert kept[index]["labels"].tolist() == []


def test_masked_lm_items_are_seeded_per_sample(shapes_root: Path,
                                               tok: SentencePieceTokenizer) -> None:
    coco = shapes_root / "coco"
    plain = SampleSeeded(CocoCaptionsDataset(coco, "val2017", tok, _small()))
    masking = CaptionMasking()
    masked = SampleSeeded(CocoCaptionsDataset(coco, "val2017", tok, _small(), masking=masking))
    state = random.getstate()
    for index in range(len(plain)):
        item, original = masked[(index, 100 + index)], plain[(index, 100 + index)]
        assert random.getstate() == state  # the main process's stream is left alone
        again = masked[(index, 100 + index)]
        assert all(torch.equal(item[k], again[k]) for k in item)  # a function of the seed
        tokens, labels = item["caption_tokens"], item["masked_labels"]
        before = original["caption_tokens"]  # the same caption: drawn before the masking
        assert torch.equal(item["image"], original["image"])
        length = len(before)
        chosen = (tokens != before) | (labels != tok.pad_id)
        assert not chosen[0] and not chosen[-1]
        assert chosen.sum() <= masking.count(length)
        assert torch.equal(labels[labels != tok.pad_id], before[labels != tok.pad_id])
        assert (tokens[labels != tok.pad_id] == tok.mask_id).all()
        assert (labels != tok.pad_id).any() or masking.count(length) > 1
    batch = collate_captions([masked[(i, i)] for i in range(4)], pad_id=tok.pad_id)
    assert batch["masked_labels"].shape == batch["caption_tokens"].shape


def test_collate(shapes_root: Path, tok: SentencePieceTokenizer) -> None:
    ds = CocoCaptionsDataset(shapes_root / "coco", "train2017", tok, _small(),
                             labels_from_instances=True)
    torch.manual_seed(0)
    items = [ds[i] for i in range(6)]
    batch = collate_captions(items)
    lengths = [len(i["caption_tokens"]) for i in items]
    n, t = 6, max(lengths)
    assert batch["image"].shape == (n, 3, 64, 64) and batch["image"].dtype == torch.float32
    for key in ("caption_tokens", "noitpac_tokens"):
        assert batch[key].shape == (n, t) and batch[key].dtype == torch.long
    assert batch["caption_lengths"].tolist() == lengths
    assert batch["image_id"].dtype == torch.long and batch["image_id"].shape == (n,)
    width = max(len(i["labels"]) for i in items)
    assert batch["labels"].shape == (n, width) and batch["labels"].dtype == torch.long
    for row, item in zip(batch["labels"], items):
        assert row.tolist() == item["labels"].tolist() + [0] * (width - len(item["labels"]))
    for row, item, length in zip(batch["caption_tokens"], items, lengths):
        assert torch.equal(row[:length], item["caption_tokens"])
        assert (row[length:] == tok.pad_id).all()
    assert len(set(lengths)) > 1  # padding was exercised
    assert "labels" not in collate_captions([{k: v for k, v in i.items() if k != "labels"}
                                             for i in items])


def test_dataloader_with_workers(shapes_root: Path, tok: SentencePieceTokenizer) -> None:
    ds = CocoCaptionsDataset(shapes_root / "coco", "val2017", tok, _small())
    runs = []
    for _ in range(2):
        loader = DataLoader(ds, batch_size=5, num_workers=2, collate_fn=collate_captions,
                            generator=torch.Generator().manual_seed(0), shuffle=True)
        runs.append(list(loader))
    assert sum(len(b["image_id"]) for b in runs[0]) == 12
    for a, b in zip(*runs):  # seeded generator -> same worker seeds -> same augmentation
        assert torch.equal(a["image"], b["image"])
        assert torch.equal(a["caption_tokens"], b["caption_tokens"])


def test_classification_datasets(shapes_root: Path) -> None:
    tf = V.eval_transform(72, 64)
    paths, labels, _ = read_voc_classification(shapes_root / "VOC2007", "trainval")
    voc = ImageClassificationDataset(paths, labels, tf)
    item = voc[0]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["target"].dtype == torch.int8 and item["target"].tolist() == labels[0].tolist()
    for reader, root, split in ((read_image_folder, "imagenet", "val"),
                                (read_inat, "inat2018", "train2018")):
        paths, targets, _ = reader(shapes_root / root, split)
        ds = ImageClassificationDataset(paths, targets, tf)
        batch = next(iter(DataLoader(ds, batch_size=4)))
        assert batch["image"].shape == (4, 3, 64, 64)
        assert batch["target"].dtype == torch.long
        assert batch["target"].tolist() == targets[:4].tolist()
    untransformed = ImageClassificationDataset(paths[:1], targets[:1], None)[0]["image"]
    assert untransformed.dtype == torch.float32 and untransformed.max() <= 1
    with pytest.raises(ValueError, match="1 paths but 2 targets"):
        ImageClassificationDataset(paths[:1], targets[:2], tf)


def test_blank_captions_are_dropped_with_a_warning(shapes_root: Path, tmp_path: Path,
                                                   capfd: pytest.CaptureFixture) -> None:
    coco = tmp_path / "coco"
    shutil.copytree(shapes_root / "coco", coco)
    path = coco / "annotations" / "captions_val2017.json"
    data = json.loads(path.read_text())
    first, second = data["images"][0]["id"], data["images"][1]["id"]
    for a in data["annotations"]:
        if a["image_id"] == first:
            a["caption"] = "  \n"  # every caption of this image is blank
    next(a for a in data["annotations"] if a["image_id"] == second)["caption"] = ""
    path.write_text(json.dumps(data))
    records = read_coco_captions(coco, "val2017")
    err = capfd.readouterr().err.strip().splitlines()
    n_first = sum(a["image_id"] == first for a in data["annotations"])
    assert err == [f"virtex: warning: {path}: {n_first + 1} blank caption(s) dropped; 1 image(s) "
                   f"left without a caption are not used (the first: image_id {first}, "
                   f"{data['images'][0]['file_name']})"]
    assert first not in {r.image_id for r in records}
    assert all(c.strip() for r in records for c in r.captions)
    assert len(records) == len(data["images"]) - 1
