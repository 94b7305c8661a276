"""How far to trust one similarity value: a bootstrap interval and a permutation null.

- **Interval**: a Poisson bootstrap over examples (each example gets a Poisson(1) weight
  per replicate, the form that fits streaming accumulators and merges across processes)
  and the *basic* bootstrap interval ``[2 v - q(1 - a/2), 2 v - q(a/2)]`` of the
  replicate values q. A percentile interval of biased CKA undercovers badly (76% for a
  nominal 95% at n=300, widths 10 and 8) because CKA's small-sample bias is resampled
  too; the basic interval reflects the bias back and covers at its level (tested by
  simulation).
- **Null**: the same measure with the example order of Y permuted: the value expected
  from unrelated representations at this n and these widths.
  - ``null="moments"`` (linear CKA, n <= ``GRAM_LIMIT``; the default): the mean over
    *all* n! permutations, exactly, and the p-value from a Pearson type III fit to the
    permutation distribution's exact mean, variance and skewness
    (:mod:`invsim.similarity.null`). ``n_perm`` only switches it on (> 0) or off (0).
  - ``null="permutation"`` (every other measure, and linear CKA on request or above
    ``GRAM_LIMIT``): ``null_mean`` is the mean over ``n_perm`` random permutations and
    ``p_value`` = (1 + #{null >= value}) / (1 + n_perm) (<= where lower is more
    similar).

Linear CKA takes a fast path through the Gram matrices: each model's Gram matrix is made
once, every replicate of every cell is a few matrix products, and a whole matrix of
cells (:func:`cka_calibration`) shares the models' work and one set of weights. Those
products run in bfloat16 where the CPU multiplies it natively (``PRODUCT_DTYPE``, from
``LOW_PRECISION_FROM`` examples), with the exact part of each sum kept out of it; every
cell's rounding is bounded, and a cell whose interval it could move by more than
``ROUNDING_TOLERANCE`` of its width is recomputed in float32, then float64. Other
measures resample and recompute.

Example:
    >>> import torch
    >>> from invsim.similarity import calibrate
    >>> g = torch.Generator().manual_seed(0)
    >>> X = torch.randn(200, 6, generator=g)
    >>> c = calibrate(X, X @ torch.randn(6, 4, generator=g) + torch.randn(200, 4, generator=g))
    >>> c.ci_low < c.value < c.ci_high, c.p_value < 0.01, c.null_mean < 0.1
    (True, True, True)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from invsim.similarity._inputs import ArrayLike, as_matrix, check_enough
from invsim.similarity.null import null_moments, pattern_sums, pearson3_sf
from invsim.similarity.registry import get_measure

__all__ = [
    "GRAM_LIMIT",
    "NULLS",
    "Calibrated",
    "calibrate",
    "cka_calibration",
    "cka_null_matrix",
    "permutations",
    "poisson_weights",
]

GRAM_LIMIT = 4000  # examples; above it n x n Gram matrices per model cost too much memory
NULLS = ("moments", "permutation")
ROUNDING_TOLERANCE = 0.02  # of an interval's width: the most rounding may move its ends
LOW_PRECISION_FROM = 512  # examples; below it bfloat16 products save too little to use
LEAF = 800  # rows; the bootstrap's symmetric blocks are halved down to below this


def _bfloat16_is_fast() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AVX512-BF16 or AMX)."""
    try:
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):
        return False
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


# the bootstrap's n x n products: bfloat16 where the CPU has it (3x float32's speed here),
# every cell checked against its own rounding and redone at a higher precision if needed
PRODUCT_DTYPE = torch.bfloat16 if _bfloat16_is_fast() else torch.float32
_TIERS = (torch.bfloat16, torch.float32, torch.float64)
# P(W <= k) for W ~ Poisson(1), k = 0..29 (the last is 1 in float64)
_POISSON_CDF = torch.tensor(np.cumsum([math.exp(-1) / math.factorial(k) for k in range(30)]))


