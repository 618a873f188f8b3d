"""The VOC07 linear-SVM protocol (PIRL / FAIR self-supervision benchmark), batched in torch.

Every (fold, cost, class) SVM of the protocol is solved at once: frozen features,
L2-normalised per row, one liblinear-style L2-regularised squared-hinge SVM per class
and cost, the cost picked per class by the mean average precision of a 3-fold
stratified cross-validation on trainval (the folds scikit-learn's ``cross_val_score``
uses for a classifier), the winner refit on all of trainval and scored on test with
``average_precision_score``'s (non-interpolated) AP, difficult examples ignored.

Each SVM minimises, as liblinear does for ``LinearSVC(loss="squared_hinge", dual=True,
intercept_scaling=1, class_weight={1: pos_weight, -1: 1})``::

    0.5 * (|w|^2 + b^2) + C * sum_i c_i * max(0, 1 - y_i * (w.x_i + b))^2

(``c_i = pos_weight`` on positives, 1 on negatives; the bias is an extra feature of value 1
and is regularised with ``w``). It is convex, piecewise quadratic and once differentiable;
it is solved by a batched Newton method on the generalised Hessian
``I + X^T diag(2 C c_i [margin_i < 1]) X``: directions by preconditioned conjugate
gradients whose Hessian-vector products are two matrix products for the whole batch, steps
by an exact line search. The features are rotated once into the eigenbasis of ``X^T X`` (an
orthogonal change of variables, so the problem is unchanged), where the Hessian is nearly
diagonal apart from its leading directions; the preconditioner is that diagonal plus the
exact leading ``block x block`` corner of every problem's Hessian. The rotation and products
with the features run in ``compute_dtype`` (float32 by default); iterates, margins,
objectives and the line search are float64. The Hessian-vector products inside CG run in
``cg_dtype``: bfloat16 by default on hardware that multiplies it natively, where it halves
the solver's time without changing the optimum it converges to (only the search directions
get rougher). A problem stops when its Newton decrement is below ``tol`` (1e-6) of its
objective (measured: within ~1e-7 of the optimal objective, relatively), and leaves the
batch. Everything runs on the device of the inputs.

scikit-learn is not needed at run time (tests compare against it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

__all__ = [
    "average_precision",
    "fast_bf16",
    "fit_linear_svms",
    "l2_normalize",
    "stratified_kfold",
    "voc07_svm_map",
]


def l2_normalize(x: Tensor) -> Tensor:
    """Rows of ``x`` scaled to unit L2 norm (all-zero rows stay zero)."""
    norm = x.norm(dim=1, keepdim=True)
    return x / torch.where(norm > 0, norm, torch.ones_like(norm))


def stratified_kfold(y: Tensor, n_splits: int = 3) -> Tensor:
    """Test-fold index per sample and column, as scikit-learn's ``StratifiedKFold`` (no shuffle).

    ``y`` is (N, K) with binary labels per column (any two values); returns (N, K) int64 in
    ``[0, n_splits)``. Per column, labels are numbered by order of first appearance; fold ``f``
    receives as many samples of label ``j`` as the round-robin ``sorted(y)[f::n_splits]``
    holds, and the samples of each label go to the folds in blocks, in data order.
    """
    y = y.reshape(y.shape[0], -1)
    n, s = y.shape[0], n_splits
    first = y[:1] == y  # label of the first sample: number 0
    n0 = first.sum(0)  # (K,)
    f = torch.arange(s, device=y.device)

    def hits(count: Tensor) -> Tensor:
        """How many of positions 0..count-1 fall in each residue class f (mod s): (K, s)."""
        return torch.div(count[:, None] - f[None] + s - 1, s, rounding_mode="floor").clamp(min=0)

    total = torch.full_like(n0, n)
    alloc0 = hits(n0)
    alloc1 = hits(total) - alloc0  # sorted labels: n0 zeros, then the other label
    rank = torch.where(first, first.cumsum(0), (~first).cumsum(0)) - 1  # rank within label
    bounds = torch.where(first[..., None], alloc0.cumsum(1)[None], alloc1.cumsum(1)[None])
    return (rank[..., None] >= bounds[..., :-1]).sum(-1)


@torch.no_grad()
def average_precision(scores: Tensor, targets: Tensor) -> Tensor:
    """Per-column average precision, as scikit-learn's ``average_precision_score``.

    ``scores`` and ``targets`` are (N, K) (or (N,)); targets are 1 (positive), -1 (negative)
    or 0 (ignored). AP = sum over distinct score thresholds of (recall gain) x (precision
    there), tied scores forming one threshold. A column without positives gets 0.
    """
    squeeze = scores.dim() == 1
    scores = scores.reshape(scores.shape[0], -1).double()
    targets = targets.reshape(targets.shape[0], -1).to(scores.device)
    if scores.shape[0] == 0:
        out = torch.zeros(scores.shape[1], dtype=torch.float64, device=scores.device)
        return out[0] if squeeze else out
    s, order = scores.sort(dim=0, descending=True)
    t = targets.gather(0, order)
    pos, neg = (t > 0).double(), (t < 0).double()
    tp, fp = pos.cumsum(0), neg.cumsum(0)
    # Last index of every run of equal scores; each entry looks up the end of its run.
    n = s.shape[0]
    idx = torch.arange(n, device=s.device)[:, None].expand_as(s)
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]
    end = torch.where(last, idx, torch.full_like(idx, n - 1)).flip(0).cummin(0).values.flip(0)
    tp_end, fp_end = tp.gather(0, end), fp.gather(0, end)
    precision = tp_end / (tp_end + fp_end).clamp(min=1)
    npos = pos.sum(0)
    out = (pos * precision).sum(0) / npos.clamp(min=1)
    return out[0] if squeeze else out


# ----------------------------------------------------------------------------- solver


@contextmanager
def _lapack_threads(device: torch.device) -> Iterator[None]:
    """One CPU thread for LAPACK calls: multi-threaded MKL factorisations are barrier-bound and
    can run tens of times slower on a busy machine, for little gain on a quiet one."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _rotate(xb: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Orthonormal ``V`` (D, r) spanning the row space of ``xb`` and ``Z = xb V`` (N, r).

    Columns are ordered by decreasing ``|Z e_j|^2`` (eigenvalues of ``xb^T xb``), so ``Z^T Z``
    is diagonal and ``w = V z`` maps solutions back. The Gram matrix, its eigenvectors and
    ``Z`` are computed in ``dtype``: in float32, ``V`` is orthonormal to ~1e-6 (measured at
    VOC size: max |V^T V - I| = 1.3e-6), so ``|w|`` and ``|z|`` differ by that relative amount,
    far below the solver's stopping tolerance; a float32 eigendecomposition takes a third of
    the time of a float64 one. ``V`` is returned in float64.
    """
    n, d = xb.shape
    if n >= d:
        xc = xb.to(dtype)
        gram = xc.T @ xc
        with _lapack_threads(xb.device):
            ev, vec = torch.linalg.eigh(gram)
        ev, vec = ev.flip(0), vec.flip(1)
        # Directions below the rounding level of the eigensolver carry no information.
        v = vec[:, ev > ev[0].clamp(min=0) * max(1e-12, torch.finfo(dtype).eps)]
        return xc @ v, v.double()
    gram = xb @ xb.T  # fewer samples than dimensions: work in the N-dim sample space
    with _lapack_threads(xb.device):
        ev, u = torch.linalg.eigh(gram)
    ev, u = ev.flip(0), u.flip(1)
    keep = ev > ev[0].clamp(min=0) * 1e-12
    sv = ev[keep].sqrt()
    return (u[:, keep] * sv).to(dtype), (xb.T @ u[:, keep]) / sv


def fast_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively (and so faster than float32):
    CPUs with AVX512-BF16 or AMX-BF16, CUDA GPUs of compute capability 8.0 or newer."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    return False


class _Operator:
    """The rotated features ``Z`` (N, r) in the compute dtype, for problem-major products."""

    def __init__(self, z: Tensor, block: int, dtype: torch.dtype, cg_dtype: torch.dtype):
        self.dtype, self.cg_dtype = dtype, cg_dtype
        self.z = z.to(dtype).contiguous()  # (N, r): U @ Z
        self.zt = self.z.T.contiguous()  # (r, N): P @ Z^T
        self.z_cg, self.zt_cg = self.z.to(cg_dtype), self.zt.to(cg_dtype)
        self.r = self.z.shape[1]
        self.q = min(block, self.r)
        self.iu = torch.triu_indices(self.q, self.q, device=z.device)
        zq = self.z[:, : self.q]
        # Per problem, the diagonal of Z^T diag(a) Z (sums of non-negative terms, so the CG
        # dtype is safe: any positive diagonal is a valid preconditioner) and the upper
        # triangle of its leading q x q block (in the compute dtype: it must stay positive
        # definite).
        self.diag_sketch = (self.z * self.z).to(cg_dtype)
        self.block_sketch = zq[:, self.iu[0]] * zq[:, self.iu[1]]

    def forward(self, p: Tensor) -> Tensor:
        """``Z p`` for every row ``p`` of (b, r): (b, N)."""
        return p @ self.zt

    def backward(self, u: Tensor) -> Tensor:
        """``Z^T u`` for every row ``u`` of (b, N): (b, r)."""
        return u @ self.z

    def hessian_product(self, p: Tensor, a: Tensor) -> Tensor:
        """``(I + Z^T diag(a) Z) p`` for every row of ``p`` (b, r), the products in the CG dtype."""
        zp = p.to(self.cg_dtype) @ self.zt_cg
        return p + ((a * zp).to(self.cg_dtype) @ self.z_cg).to(p.dtype)

    def preconditioner(self, a: Tensor) -> tuple[Tensor, Tensor]:
        """Diagonal (b, r) and inverse leading block (b, q, q) of ``I + Z^T diag(a) Z``."""
        diag = 1.0 + (a.to(self.cg_dtype) @ self.diag_sketch).to(self.dtype)
        q, b = self.q, a.shape[0]
        tri = (a @ self.block_sketch).double()
        h = torch.zeros(b, q, q, dtype=torch.float64, device=a.device)
        h[:, self.iu[0], self.iu[1]] = tri
        h[:, self.iu[1], self.iu[0]] = tri
        h.diagonal(dim1=1, dim2=2).add_(1.0)
        with _lapack_threads(h.device):
            block_inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
        return diag, block_inv.to(self.dtype)


def _apply_preconditioner(res: Tensor, diag: Tensor, block_inv: Tensor) -> Tensor:
    out = res / diag
    q = block_inv.shape[1]
    out[:, :q] = torch.bmm(block_inv, res[:, :q, None]).squeeze(2)
    return out


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot products of two (b, n) tensors without a (b, n) temporary."""
    return torch.einsum("bn,bn->b", a, b)


