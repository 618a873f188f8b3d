"""The pretraining objectives against the original VirTex's own outputs (shared/fidelity).

Masked LM: the masked tokens and labels of 20 seeded captions (and a collated batch) are
identical; the losses recomputed from the stored logits and targets agree within 1e-5;
multilabel targets follow the original renumbering and drop images without instances.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from fidelity import FIDELITY, needs_fidelity
from virtex.plugins.models.objectives import (
    MaskedLMModel,
    MultilabelClassificationModel,
    TokenClassificationModel,
    set_softmax_loss,
)

from virtex.data.datasets import collate_captions
from virtex.data.masking import CaptionMasking
from virtex.data.readers import read_coco_instance_labels
from virtex.models.textual import TransformerTextualHead
from virtex.models.visual import ResNetBackbone

pytestmark = needs_fidelity

# the original vocabulary's ids (fidelity README): <unk> = padding = no label
UNK, SOS, EOS, MASK, VOCAB = 0, 1, 2, 3, 1000


@pytest.fixture(scope="module")
def masked_lm() -> dict:
    return json.loads((FIDELITY / "masked_lm.json").read_text())


@pytest.fixture(scope="module")
def examples() -> dict:
    return torch.load(FIDELITY / "objectives" / "examples.pt", weights_only=True)


def _mask(item: dict, masking: CaptionMasking) -> tuple[list[int], list[int]]:
    """The original's per-item calls: random.choice of the (single) caption, then masking."""
    random.choice([item["caption"]])
    return masking(item["tokens_before_masking"], random, MASK, VOCAB, no_label=UNK)


def test_masking_config_is_the_originals(masked_lm: dict) -> None:
    config, masking = masked_lm["config"], CaptionMasking()
    assert (masking.proportion, masking.mask_probability, masking.replace_probability) == (
        config["MASK_PROPORTION"], config["MASK_PROBABILITY"], config["REPLACE_PROBABILITY"])
    assert (config["MASK_INDEX"], config["padding/ignore"], config["vocab_size"]) == (
        MASK, UNK, VOCAB)


def test_masked_tokens_and_labels_equal_the_originals(masked_lm: dict) -> None:
    masking = CaptionMasking()
    assert len(masked_lm["items"]) == 20
    for item in masked_lm["items"]:
        random.seed(item["seed"])
        tokens, labels = _mask(item, masking)
        assert tokens == item["caption_tokens"], item["seed"]
        assert labels == item["masked_labels"], item["seed"]
        assert len(tokens) == item["caption_length"]
    replaced = sum(bool(item["random_replacement_ids"]) for item in masked_lm["items"])
    assert replaced >= 2  # the randint branch was exercised


def test_collated_batch_with_seed_77_equals_the_originals(masked_lm: dict) -> None:
    masking, items = CaptionMasking(), []
    random.seed(77)
    for k, item in enumerate(masked_lm["items"], start=1):
        tokens, labels = _mask(item, masking)
        items.append({"image": torch.zeros(3, 1, 1), "image_id": torch.tensor(k),
                      "caption_tokens": torch.tensor(tokens),
                      "noitpac_tokens": torch.tensor(tokens[::-1]),
                      "caption_lengths": torch.tensor(len(tokens)),
                      "masked_labels": torch.tensor(labels)})
    batch = collate_captions(items, pad_id=UNK)
    expected = masked_lm["collated_batch_seed77"]
    for key in ("caption_tokens", "masked_labels", "caption_lengths", "image_id"):
        assert batch[key].tolist() == expected[key], key


def test_chosen_count_per_length_is_the_originals(masked_lm: dict) -> None:
    masking = CaptionMasking()
    table = {3: 1, 8: 1, 9: 2, 15: 2, 16: 3, 22: 3, 23: 4, 28: 4, 29: 5, 30: 5, 2: 0}
    assert {n: masking.count(n) for n in table} == table
    for length, row in masked_lm["statistics"]["by_caption_length"].items():
        assert masking.count(int(length)) == row["expected_ceil_0.15_(L-2)"] == row["mean_chosen"]


def test_masking_statistics_match_the_originals(masked_lm: dict) -> None:
    """2000 draws as the original's statistics: fractions within +-0.03 (README)."""
    masking, rng = CaptionMasking(), random.Random(0)
    items = masked_lm["items"]
    counts = {"mask": 0, "random": 0, "kept": 0}
    for j in range(2000):
        item = items[j % 20]
        before = item["tokens_before_masking"]
        tokens, labels = masking(before, rng, MASK, VOCAB, no_label=UNK)
        chosen = [p for p in range(len(before)) if tokens[p] != before[p] or labels[p]]
        assert all(labels[p] == 0 for p in range(len(before)) if p not in chosen)
        for p in chosen:
            if labels[p]:
                counts["mask"] += 1
            elif tokens[p] != before[p]:
                counts["random"] += 1
        counts["kept"] += masking.count(len(before)) - len(chosen)  # kept, or random = itself
    total = sum(counts.values())
    stats = masked_lm["statistics"]
    assert abs(counts["mask"] / total - stats["overall_frac_mask"]) <= 0.03
    assert abs(counts["random"] / total - stats["overall_frac_random"]) <= 0.03
    assert abs(counts["kept"] / total - stats["overall_frac_kept"]) <= 0.03


