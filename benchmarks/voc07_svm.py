"""Seconds for the VOC07 linear-SVM protocol: scikit-learn's liblinear loop vs. the batched solver.

    python benchmarks/voc07_svm.py [--n_train 5011 --n_test 4952 --dim 2048 --device cpu|cuda]
                                   [--quick] [--reference_jobs 1] [--no_reference] [--float32_cg]

Both methods run in this process on the same synthetic features, VOC2007-sized by default:
5011 trainval / 4952 test images, 2048-d ReLU features (like ResNet-50's pooled ones), the 20
classes with VOC07 trainval's positive counts, about 10% of positives marked difficult. The
reference is the protocol as published (per class: ``LinearSVC`` per cost, 3-fold
``cross_val_score`` average precision, refit with the best cost, ``average_precision_score``
on test), one class after another like the original script, or over ``--reference_jobs``
processes. Ours is ``virtex.plugins.voc07.svm.voc07_svm_map`` on ``--device`` (timed after one
small warm-up call that initialises the device's libraries). ``--quick`` shrinks the problem
(1500 / 1500 images, 512-d). Prints a markdown table and how far the two agree.

``OMP_WAIT_POLICY`` defaults to ``PASSIVE`` here (export it to override): with OpenMP's
default spin-waiting, torch's CPU threads on a machine shared with other jobs can spend most
of their time spinning at barriers (seen: 3x slower on 2 busy cores). It changes nothing for
the single-threaded liblinear reference.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import argparse  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import timed  # noqa: E402
from virtex.plugins.voc07.svm import fast_bf16, voc07_svm_map  # noqa: E402

COSTS = (0.01, 0.1, 1.0, 10.0)
# Positive images per class in VOC2007 trainval (aeroplane ... tvmonitor), out of 5011.
VOC07_TRAINVAL_POSITIVES = (238, 243, 330, 181, 244, 186, 713, 337, 445, 141, 200, 421, 287, 245,
                            2008, 245, 96, 229, 261, 256)


def make_features(n_train: int, n_test: int, dim: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Synthetic VOC-like multi-label features (float32) and labels in {1, -1, 0}.

    Labels follow VOC07's class frequencies (every image has at least one). Features are the
    ReLU of a class signal (a random direction per present class, its strength spread over
    classes so APs span ~30-95%), a 64-d shared "scene" component with decaying scales, and
    isotropic noise: non-negative, correlated and of full rank, like pooled CNN features.
    """
    rng = np.random.default_rng(seed)
    n, k = n_train + n_test, len(VOC07_TRAINVAL_POSITIVES)
    prior = np.asarray(VOC07_TRAINVAL_POSITIVES) / 5011
    labels = rng.random((n, k)) < prior
    lonely = ~labels.any(1)
    labels[lonely, rng.choice(k, lonely.sum(), p=prior / prior.sum())] = True
    strength = np.linspace(0.1, 0.4, k)[rng.permutation(k)] * np.sqrt(2048 / dim)
    prototypes = rng.standard_normal((k, dim)).astype(np.float32) * strength[:, None]
    scene = rng.standard_normal((64, dim)).astype(np.float32) / np.sqrt(np.arange(1, 65))[:, None]
    feats = (labels.astype(np.float32) @ prototypes
             + rng.standard_normal((n, 64)).astype(np.float32) @ scene
             + 2.0 * rng.standard_normal((n, dim)).astype(np.float32) + 1.0)
    np.maximum(feats, 0, out=feats)
    y = np.where(labels, 1, -1)
    y[labels & (rng.random((n, k)) < 0.1)] = 0
    return feats[:n_train], y[:n_train], feats[n_train:], y[n_train:]