@dataclass(frozen=True)
class Calibrated:
    """A value with its interval and null (``null_mean``/``p_value`` are None with
    ``n_perm=0``)."""

    value: float
    ci_low: float | None
    ci_high: float | None
    null_mean: float | None
    p_value: float | None
    measure: str
    n: int
    n_boot: int
    n_perm: int
    ci: float
    null: str | None = None  # how the null was made: "moments", "permutation" or None

    def to_dict(self) -> dict:
        return asdict(self)


def poisson_weights(n: int, n_boot: int, seed: int) -> torch.Tensor:
    """(n_boot, n) Poisson(1) weights (small integers, exact in float32), deterministic
    for ``seed``: example i's weights depend only on (seed, i, n_boot), since they are
    drawn example by example, so any split of the examples gets the same ones. Drawn by
    inverting the Poisson(1) distribution function at float64 uniforms (5x faster than
    ``torch.poisson``)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, n_boot, generator=g, dtype=torch.float64)
    return torch.searchsorted(_POISSON_CDF, u, right=True).T.float().contiguous()


def _centred(x: ArrayLike) -> torch.Tensor:
    x = torch.as_tensor(x).reshape(len(x), -1).to("cpu", torch.float64)
    return x - x.mean(0)


def _gram(x: torch.Tensor) -> torch.Tensor:
    """x x^T, exactly symmetric, from three of its four blocks (0.75 of the product)."""
    n, m = len(x), len(x) // 2
    if n < 256:
        return x @ x.T
    out = torch.empty(n, n, dtype=x.dtype)
    torch.mm(x[:m], x.T, out=out[:m])  # the top rows: contiguous, the fastest to write
    torch.mm(x[m:], x[m:].T, out=out[m:, m:])
    out[m:, :m] = out[:m, m:].T
    return out


def _trace_cubed(x: torch.Tensor, scatter: torch.Tensor | None = None) -> float | None:
    """tr(K^3) of the centred Gram K = x x^T in feature space, tr(C^3) with C = x^T x
    (``scatter``, when given), when that is cheaper than the n^3 product (None: let the
    caller take that)."""
    if x.shape[1] >= x.shape[0]:
        return None
    # the sums of the null tolerate float32 here (tested against enumeration)
    c = x.float().T @ x.float() if scatter is None else scatter.float()
    return float(((c @ c) * c).double().sum())


def cka_calibration(
    data,
    values,
    rows,
    cols,
    *,
    n_boot: int,
    ci: float,
    seed: int,
    null: bool = True,
    scatter: dict[str, torch.Tensor] | None = None,
) -> dict[str, np.ndarray]:
    """Linear CKA's basic bootstrap interval and exact-moment permutation null for every
    (row, column) cell of the representations ``data`` (name -> (n, d), n <=
    ``GRAM_LIMIT``) whose linear CKA is ``values`` ((rows, cols), float64: the intervals'
    centres), as (rows, cols) arrays ``ci_low``, ``ci_high`` and, with ``null``,
    ``null_mean`` and ``p_value``. Every cell uses the same Poisson weights
    (:func:`poisson_weights` of ``seed``), so a cell equals :func:`calibrate` of its pair.

    Each model's centred Gram matrix is made once, in float32 from features centred in
    float64; sums over its entries accumulate in float64 where they cancel. ``scatter``:
    each model's centred X^T X where the caller has it (a streamed pass does), which saves
    the null an n d^2 product per model."""
    models = list(dict.fromkeys([*rows, *cols]))
    exact = {m: _centred(data[m]) for m in models}
    low = {m: exact[m].float() for m in models}
    grams = {m: _gram(low[m]) for m in models}
    n = len(low[models[0]])
    values = np.asarray(values, dtype=np.float64).reshape(len(rows), len(cols))
    w = poisson_weights(n, n_boot, seed)
    first = PRODUCT_DTYPE if n >= LOW_PRECISION_FROM else torch.float32
    reps, square, error, centring = _replicates(grams, low, rows, cols, w, first)
    levels = torch.tensor([(1 - ci) / 2, (1 + ci) / 2], dtype=torch.float64)
    q = torch.nanquantile(torch.from_numpy(reps), levels, dim=2).numpy()
    for tier in _TIERS[_TIERS.index(first) + 1 :]:
        redo = ~(error <= ROUNDING_TOLERANCE * (q[1] - q[0]))  # NaN: redo as well
        if not redo.any():
            break
        i, j = np.nonzero(redo)
        rs, cs = ([names[k] for k in sorted(set(idx))] for names, idx in ((rows, i), (cols, j)))
        if tier == torch.float32:  # the same Gram matrices and centring terms
            sub, _, sub_error, _ = _replicates(grams, low, rs, cs, w, tier, centring)
        else:  # float64 Gram matrices from the float64 features
            wide = {m: exact[m] for m in dict.fromkeys([*rs, *cs])}
            wide_grams = {m: _gram(x) for m, x in wide.items()}
            sub, _, sub_error, _ = _replicates(wide_grams, wide, rs, cs, w, tier)
        at_r, at_c = [rs.index(rows[k]) for k in i], [cs.index(cols[k]) for k in j]
        reps[i, j], error[i, j] = sub[at_r, at_c], sub_error[at_r, at_c]
        q[:, i, j] = torch.nanquantile(torch.from_numpy(reps[i, j]), levels, dim=1).numpy()
    out = {"ci_low": 2 * values - q[1], "ci_high": 2 * values - q[0]}
    if null:
        norm = {m: math.sqrt(square[m]) for m in models}  # ||K||
        scale = np.outer([norm[r] for r in rows], [norm[c] for c in cols])
        trace = {m: float(torch.trace(grams[m].double())) for m in models}
        known = scatter or {}
        sums = {m: pattern_sums(grams.pop(m), _trace_cubed(low[m], known.get(m)), centred=True,
                                overwrite=True) for m in models}  # fmt: skip
        stacks = ([np.stack([sums[m][k] for m in ms]) for k in range(3)] for ms in (rows, cols))
        _, var, skew = null_moments(*stacks, n)
        expected = np.outer([trace[r] for r in rows], [trace[c] for c in cols]) / (n - 1)
        z = np.divide(values * scale - expected, np.sqrt(var), out=np.full_like(var, -np.inf),
                      where=var > 0)  # fmt: skip
        out["null_mean"], out["p_value"] = expected / scale, pearson3_sf(z, skew)
    return out


def _blocks(n: int, start: int = 0) -> list[tuple[slice, slice, int]]:
    """The upper triangle of a symmetric n x n matrix as (rows, cols, weight) blocks:
    each off-diagonal block once with weight 2, halving diagonal blocks down to below
    ``LEAF`` rows (then whole, weight 1): 0.75 of the entries at n = 1,000."""
    if n < LEAF:
        return [(slice(start, start + n), slice(start, start + n), 1)]
    m = n // 2
    off = (slice(start, start + m), slice(start + m, start + n), 2)
    return [off, *_blocks(m, start), *_blocks(n - m, start + m)]


def _weighted_sums(w: torch.Tensor, grams: list, pairs, product: torch.dtype):
    """sum_ij w_i w_j K_ij L_ij for every row of ``w`` and every pair (K, L) of
    ``grams`` (float64, (rows of w, pairs)), and (bfloat16 only, else zeros) each
    product's ||K * L||_F. Block by block (:func:`_blocks`), every pair within a block
    before the next block (the blocks of all models stay in cache), each elementwise
    product made in one reused buffer (fresh n x n allocations cost page faults that
    rival the products).

    With ``product`` bfloat16, w = 1 + e and w^T M w = 1^T M 1 + 2 e^T M 1 + e^T M e:
    only e^T M e is taken in bfloat16 (``e`` is exact there), M's column sums in float32,
    the rest in float64."""
    low = product == torch.bfloat16
    v = w - 1 if low else w
    v_low = v.to(product) if low else v
    n, k = w.shape[1], len(pairs)
    quad = torch.zeros(w.shape[0], k, dtype=w.dtype)
    colsum = torch.zeros(n, k, dtype=w.dtype) if low else None  # M's column sums
    square = torch.zeros(k, dtype=torch.float64)
    buffer = torch.empty(((n - n // 2) if n >= LEAF else n) ** 2, dtype=w.dtype)
    low_buffer = torch.empty_like(buffer, dtype=product) if low else None
    for rows, columns, weight in _blocks(n):
        shape = (rows.stop - rows.start, columns.stop - columns.start)
        block = buffer[: shape[0] * shape[1]].view(shape)
        for p, (i, j) in enumerate(pairs):
            torch.mul(grams[i][rows, columns], grams[j][rows, columns], out=block)
            if low:
                colsum[columns, p] += block.sum(0)
                if weight == 2:
                    colsum[rows, p] += block.sum(1)
                flat = block.view(-1)
                square[p] += weight * float(flat @ flat)
                operand = low_buffer[: block.numel()].view(shape).copy_(block)
            else:
                operand = block
            quad[:, p] += weight * ((v_low[:, rows] @ operand).to(w.dtype) * v[:, columns]).sum(1)
    total = quad.double()
    if low:
        col = colsum.double()
        total += col.sum(dim=0) + 2 * (v.double() @ col)
    return total, square.sqrt()


def _centring(grams: dict, features: dict, w: torch.Tensor) -> tuple:
    """The weighted-centring terms of every pair of models, for the rows of ``w`` and one
    more row of unit weights (the sample itself): the weights, their sums s, and, from
    one batched product, sum_i w_i (wK)_i (wL)_i and w^T K w (``features``: each K's
    factor X, K = X X^T, for the cheaper of w K and (w X) X^T)."""
    n = w.shape[1]
    dtype = next(iter(grams.values())).dtype
    w = torch.cat([w.to(dtype), torch.ones(1, n, dtype=dtype)])
    wk = torch.stack([(w @ x) @ x.T if 2 * x.shape[1] < n else w @ grams[m]
                      for m, x in features.items()], dim=1)  # fmt: skip
    ww = wk * w[:, None, :]
    cross = (ww @ wk.transpose(1, 2)).double()  # (B + 1, models, models)
    return w, w.sum(dim=1, keepdim=True).double(), cross, ww.sum(dim=2).double()


def _replicates(
    grams: dict, features: dict, rows, cols, w: torch.Tensor, product: torch.dtype, centring=None
):
    """(rows, cols, B) linear CKA of every cell under each row of example weights ``w``:
    sum_ij w_i w_j K_ij L_ij with both Gram matrices centred by the weighted mean
    (:func:`_centring`, computed for all of ``grams``' models unless given); each model's
    ||K||^2, from the row of unit weights; (rows, cols) bounds on how far rounding moves
    any replicate; and the centring terms, for another call on the same Gram matrices.

    ``product``: the dtype of the n x n products, the Gram matrices' own (float32 or
    float64) or bfloat16. bfloat16 keeps the exact part of each sum out of the low
    precision: with w = 1 + e, w^T M w = 1^T M 1 + 2 e^T M 1 + e^T M e, where only
    e^T M e is taken in bfloat16 (float32 sums), M's column sums in float32. Its
    rounding, about 2^-9 relative per entry of M and of e^T M, moves e^T M e by about
    sqrt(3) 2^-9 ||M||_F (standard deviation over replicates); the bound is 6 of them,
    propagated to CKA. float32 products are bounded by 16 x 2^-24 (4x the largest error
    measured against float64), float64 by 0."""
    models = list(grams)
    at = {m: i for i, m in enumerate(models)}
    centring = centring or _centring(grams, features, w)
    w, s, cross, quad = centring
    dtype = w.dtype
    asked = [at[m] for m in dict.fromkeys([*rows, *cols])]
    pairs = sorted({tuple(sorted((at[r], at[c]))) for r in rows for c in cols if r != c}
                   | {(i, i) for i in asked})  # fmt: skip
    a, b = (torch.tensor(side) for side in zip(*pairs, strict=True))
    total, norms = _weighted_sums(w, [grams[m] for m in models], pairs, product)
    frobenius = torch.zeros(len(models), len(models), dtype=torch.float64)  # ||K_a * K_b||
    frobenius[a, b] = frobenius[b, a] = norms
    hsic = total - 2 * cross[:, a, b] / s + quad[:, a] * quad[:, b] / s**2
    own = torch.full((w.shape[0], len(models)), torch.nan, dtype=torch.float64)
    own[:, a[a == b]] = hsic[:, a == b]
    cka = torch.ones(len(models), len(models), w.shape[0], dtype=torch.float64)
    cka[a, b] = cka[b, a] = (hsic / (own[:, a] * own[:, b]).sqrt()).T
    diagonal = torch.arange(len(models))
    cka[diagonal, diagonal] = 1.0  # CKA(X, X) = 1 under any weights
    norm = own[-1]  # ||K||^2
    if product == torch.bfloat16:
        scale = 6 * math.sqrt(3) * 2.0**-9
        relative = frobenius.diagonal() / norm
        spread = (relative[:, None] + relative[None, :]) / 2
        error = scale * (frobenius / torch.outer(norm, norm).sqrt() + cka[..., -1].abs() * spread)
    else:
        error = torch.full_like(frobenius, 16 * 2.0**-24 if dtype == torch.float32 else 0.0)
    error[diagonal, diagonal] = 0.0
    ri, ci = [at[r] for r in rows], [at[c] for c in cols]
    square = {m: float(norm[at[m]]) for m in dict.fromkeys([*rows, *cols])}
    return cka[ri][:, ci, :-1].numpy(), square, error[ri][:, ci].numpy(), centring


def _weighted_scatter(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(B, d_a, d_b): each replicate's weighted, weighted-mean-centred a^T diag(w) b."""
    s = w.sum(dim=1)[:, None, None]
    raw = torch.cat([(wc[:, :, None] * a).transpose(1, 2) @ b for wc in w.split(32)])
    return raw - (w @ a)[:, :, None] * (w @ b)[:, None, :] / s