def _masked_lm_model() -> MaskedLMModel:
    head = TransformerTextualHead(64, VOCAB, hidden_size=32, num_layers=1, attention_heads=2,
                                  feedforward_size=64, padding_idx=UNK)
    return MaskedLMModel(ResNetBackbone("resnet18"), head, MASK, VOCAB)


def test_masked_lm_loss_equals_the_originals(examples: dict, masked_lm: dict) -> None:
    ex = examples["masked_lm"]
    loss, count = _masked_lm_model().masked_lm_loss(ex["logits"], ex["masked_labels"])
    assert abs(loss.item() - ex["loss"].item()) <= 1e-5
    assert abs(loss.item() - masked_lm["loss_examples"]["masked_lm_loss"]) <= 1e-5
    assert count == (ex["masked_labels"] != UNK).sum() > 0
    # the stored batch is the one the original dataset gave for items 0, 1, 6, 9
    for row, k in enumerate(masked_lm["loss_examples"]["masked_lm_items"]):
        item, length = masked_lm["items"][k], int(ex["caption_lengths"][row])
        assert ex["caption_tokens"][row, :length].tolist() == item["caption_tokens"]
        assert ex["masked_labels"][row, :length].tolist() == item["masked_labels"]


def test_token_classification_loss_equals_the_originals(examples: dict,
                                                        masked_lm: dict) -> None:
    ex = examples["token_classification"]
    model = TokenClassificationModel(ResNetBackbone("resnet18"), VOCAB,
                                     ignore_indices=(UNK, SOS, EOS, MASK))
    bag = model.targets(ex["labels"]).bool()
    loss = set_softmax_loss(ex["logits"], bag)
    assert abs(loss.item() - ex["loss"].item()) <= 1e-5
    assert abs(loss.item() - masked_lm["loss_examples"]["token_classification_loss"]) <= 1e-5
    # a set: duplicates count once (item 6 repeats id 4), specials never
    assert bag.sum(1).tolist() == [len(set(r.tolist()) - {UNK, SOS, EOS, MASK})
                                   for r in ex["labels"]]
    assert not math.isclose(loss.item(), torch.nn.functional.binary_cross_entropy_with_logits(
        ex["logits"], bag.float()).item(), abs_tol=1e-3)


def _instances_file(root: Path, examples: dict) -> None:
    """The original's 10-image instances file, rebuilt from ``loss_examples``."""
    mapping = examples["multilabel_category_map"]
    per_image = examples["multilabel_annotations_per_image"]
    pairs = [(int(i), c) for i, cats in per_image.items() for c in cats]
    anns = [{"id": n, "image_id": i, "category_id": c} for n, (i, c) in enumerate(pairs)]
    data = {"images": [{"id": int(i), "file_name": f"{int(i):012d}.jpg"} for i in per_image],
            "annotations": anns,
            "categories": [{"id": int(c), "name": f"c{c}"} for c in mapping]}
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(data))


def test_multilabel_targets_and_loss_equal_the_originals(examples: dict, masked_lm: dict,
                                                         tmp_path: Path) -> None:
    loss_examples = masked_lm["loss_examples"]
    assert [int(c) for c in loss_examples["multilabel_category_map"]] == [*range(1, 12), 13, 90]
    _instances_file(tmp_path, loss_examples)
    labels, names = read_coco_instance_labels(tmp_path, "val2017")
    assert list(labels) == loss_examples["multilabel_image_ids_kept"]  # 3 and 8 dropped
    assert names == [f"c{c}" for c in loss_examples["multilabel_category_map"]]
    for image_id, expected in loss_examples["multilabel_labels_per_image"].items():
        assert labels[int(image_id)] == sorted(expected)
    assert labels[1] == [1, 3]  # annotations [1, 1, 1, 3]

    ex = examples["multilabel_classification"]
    assert ex["image_ids"].tolist() == loss_examples["multilabel_image_ids_kept"]
    for row, image_id in zip(ex["labels"], ex["image_ids"].tolist()):
        assert sorted(set(row.tolist()) - {0}) == labels[image_id]
    model = MultilabelClassificationModel(ResNetBackbone("resnet18"), num_classes=81)
    bag = torch.zeros(8, 81, dtype=torch.bool).scatter_(1, ex["labels"], True)
    bag[:, 0] = False
    loss = set_softmax_loss(ex["logits"], bag)
    assert model.num_classes == ex["logits"].shape[1] == 81
    assert abs(loss.item() - ex["loss"].item()) <= 1e-5
    assert abs(loss.item() - loss_examples["multilabel_classification_loss"]) <= 1e-5


def test_multilabel_spec_gives_81_classes() -> None:
    spec = Path(__file__).resolve().parents[1] / "specs/models/multilabel_classification.gin"
    text = spec.read_text()
    assert "tasks.multilabel_classification.num_classes = 81" in text
    assert "tasks.multilabel_classification.loss = 'softmax'" in text