def _pcg(op: _Operator, a: Tensor, rhs: Tensor, diag: Tensor, block_inv: Tensor,
         rtol: float, max_iter: int) -> Tensor:
    """Solve ``(I + Z^T diag(a_j) Z) d_j = rhs_j`` for every row ``j`` of ``rhs`` (b, r).

    Preconditioned CG to ``|residual| <= rtol |rhs|`` per row, in the compute dtype. Finished
    rows are frozen (zero search direction) and, once a tenth of the batch is frozen, dropped
    from it, so the matrix products shrink as problems converge.
    """
    d = torch.zeros_like(rhs)
    rows = torch.arange(rhs.shape[0], device=rhs.device)
    res = rhs.clone()
    p = _apply_preconditioner(res, diag, block_inv)
    rz = (res * p).sum(1)
    stop = rtol**2 * (res * res).sum(1)
    dw = torch.zeros_like(rhs)
    running = stop > 0
    for _ in range(max_iter):
        hp = op.hessian_product(p, a)
        php = (p * hp).sum(1)
        alpha = torch.where(php > 0, rz / php, torch.zeros_like(php))[:, None]
        dw.addcmul_(alpha, p)
        res.addcmul_(alpha, hp, value=-1)
        running &= (res * res).sum(1) > stop
        n_running = int(running.sum())
        if n_running == 0:
            break
        if n_running <= 0.9 * running.numel():
            d[rows[~running]] = dw[~running]
            keep = running
            rows, a, diag, block_inv = rows[keep], a[keep], diag[keep], block_inv[keep]
            p, res, rz, stop, dw = p[keep], res[keep], rz[keep], stop[keep], dw[keep]
            running = running[keep]
        pz = _apply_preconditioner(res, diag, block_inv)
        rz_new = (res * pz).sum(1)
        p = torch.where(running[:, None], pz + (rz_new / rz)[:, None] * p, 0)
        rz = rz_new
    d[rows] = dw
    return d