def _cka_replicates(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Linear CKA of every weighted replicate in feature space (d x d scatters), for data
    sets too large for :func:`cka_calibration`'s n x n Gram matrices."""
    x, y = x - x.mean(0), y - y.mean(0)  # translation-free; less cancellation below
    w = w.to(x.dtype)
    sxy, sxx, syy = (_weighted_scatter(a, b, w) for a, b in ((x, y), (x, x), (y, y)))
    kl, kk, ll = ((m**2).sum(dim=(1, 2)) for m in (sxy, sxx, syy))
    return kl / (kk * ll).sqrt()


def _cka_null(x: torch.Tensor, y: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """Linear CKA of x against each row-permutation of y (the denominator does not change)."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    n, d1, d2 = xc.shape[0], xc.shape[1], yc.shape[1]
    scale = (xc.T @ xc).norm() * (yc.T @ yc).norm()
    if d1 * d2 < n:  # feature space: ||X^T P Y||^2, a few permutations at a time
        return torch.cat([((xc.T @ yc[p]) ** 2).sum(dim=(1, 2)) for p in perms.split(64)]) / scale
    kc, lc = xc @ xc.T, yc @ yc.T
    return torch.stack([(kc * lc[p][:, p]).sum() for p in perms]) / scale


def _generic(name, x, y, w: torch.Tensor | None, perms: torch.Tensor | None):
    spec = get_measure(name)
    if w is not None:
        out = []
        for row in w:
            idx = torch.repeat_interleave(torch.arange(len(row)), row.long())
            out.append(spec.fn(x[idx], y[idx]))
        return torch.tensor(out, dtype=torch.float64)
    return torch.tensor([spec.fn(x, y[p]) for p in perms], dtype=torch.float64)


def permutations(n: int, n_perm: int, seed: int) -> torch.Tensor:
    """(n_perm, n) permutations of the examples, deterministic for ``seed``; the same for
    :func:`calibrate` and :func:`cka_null_matrix`."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.stack([torch.randperm(n, generator=g) for _ in range(n_perm)])


def cka_null_matrix(data, rows, cols, n_perm: int, seed: int) -> np.ndarray:
    """Linear CKA of every (row, column) pair with the row side's examples permuted, the
    same permutations for every pair: each permutation reorders each row model's centred
    Gram matrix once, and one matrix product gives the whole row of statistics. The
    permuted statistics are computed in float32 (a null distribution needs no more)."""

    def gram(x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x, dtype=torch.float64)
        x = x.reshape(len(x), -1) - x.reshape(len(x), -1).mean(0)
        return (x @ x.T).float()

    grams = {m: gram(data[m]) for m in dict.fromkeys([*rows, *cols])}
    norms = {m: g.norm() for m, g in grams.items()}
    flat = torch.stack([grams[c].flatten() for c in cols])  # (cols, n^2)
    scale = torch.outer(
        torch.stack([norms[r] for r in rows]), torch.stack([norms[c] for c in cols])
    )
    n = grams[rows[0]].shape[0]
    out = torch.empty(len(rows), len(cols), n_perm, dtype=torch.float64)
    flat_rows = [grams[r].flatten() for r in rows]
    for b, p in enumerate(permutations(n, n_perm, seed)):
        where = (p[:, None] * n + p[None, :]).flatten()  # (P K P^T)_ij = K_{p_i p_j}
        permuted = torch.stack([f.take(where) for f in flat_rows])
        out[:, :, b] = (permuted @ flat.T).double() / scale
    return out.numpy()


def _basic_interval(value: float, reps: torch.Tensor, ci: float) -> tuple[float, float]:
    reps = reps[torch.isfinite(reps)]
    alpha = 1 - ci
    q_lo, q_hi = np.quantile(reps.numpy(), [alpha / 2, 1 - alpha / 2])
    return 2 * value - float(q_hi), 2 * value - float(q_lo)


def calibrate(
    X: ArrayLike,
    Y: ArrayLike,
    *,
    measure: str = "linear_cka",
    n_boot: int = 200,
    n_perm: int = 200,
    seed: int = 0,
    ci: float = 0.95,
    null: str = "moments",
) -> Calibrated:
    """``measure(X, Y)`` with a basic Poisson-bootstrap ``ci`` interval over examples and
    a permutation null (see the module doc; ``n_perm=0``: no null). Deterministic for
    ``seed``; any float dtype; bad input raises the measure's own ValueErrors."""
    if not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be an integer >= 1; got {n_boot!r}.")
    if not isinstance(n_perm, int) or n_perm < 0:
        raise ValueError(f"n_perm must be an integer >= 0; got {n_perm!r}.")
    if not 0 < ci < 1:
        raise ValueError(f"ci must lie in (0, 1), e.g. 0.95; got {ci!r}.")
    if null not in NULLS:
        raise ValueError(f"null must be one of {NULLS}; got {null!r}.")
    spec = get_measure(measure)
    value = float(spec.fn(X, Y))  # the measure's own checks of X and Y
    x, y = as_matrix(X, "X", device="cpu"), as_matrix(Y, "Y", device="cpu")  # the weights: CPU
    n = x.shape[0]
    if measure == "debiased_cka":
        check_enough(n, debiased=True, what="CKA's permutation null")
    gram = measure == "linear_cka" and n <= GRAM_LIMIT
    method = None if not n_perm else "moments" if gram and null == "moments" else "permutation"
    null_mean = p_value = None
    if gram:
        cell = cka_calibration({"X": x, "Y": y}, [[value]], ["X"], ["Y"], n_boot=n_boot, ci=ci,
                               seed=seed, null=method == "moments")  # fmt: skip
        lo, hi = float(cell["ci_low"][0, 0]), float(cell["ci_high"][0, 0])
        if method == "moments":
            null_mean, p_value = float(cell["null_mean"][0, 0]), float(cell["p_value"][0, 0])
    else:
        w = poisson_weights(n, n_boot, seed)
        linear = measure == "linear_cka"
        reps = _cka_replicates(x, y, w) if linear else _generic(measure, x, y, w, None)
        lo, hi = _basic_interval(value, reps, ci)
    if method == "permutation":
        perms = permutations(n, n_perm, seed)
        fast = measure == "linear_cka"
        draws = _cka_null(x, y, perms) if fast else _generic(measure, x, y, None, perms)
        null_mean = float(draws.mean())
        extreme = (draws >= value) if spec.higher_is_similar else (draws <= value)
        p_value = float((1 + int(extreme.sum())) / (1 + n_perm))
    return Calibrated(value, lo, hi, null_mean, p_value, measure, n, n_boot, n_perm, ci, method)