def _reference_class(train_x: np.ndarray, y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray
                     ) -> tuple[float, float]:
    """One class of the published protocol: (test AP in percent, chosen cost)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import average_precision_score
    from sklearn.model_selection import cross_val_score
    from sklearn.svm import LinearSVC

    def svm(cost: float) -> LinearSVC:
        return LinearSVC(C=cost, class_weight={1: 2, -1: 1}, intercept_scaling=1.0, penalty="l2",
                         loss="squared_hinge", tol=1e-4, dual=True, max_iter=2000)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        cv = [cross_val_score(svm(c), train_x, y, cv=3, scoring="average_precision").mean()
              for c in COSTS]
        cost = COSTS[int(np.argmax(cv))]
        scores = svm(cost).fit(train_x, y).decision_function(test_x)
    keep = test_y != 0
    return 100 * float(average_precision_score(test_y[keep] == 1, scores[keep])), cost


def reference_protocol(train_x, train_y, test_x, test_y, jobs: int = 1) -> dict:
    """scikit-learn's protocol on all classes, sequentially (``jobs=1``) or over processes."""
    train_x = (train_x / np.linalg.norm(train_x, axis=1, keepdims=True)).astype(np.float64)
    test_x = (test_x / np.linalg.norm(test_x, axis=1, keepdims=True)).astype(np.float64)
    args = [(train_x, np.where(train_y[:, k] == 1, 1, -1), test_x, test_y[:, k])
            for k in range(train_y.shape[1])]
    if jobs == 1:
        out = [_reference_class(*a) for a in args]
    else:
        from joblib import Parallel, delayed

        out = Parallel(n_jobs=jobs)(delayed(_reference_class)(*a) for a in args)
    aps = [ap for ap, _ in out]
    return {"mAP": float(np.mean(aps)), "ap": aps, "best_cost": [c for _, c in out]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n_train", type=int, default=5011)
    parser.add_argument("--n_test", type=int, default=4952)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="1500 / 1500 images, 512-d")
    parser.add_argument("--reference_jobs", type=int, default=1,
                        help="processes for the scikit-learn reference (classes in parallel)")
    parser.add_argument("--no_reference", action="store_true", help="skip scikit-learn")
    parser.add_argument("--float32_cg", action="store_true",
                        help="also time ours with float32 Hessian-vector products inside CG "
                             "(the default uses bfloat16 where the hardware has it)")
    args = parser.parse_args()
    if args.quick:
        args.n_train, args.n_test, args.dim = 1500, 1500, 512
    device = torch.device(args.device)

    train_x, train_y, test_x, test_y = make_features(args.n_train, args.n_test, args.dim, args.seed)
    print(f"features: {args.n_train} trainval / {args.n_test} test, {args.dim}-d, "
          f"{train_y.shape[1]} classes; torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads, {os.cpu_count()} CPUs, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}", flush=True)

    tensors = [torch.as_tensor(a).to(device) for a in (train_x, train_y, test_x, test_y)]
    small = [t[:200] for t in tensors[:2]] + [t[:100] for t in tensors[2:]]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    auto = "bfloat16" if fast_bf16(device) else "float32"
    variants = [(f"virtex batched Newton (ours, default: CG products in {auto})", {})]
    if args.float32_cg:
        variants.append(("ours, float32 products inside CG", {"cg_dtype": torch.float32}))
    rows, results = [], []  # rows: (method, device, seconds, mAP)
    for label, options in variants:
        voc07_svm_map(*small, **options)  # warm-up
        seconds, result = timed(lambda options=options: voc07_svm_map(*tensors, **options),
                                device)
        rows.append((label, name, seconds, result["mAP"]))
        results.append((label, result))
        print(f"{label}: {seconds:.2f} s, mAP {result['mAP']:.2f}", flush=True)

    if not args.no_reference:
        ref_s, ref = timed(lambda: reference_protocol(train_x, train_y, test_x, test_y,
                                                       args.reference_jobs), torch.device("cpu"))
        label = "scikit-learn LinearSVC (reference)"
        if args.reference_jobs != 1:
            label += f", {args.reference_jobs} processes"
        rows.insert(0, (label, "cpu", ref_s, ref["mAP"]))
        print(f"reference: {ref_s:.2f} s, mAP {ref['mAP']:.2f}", flush=True)

    base = rows[0][2]
    print("\n| method | device | time (s) | mAP | speed-up |\n|---|---|---:|---:|---:|")
    for method, dev, seconds, m in rows:
        print(f"| {method} | {dev} | {seconds:.2f} | {m:.2f} | {base / seconds:.1f}x |")
    print()
    for label, result in results:
        if not args.no_reference:
            diff = np.abs(np.asarray(result["ap"]) - np.asarray(ref["ap"]))
            same = np.mean(np.asarray(result["best_cost"]) == np.asarray(ref["best_cost"]))
            print(f"{label} vs reference: |mAP difference| {abs(result['mAP'] - ref['mAP']):.4f}"
                  f" points; per-class AP difference max {diff.max():.4f}, mean "
                  f"{diff.mean():.4f}; same best cost for {same:.0%} of classes")
    if not args.no_reference:
        print("best costs (reference):", ref["best_cost"])
    print("best costs (ours):     ", results[0][1]["best_cost"])
    print("APs (ours):", np.round(results[0][1]["ap"], 1).tolist())


if __name__ == "__main__":
    main()