def _line_search(w: Tensor, slack: Tensor, d: Tensor, e: Tensor, y: Tensor, lam: Tensor,
                 max_iter: int = 50) -> Tensor:
    """Exact minimiser ``t`` of the objective along ``w + t d`` for every row (problem).

    ``slack = 1 - y * f`` at ``t = 0`` and ``e = Z d``, so the slack at ``t`` is
    ``slack - t * y * e``. The derivative in ``t`` is continuous, piecewise linear and
    nondecreasing: safeguarded Newton steps inside a bracket, which land on the root once they
    reach its linear piece.
    """
    wd, dd = (w * d).sum(1), (d * d).sum(1)
    ye = y * e
    lam_ye = lam * ye
    lam_ee = lam_ye * ye
    t = torch.ones_like(wd)
    lo, hi = torch.zeros_like(wd), torch.full_like(wd, float("inf"))
    done = torch.zeros_like(wd, dtype=torch.bool)
    for _ in range(max_iter):
        m = torch.addcmul(slack, ye, t[:, None], value=-1).clamp_(min=0)
        g1 = wd + t * dd - _rowdot(lam_ye, m)
        g2 = dd + _rowdot(lam_ee, m.sign_())
        step = t - g1 / g2.clamp(min=1e-300)
        # A Newton step that barely moves t means t is the root (up to rounding): keep it.
        done |= (step - t).abs() <= 1e-10 * t.abs().clamp(min=1)
        lo = torch.where(g1 < 0, t, lo)
        hi = torch.where(g1 > 0, t, hi)
        outside = (step <= lo) | (step >= hi)
        fallback = torch.where(torch.isinf(hi), 2 * t, 0.5 * (lo + hi))
        t = torch.where(done, t, torch.where(outside, fallback, step))
        if bool(done.all()):
            break
    return t


