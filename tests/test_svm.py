"""The batched VOC07 linear-SVM protocol (virtex.plugins.voc07.svm) against scikit-learn."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from virtex.plugins.voc07.svm import (
    average_precision,
    fast_bf16,
    fit_linear_svms,
    l2_normalize,
    stratified_kfold,
    voc07_svm_map,
)

sklearn = pytest.importorskip("sklearn")
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.metrics import average_precision_score  # noqa: E402
from sklearn.model_selection import StratifiedKFold, cross_val_score  # noqa: E402
from sklearn.svm import LinearSVC  # noqa: E402

COSTS = (0.01, 0.1, 1.0, 10.0)


def make_problem(n_train: int = 600, n_test: int = 500, dim: int = 128, classes: int = 20,
                 seed: int = 2) -> tuple[np.ndarray, ...]:
    """Multi-label VOC-like features: ReLU of class-conditional Gaussians plus noise.

    Class signal strengths are spread so test APs range from ~20 to ~99% (seed 2: 23-98%, and
    cross-validation picks three different costs); about 10% of the positive labels are marked
    difficult (0).
    """
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    labels = rng.random((n, classes)) < rng.uniform(0.06, 0.25, classes)
    lonely = ~labels.any(1)
    labels[lonely, rng.integers(0, classes, lonely.sum())] = True
    strength = np.linspace(0.4, 1.2, classes)[rng.permutation(classes)]
    means = rng.standard_normal((classes, dim)) * 4 / np.sqrt(dim)
    feats = np.maximum(labels @ (means * strength[:, None]) + rng.standard_normal((n, dim)) + 0.5,
                       0)
    y = np.where(labels, 1, -1)
    y[labels & (rng.random((n, classes)) < 0.1)] = 0
    return feats[:n_train], y[:n_train], feats[n_train:], y[n_train:]


def liblinear(cost: float) -> LinearSVC:
    return LinearSVC(C=cost, class_weight={1: 2, -1: 1}, intercept_scaling=1.0, penalty="l2",
                     loss="squared_hinge", tol=1e-4, dual=True, max_iter=2000)


def sklearn_protocol(train_x, train_y, test_x, test_y, costs=COSTS) -> dict:
    """The reference: per class, LinearSVC per cost, 3-fold cross_val_score AP, refit, test AP."""
    train_x = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    test_x = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    aps, best = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for k in range(train_y.shape[1]):
            y = np.where(train_y[:, k] == 1, 1, -1)
            cv = [cross_val_score(liblinear(c), train_x, y, cv=3,
                                  scoring="average_precision").mean() for c in costs]
            cost = costs[int(np.argmax(cv))]
            scores = liblinear(cost).fit(train_x, y).decision_function(test_x)
            keep = test_y[:, k] != 0
            aps.append(100 * average_precision_score(test_y[keep, k] == 1, scores[keep]))
            best.append(cost)
    return {"mAP": float(np.mean(aps)), "ap": aps, "best_cost": best}


def primal_objective(w: np.ndarray, b: float, x: np.ndarray, y: np.ndarray, cost: float) -> float:
    """liblinear's objective: 0.5 |[w, b]|^2 + C sum_i c_i max(0, 1 - y_i (w.x_i + b))^2."""
    slack = np.maximum(0, 1 - y * (x @ w + b))
    return 0.5 * (w @ w + b * b) + cost * np.sum(np.where(y > 0, 2.0, 1.0) * slack**2)


@pytest.fixture(scope="module")
def problem() -> tuple[np.ndarray, ...]:
    return make_problem()


@pytest.fixture(scope="module")
def reference(problem) -> dict:
    return sklearn_protocol(*problem)


@pytest.fixture(scope="module")
def ours(problem) -> dict:
    return voc07_svm_map(*(torch.as_tensor(a) for a in problem))


def test_l2_normalize_gives_unit_rows_and_keeps_zero_rows():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [-1.0, 0.0]])
    assert torch.allclose(l2_normalize(x), torch.tensor([[0.6, 0.8], [0.0, 0.0], [-1.0, 0.0]]))


