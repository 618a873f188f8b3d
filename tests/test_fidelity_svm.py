"""VOC07 linear-SVM protocol against the original ``train_test_single_svm`` result
(../shared/fidelity/svm): the same cost per class and the same test APs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fidelity import FIDELITY, needs_fidelity
from virtex.plugins.voc07.svm import voc07_svm_map

pytestmark = needs_fidelity


@pytest.mark.parametrize("cg_dtype", ["auto", torch.float32])
def test_svms_pick_the_originals_costs_and_reach_its_aps(cg_dtype):
    svm = FIDELITY / "svm"
    want = json.loads((svm / "svm_result.json").read_text())["result_as_is"]
    got = voc07_svm_map(*(torch.from_numpy(np.load(svm / f"{name}.npy")) for name in (
        "train_features", "train_labels_voc", "test_features", "test_labels_voc")),
        costs=(0.01, 0.1, 1.0, 10.0), folds=3, pos_weight=2.0, cg_dtype=cg_dtype)
    assert got["best_cost"] == [c["best_cost"] for c in want["per_class"]]
    for ours, theirs in zip(got["ap"], want["per_class"]):
        assert abs(ours / 100 - theirs["test_ap"]) <= 1e-4, theirs["class"]
    assert abs(got["mAP"] / 100 - want["mAP"]) <= 1e-4