def _newton(op: _Operator, y: Tensor, lam: Tensor, max_iter: int, tol: float, cg_rtol: float,
            max_cg: int) -> Tensor:
    """Batched Newton method; row ``j`` of the result (B, r) minimises
    ``0.5 |z|^2 + 0.5 sum_i lam_ji max(0, 1 - y_ji (Z z)_i)^2`` (``y``, ``lam``: (B, N)).

    A problem stops once its Newton decrement (what the quadratic model promises) is at most
    ``tol`` times its objective; the step along that last direction is still taken. Finished
    problems leave the batch.
    """
    nb = y.shape[0]
    out = torch.zeros(nb, op.r, dtype=torch.float64, device=y.device)
    ids = torch.arange(nb, device=y.device)
    w = torch.zeros_like(out)
    f = torch.zeros_like(y)
    for _ in range(max_iter):
        slack = 1 - y * f
        m = slack.clamp(min=0)
        lam_m = lam * m
        a = torch.where(slack > 0, lam, 0).to(op.dtype)
        grad = w - op.backward((lam_m * y).to(op.dtype)).double()
        objective = 0.5 * (w * w).sum(1) + 0.5 * _rowdot(lam_m, m)
        diag, block_inv = op.preconditioner(a)
        d = _pcg(op, a, (-grad).to(op.dtype), diag, block_inv, cg_rtol, max_cg)
        e = op.forward(d)
        d = d.double()
        decrement = -(grad * d).sum(1)  # d^T H d for the exact Newton direction
        t = torch.where(decrement > 0, _line_search(w, slack, d, e, y, lam), 0)[:, None]
        w.addcmul_(t, d)
        f.addcmul_(t, e)
        done = 0.5 * decrement <= tol * objective
        if bool(done.any()):
            out[ids[done]] = w[done]
            keep = ~done
            ids, w, f, y, lam = ids[keep], w[keep], f[keep], y[keep], lam[keep]
            if ids.numel() == 0:
                return out
    out[ids] = w
    return out