def test_stratified_folds_are_sklearns():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(100):
        n, splits = int(rng.integers(6, 80)), int(rng.integers(2, 6))
        y = np.where(rng.random((n, 4)) < rng.uniform(0.1, 0.9), 1, -1)
        ours = stratified_kfold(torch.as_tensor(y), splits).numpy()
        for k in range(y.shape[1]):
            if min((y[:, k] == 1).sum(), (y[:, k] == -1).sum()) < splits:
                continue  # sklearn warns or refuses; the protocol never gets there on VOC
            expected = np.empty(n, dtype=np.int64)
            for fold, (_, test) in enumerate(StratifiedKFold(splits).split(y[:, k], y[:, k])):
                expected[test] = fold
            np.testing.assert_array_equal(ours[:, k], expected)
            checked += 1
    assert checked > 200


def test_average_precision_is_sklearns_with_ties_and_ignored_labels():
    rng = np.random.default_rng(0)
    scores = np.round(rng.standard_normal((300, 12)), 1)  # many tied scores
    targets = rng.choice([-1, 0, 1], size=(300, 12), p=[0.6, 0.1, 0.3])
    targets[:, 0] = np.where(targets[:, 0] == 1, -1, targets[:, 0])  # no positives: AP 0
    scores[:, 1] = 0.5  # a single tie group: AP = positive rate
    ours = average_precision(torch.as_tensor(scores), torch.as_tensor(targets)).numpy()
    for k in range(12):
        keep = targets[:, k] != 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = average_precision_score(targets[keep, k] == 1, scores[keep, k])
        assert ours[k] == pytest.approx(expected, abs=1e-6)
    one = average_precision(torch.as_tensor(scores[:, 2]), torch.as_tensor(targets[:, 2]))
    assert one.shape == () and float(one) == pytest.approx(ours[2], abs=1e-12)