@torch.no_grad()
def fit_linear_svms(x: Tensor, y: Tensor, costs: Tensor | Sequence[float], pos_weight: float = 2.0,
                    max_iter: int = 100, tol: float = 1e-6, *, masks: Tensor | None = None,
                    block: int = 64, cg_rtol: float = 0.1, max_cg: int = 500,
                    compute_dtype: torch.dtype = torch.float32,
                    cg_dtype: torch.dtype | str | None = "auto") -> tuple[Tensor, Tensor]:
    """Weights (M, K, D) and biases (M, K) of every (cost, class) SVM, solved as one batch.

    ``x`` (N, D) are the features as given (not normalised here); ``y`` (N, K) the labels,
    ``> 0`` positive, anything else negative. Each SVM minimises liblinear's primal
    ``0.5 (|w|^2 + b^2) + C sum_i c_i max(0, 1 - y_i (w.x_i + b))^2`` with ``c_i = pos_weight``
    on positives. ``masks`` (G, N, K), optional, selects the training samples of G problem sets
    (e.g. cross-validation folds); the outputs then gain a leading G axis. ``max_iter`` bounds
    the Newton iterations, ``tol`` is the relative Newton decrement at which a problem stops.
    ``block`` is the size of the exact leading block of the preconditioner, ``cg_rtol`` the
    relative residual at which CG stops. Products with the (rotated) features run in
    ``compute_dtype``; ``cg_dtype`` may lower the precision of the Hessian-vector products
    inside CG only: directions get less exact, gradients, objectives and steps do not, so the
    solution is as exact but may take more iterations. ``"auto"`` (the default) is
    ``torch.bfloat16`` when ``compute_dtype`` is float32 and the device multiplies bf16
    natively (:func:`fast_bf16`), else ``compute_dtype``; ``None`` means ``compute_dtype``.
    Computation runs on ``x``'s device; results are float64.
    """
    device = x.device
    xb = torch.cat([x.to(device, torch.float64),
                    torch.ones(x.shape[0], 1, dtype=torch.float64, device=device)], 1)
    costs_t = torch.as_tensor(costs, dtype=torch.float64, device=device).reshape(-1)
    yb = torch.where(y.to(device) > 0, 1.0, -1.0).to(torch.float64).reshape(x.shape[0], -1)
    n, k, nc = xb.shape[0], yb.shape[1], costs_t.numel()
    grouped = masks is not None
    if masks is None:
        masks = torch.ones(1, n, k, dtype=torch.bool, device=device)
    masks = masks.to(device).reshape(-1, n, k)
    g = masks.shape[0]
    weight = torch.where(yb > 0, float(pos_weight), 1.0)  # (N, K)
    # Problem j = (group, cost, class), class fastest; one row of y and lam per problem.
    lam = 2 * costs_t[None, :, None, None] * (weight * masks).transpose(1, 2)[:, None]
    lam = lam.reshape(g * nc * k, n)  # 2 C c_i [i in the training set]: (G*M*K, N)
    ys = yb.T[None, None].expand(g, nc, k, n).reshape(g * nc * k, n)

    if cg_dtype == "auto":
        cg_dtype = (torch.bfloat16 if compute_dtype == torch.float32 and fast_bf16(device)
                    else compute_dtype)
    elif isinstance(cg_dtype, str):
        raise ValueError(f"cg_dtype must be a torch dtype, None or 'auto', got {cg_dtype!r}")
    z, v = _rotate(xb, compute_dtype)
    op = _Operator(z, block, compute_dtype, cg_dtype or compute_dtype)
    del z
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        zw = _newton(op, ys, lam, max_iter, tol, cg_rtol, max_cg)
    finally:
        torch.set_float32_matmul_precision(precision)
    wb = (zw @ v.T).reshape(g, nc, k, -1)  # (G, M, K, D + 1)
    weights, biases = wb[..., :-1], wb[..., -1]
    return (weights, biases) if grouped else (weights[0], biases[0])


# ----------------------------------------------------------------------------- protocol


@torch.no_grad()
def voc07_svm_map(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                  costs: Sequence[float] = (0.01, 0.1, 1.0, 10.0), folds: int = 3,
                  pos_weight: float = 2.0, device: torch.device | str | None = None,
                  **solver_options) -> dict:
    """The VOC07 linear-SVM protocol; returns ``{"mAP", "ap", "best_cost"}`` (APs in percent).

    ``train_x`` (N, D) / ``test_x`` (T, D) frozen features; ``train_y`` (N, K) / ``test_y``
    (T, K) labels in {1, -1, 0} (0 = difficult: a negative for training, ignored at test).
    Per class, the cost with the best mean AP over ``folds``-fold stratified cross-validation
    on trainval wins (ties: the earlier cost); its SVM refit on all of trainval is scored on test.
    ``solver_options`` go to :func:`fit_linear_svms`.
    """
    train_x, train_y, test_x, test_y = (a if isinstance(a, Tensor) else torch.as_tensor(a)
                                        for a in (train_x, train_y, test_x, test_y))
    device = torch.device(device) if device is not None else train_x.device
    train_x = l2_normalize(train_x.to(device, torch.float64))
    test_x = l2_normalize(test_x.to(device, torch.float64))
    train_y = train_y.to(device).reshape(train_x.shape[0], -1)
    test_y = test_y.to(device).reshape(test_x.shape[0], -1)
    yb = torch.where(train_y > 0, 1, -1)
    n, k, nc = train_x.shape[0], yb.shape[1], len(costs)

    fold = stratified_kfold(yb, folds)  # (N, K)
    held_out = fold[None] == torch.arange(folds, device=device)[:, None, None]  # (F, N, K)
    masks = torch.cat([~held_out, torch.ones(1, n, k, dtype=torch.bool, device=device)])
    weights, biases = fit_linear_svms(train_x, yb, costs, pos_weight, masks=masks,
                                      **solver_options)

    # Cross-validation: AP of each fold's SVMs on its held-out samples.
    cv_w, cv_b = weights[:folds].reshape(-1, train_x.shape[1]), biases[:folds].reshape(-1)
    cv_scores = train_x @ cv_w.T + cv_b  # (N, F*M*K)
    cv_targets = torch.where(held_out[:, None], yb[None, None], 0)  # (F, M, N, K)
    cv_targets = cv_targets.expand(folds, nc, n, k).permute(2, 0, 1, 3).reshape(n, -1)
    cv_ap = average_precision(cv_scores, cv_targets).reshape(folds, nc, k).mean(0)  # (M, K)
    best = cv_ap.argmax(0)  # first maximum: the smallest cost among ties

    classes = torch.arange(k, device=device)
    w, b = weights[folds, best, classes], biases[folds, best, classes]  # (K, D), (K,)
    ap = average_precision(test_x @ w.T + b, test_y) * 100
    return {
        "mAP": float(ap.mean()),
        "ap": [float(a) for a in ap],
        "best_cost": [float(costs[i]) for i in best.tolist()],
    }