def test_svm_objective_is_at_most_liblinears(problem):
    train_x, train_y, _, _ = problem
    x = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    y = np.where(train_y == 1, 1, -1)
    weights, biases = fit_linear_svms(torch.as_tensor(x), torch.as_tensor(y), COSTS)
    assert weights.shape == (4, 20, x.shape[1]) and biases.shape == (4, 20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for m, k in [(0, 0), (1, 3), (2, 7), (3, 11), (3, 4), (2, 19)]:
            cost = COSTS[m]
            clf = liblinear(cost).fit(x, y[:, k])
            theirs = primal_objective(clf.coef_[0], clf.intercept_[0], x, y[:, k], cost)
            ours = primal_objective(weights[m, k].numpy(), float(biases[m, k]), x, y[:, k], cost)
            assert ours <= theirs * (1 + 1e-4), (cost, k, ours, theirs)
            assert ours >= theirs * (1 - 1e-2)  # the same problem, not a different one


def test_masked_rows_are_left_out_of_training(problem):
    train_x, train_y, _, _ = problem
    x = l2_normalize(torch.as_tensor(train_x))
    y = torch.as_tensor(np.where(train_y[:, :3] == 1, 1, -1))
    keep = torch.arange(len(x)) % 3 != 1
    masks = torch.stack([keep[:, None].expand(-1, 3), torch.ones(len(x), 3, dtype=torch.bool)])
    w, b = fit_linear_svms(x, y, [0.1, 10.0], masks=masks)
    assert w.shape == (2, 2, 3, x.shape[1]) and b.shape == (2, 2, 3)
    w_sub, b_sub = fit_linear_svms(x[keep], y[keep], [0.1, 10.0])
    w_all, b_all = fit_linear_svms(x, y, [0.1, 10.0])
    for (wm, bm), (ws, bs) in [((w[0], b[0]), (w_sub, b_sub)), ((w[1], b[1]), (w_all, b_all))]:
        scale = x.norm(dim=1).max() * ws.norm(dim=-1).max()
        assert (x @ wm.reshape(-1, x.shape[1]).T - x @ ws.reshape(-1, x.shape[1]).T).abs().max() \
            <= 1e-3 * scale
        assert (bm - bs).abs().max() <= 1e-3 * scale


def test_protocol_matches_sklearn(ours, reference):
    result = ours
    assert set(result) == {"mAP", "ap", "best_cost"}
    assert len(result["ap"]) == 20 and len(result["best_cost"]) == 20
    assert result["mAP"] == pytest.approx(np.mean(result["ap"]), abs=1e-9)
    assert 20 < min(reference["ap"]) and max(reference["ap"]) < 100  # a spread of difficulties
    assert abs(result["mAP"] - reference["mAP"]) <= 0.2
    same = np.mean(np.array(result["best_cost"]) == np.array(reference["best_cost"]))
    assert same >= 0.8, (result["best_cost"], reference["best_cost"])
    assert np.abs(np.array(result["ap"]) - np.array(reference["ap"])).max() <= 2.0


@pytest.mark.parametrize("options", [{"compute_dtype": torch.float64},
                                     {"cg_dtype": torch.float32},
                                     {"cg_dtype": torch.bfloat16}],
                         ids=["float64", "float32-cg", "bf16-cg"])
def test_solver_precision_options_agree(problem, ours, options):
    """float64 products throughout, float32 or bf16 ones inside CG (the default, "auto", picks
    one of them by hardware): the same optimum, up to tol."""
    result = voc07_svm_map(*(torch.as_tensor(a) for a in problem), **options)
    assert result["best_cost"] == ours["best_cost"]
    assert np.abs(np.array(result["ap"]) - np.array(ours["ap"])).max() <= 0.05


def test_cg_dtype_auto_follows_the_hardware_and_rejects_other_strings(problem):
    train_x, train_y, _, _ = problem
    x = l2_normalize(torch.as_tensor(train_x[:100]))
    y = torch.as_tensor(np.where(train_y[:100, :2] == 1, 1, -1))
    auto = fit_linear_svms(x, y, [1.0])
    expected = torch.bfloat16 if fast_bf16(x.device) else None
    explicit = fit_linear_svms(x, y, [1.0], cg_dtype=expected)
    assert all(torch.equal(a, b) for a, b in zip(auto, explicit))
    with pytest.raises(ValueError, match="cg_dtype must be a torch dtype"):
        fit_linear_svms(x, y, [1.0], cg_dtype="bf16")


def test_protocol_on_a_tiny_split_without_positives():
    """VOC-shaped labels on a handful of images: classes with no positives still get an AP."""
    gen = torch.Generator().manual_seed(0)
    train_x, test_x = torch.rand(30, 64, generator=gen), torch.rand(10, 64, generator=gen)
    train_y = torch.full((30, 20), -1)
    train_y[torch.arange(30), torch.randint(0, 10, (30,), generator=gen)] = 1
    test_y = torch.full((10, 20), -1)
    test_y[torch.arange(10), torch.randint(0, 10, (10,), generator=gen)] = 1
    result = voc07_svm_map(train_x, train_y, test_x, test_y)
    assert all(0 <= ap <= 100 for ap in result["ap"]) and result["ap"][15] == 0.0
    assert np.isfinite(result["mAP"])


def test_every_tensor_follows_the_inputs_device():
    """With the default device set to "meta", a tensor made without ``device=`` would break the
    run: the CPU-only stand-in for running on CUDA."""
    gen = torch.Generator().manual_seed(0)
    args = []
    for n in (120, 60):
        labels = torch.where(torch.rand(n, 5, generator=gen) < 0.3, 1, -1)
        args += [torch.rand(n, 40, generator=gen), labels]  # train_x, train_y, test_x, test_y
    expected = voc07_svm_map(*args)
    torch.set_default_device("meta")
    try:
        result = voc07_svm_map(*args)
        weights, _ = fit_linear_svms(args[0][:30], args[1][:30], [1.0])  # N < D branch
    finally:
        torch.set_default_device(None)
    assert result == expected and weights.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(problem, ours):
    cpu = ours
    gpu = voc07_svm_map(*(torch.as_tensor(a).cuda() for a in problem))
    assert gpu["best_cost"] == cpu["best_cost"]
    assert gpu["mAP"] == pytest.approx(cpu["mAP"], abs=0.01)
