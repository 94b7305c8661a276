"""How far to trust one similarity value: an interval for its population value, and a
permutation null.

- **Interval** (``ci_low``, ``ci_high``): for the *population* value of the measure, its
  value for these two models on the data's distribution (n -> infinity). Chosen by
  simulation where invsim runs (n at or below the widths; ``benchmarks/bench_coverage.py``
  and docs/guides/intervals-and-nulls.md):
  - CKA (measures whose ``interval`` is ``"cka_jackknife"``: ``linear_cka``,
    ``debiased_cka``): centred on *debiased* CKA, whose HSICs are unbiased, with the
    delete-one jackknife's standard error of debiased CKA and a Student t quantile
    (n - 1 degrees of freedom). Every delete-one value comes in closed form from sums
    that one pass over the Gram matrices (or, above ``GRAM_LIMIT`` examples, the
    features) gives, so a whole matrix costs O(n^2) per pair. Biased CKA's own bias
    (up to 0.6 at n=256 with widths 512) is far larger than its standard error there, so
    an interval for the population value need not contain the biased estimate: the
    interval says which estimate it centres on (``ci_centre``).
    The jackknife variance counts the degenerate (second-order) part of the U-statistic
    twice (Efron and Stein); in the Gram form that part's variance is estimated from the
    centred Gram matrices and taken off (:func:`_degenerate_variance`), which brings the
    coverage of weak signals in wide layers from 99.5% to 95-97%. Above ``GRAM_LIMIT``
    the correction is negligible and skipped.
  - Other measures (``interval=None``): no interval. None of them has an estimator whose
    small-sample bias is removed at n <= width, and the jackknife tried on Procrustes
    covered its population value 7-96% of the time (``bench_coverage.py``).
  - Below ``MIN_INTERVAL_N`` examples there is no interval either: ``ci_low`` /
    ``ci_high`` are None and ``ci_reason`` says why.
- **Null**: the same measure with the example order of Y permuted: the value expected
  from unrelated representations at this n and these widths.
  - ``null="moments"`` (measures with ``exact_null``, i.e. linear CKA, n <=
    ``GRAM_LIMIT``; the default): the mean over *all* n! permutations, exactly, and the
    p-value from a Pearson type III fit to the permutation distribution's exact mean,
    variance and skewness (:mod:`invsim.similarity.null`). ``n_perm`` only switches it
    on (> 0) or off (0).
  - ``null="permutation"`` (every other measure, and linear CKA on request or above
    ``GRAM_LIMIT``): ``null_mean`` is the mean over ``n_perm`` random permutations and
    ``p_value`` = (1 + #{null >= value}) / (1 + n_perm) (<= where lower is more
    similar).

Examples:
    >>> import torch
    >>> from invsim.similarity import calibrate
    >>> g = torch.Generator().manual_seed(0)
    >>> X = torch.randn(200, 6, generator=g)
    >>> c = calibrate(X, X @ torch.randn(6, 4, generator=g) + torch.randn(200, 4, generator=g))
    >>> c.ci_low < c.ci_centre < c.ci_high, c.p_value < 0.01, c.null_mean < 0.1
    (True, True, True)
    >>> c.ci_method
    'delete-one jackknife of debiased CKA, degenerate-term corrected, t interval'
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.stats import t as student_t

from invsim.similarity._inputs import ArrayLike, as_matrix
from invsim.similarity.core import centred as centre_columns
from invsim.similarity.core import hsic_from_sums
from invsim.similarity.null import null_moments, pattern_sums, pearson3_sf
from invsim.similarity.registry import Measure, get_measure

__all__ = [
    "CI_TARGET",
    "GRAM_LIMIT",
    "MIN_INTERVAL_N",
    "NULLS",
    "Calibrated",
    "calibrate",
    "cka_calibration",
    "cka_intervals",
    "cka_null_matrix",
    "interval_method",
    "permutations",
]

GRAM_LIMIT = 4000  # examples; above it n x n Gram matrices per model cost too much memory
NULLS = ("moments", "permutation")
MIN_INTERVAL_N = 20  # the smallest n at which the benchmark shows honest coverage
CI_TARGET = "the measure's population value for these two models on the data's distribution"
CI_CENTRE = {"cka_jackknife": "debiased_cka"}  # interval method -> the estimate it centres on
CKA_METHOD = "delete-one jackknife of debiased CKA, degenerate-term corrected, t interval"


@dataclass(frozen=True)
class Calibrated:
    """A value with its interval and null (``null_mean``/``p_value`` are None with
    ``n_perm=0``; ``ci_low``/``ci_high`` are None where no interval can be trusted, with
    ``ci_reason``). ``ci_centre`` is the estimate the interval centres on."""

    value: float
    ci_low: float | None
    ci_high: float | None
    null_mean: float | None
    p_value: float | None
    measure: str
    n: int
    n_perm: int
    ci: float
    null: str | None = None  # how the null was made: "moments", "permutation" or None
    ci_centre: float | None = None
    ci_method: str | None = None
    ci_target: str = CI_TARGET
    ci_reason: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def interval_method(
    spec: Measure, n: int, widths: tuple[int, int]
) -> tuple[str | None, str | None]:
    """(method, None) where ``spec`` gets an interval at n examples and these widths, or
    (None, reason) where no interval can be trusted (module doc)."""
    if n < MIN_INTERVAL_N:
        return None, (
            f"n={n} is below {MIN_INTERVAL_N} examples, the smallest n at which the coverage "
            "benchmark shows honest intervals; use more examples."
        )
    if spec.interval == "cka_jackknife":
        return CKA_METHOD, None
    return None, (
        f"{spec.name} has no estimator whose small-sample bias is removed at n={n} and widths "
        f"{widths[0]}/{widths[1]}, and no interval was shown to cover its population value "
        "(a jackknife covered Procrustes' 7-96% of the time; "
        "docs/guides/intervals-and-nulls.md). Its null and p-value are reported."
    )


def _terms(x, y, kx=None, ky=None) -> tuple[torch.Tensor, ...]:
    """Per example i, for centred features x, y (or their Gram matrices kx, ky): ||x_i||^2,
    ||y_i||^2, p_i = sum_j K_ij L_ij, qx_i = sum_j K_ij L_jj, qy_i = sum_j L_ij K_jj: all
    that the full-sample and every delete-one unbiased HSIC need."""
    if kx is not None:
        nx, ny = kx.diagonal(), ky.diagonal()
        return nx, ny, (kx * ky).sum(1), kx @ ny, ky @ nx
    nx, ny = (x * x).sum(1), (y * y).sum(1)
    p = ((x @ (x.T @ y)) * y).sum(1) if x.shape[1] <= y.shape[1] else ((y @ (y.T @ x)) * x).sum(1)
    return nx, ny, p, x @ (x.T @ ny), y @ (y.T @ nx)


def _unbiased_hsic(terms, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Song et al.'s unbiased HSIC of the whole sample and with each example left out,
    from :func:`_terms` of features
    centred on the sample mean (then the U-centred sums are 1'K1 = -sum ||x_i||^2 and
    1'KL1 = sum ||x_i||^2 ||y_i||^2 with zero-diagonal K, L). The terms may carry trailing
    dimensions (every pair of models at once); sums run over the examples, dimension 0."""
    nx, ny, p, qx, qy = terms
    total, r1x, r1y, nxy = p.sum(0), nx.sum(0), ny.sum(0), nx * ny
    r2 = nxy.sum(0)
    full = hsic_from_sums(total - r2, r2, -r1x, -r1y, n, debiased=True)
    # with example i left out, the remaining zero-diagonal sums (the data's mean is 0)
    trace = total - 2 * p + nxy - (r2 - nxy)
    cross = p + qx + qy + r2 - 4 * nxy
    loo = hsic_from_sums(trace, cross, 2 * nx - r1x, 2 * ny - r1y, n - 1, debiased=True)
    return full, loo


PAIR_BLOCK = 2**17  # Gram entries of all models per block of rows: the block stays in cache


def _pair_sums(grams: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every sum the jackknife needs of every pair (a, b) of the stacked centred Gram
    matrices ``grams`` (M, n, n), in one sweep over them: ``d`` (n, M) their diagonals,
    ``p`` (n, M, M) the rows of K_a * K_b summed, ``q`` (n, M, M) the entries of
    K_a diag(K_b), ``s22`` and ``s31`` (M, M) the sums of K_a^2 K_b^2 and K_a^3 K_b."""
    k, n, _ = grams.shape
    d = grams.diagonal(dim1=1, dim2=2).T
    q = torch.matmul(grams, d).transpose(0, 1)
    p = torch.empty(n, k, k, dtype=grams.dtype)
    s22, s31 = (torch.zeros(k, k, dtype=grams.dtype) for _ in range(2))
    step = max(1, PAIR_BLOCK // (k * n))
    for start in range(0, n, step):
        block = grams[:, start : start + step]  # (M, b, n), each model's rows contiguous
        flat = block.reshape(k, -1)
        square = flat * flat
        s22 += square @ square.T
        s31 += (square * flat) @ flat.T
        rows = block.transpose(0, 1)  # (b, M, n)
        p[start : start + step] = torch.bmm(rows, rows.transpose(1, 2))
    return {"d": d, "p": p, "q": q, "s22": s22, "s31": s31}


def _degenerate_variance(s: dict[str, torch.Tensor], n: int) -> torch.Tensor:
    """What the jackknife's variance over-states for CKA of every pair of centred Gram
    matrices K, L (``s``: :func:`_pair_sums`), (M, M): 2 s^2 / (n (n - 1)), with s^2 the
    mean square over i != j of the degenerate (second-order) part r_ij of CKA's
    linearisation
    w_ij = K_ij L_ij / S - c/2 (K_ij^2 / S_xx + L_ij^2 / S_yy)
    (S_xx, S_yy, S_xy: off-diagonal means, S = sqrt(S_xx S_yy), c = S_xy / S). The
    delete-one jackknife counts that part twice (Efron and Stein), which matters where the
    signal is weak next to the noise. All from sums: with h_i the row means of w and u
    their mean, sum r^2 = sum w^2 - 2 n sum h^2 + n (n + 1) u^2 over i != j. Zero on the
    diagonal (a model against itself)."""
    d = s["d"]
    off = n * (n - 1)
    dd = d[:, :, None] * d[:, None, :]
    p = s["p"] - dd  # off-diagonal row sums of K * L
    rows = p.diagonal(dim1=1, dim2=2)  # (n, M): off-diagonal row sums of K^2
    s2, s4 = rows.sum(0), s["s22"].diagonal() - (d**4).sum(0)  # sums of K^2, K^4 (i != j)
    sxx, syy, sxy = s2[:, None] / off, s2[None, :] / off, p.sum(0) / off
    scale = (sxx * syy).sqrt()
    c = sxy / scale
    alpha, beta, gamma = 1 / scale, c / (2 * sxx), c / (2 * syy)
    pp = s["s22"] - (dd * dd).sum(0)  # sum K^2 L^2
    pq = s["s31"] - (d**3).T @ d  # sum K^3 L
    pr = pq.T  # sum K L^3
    w2 = (
        alpha**2 * pp
        + beta**2 * s4[:, None]
        + gamma**2 * s4[None, :]
        - 2 * alpha * beta * pq
        - 2 * alpha * gamma * pr
        + 2 * beta * gamma * pp
    )
    h = (alpha * p - beta * rows[:, :, None] - gamma * rows[:, None, :]) / (n - 1)
    u = h.sum(0) / n
    r2 = w2 - 2 * n * (h * h).sum(0) + n * (n + 1) * u**2
    out = torch.where(scale > 0, 2 * r2.clamp(min=0) / off / off, 0.0)
    return out.fill_diagonal_(0.0)


def degenerate_variance(x: torch.Tensor, y: torch.Tensor) -> float:
    """:func:`_degenerate_variance` of one pair of representations (n, d1), (n, d2)."""
    a, b = centre_columns(x), centre_columns(y)
    return float(_degenerate_variance(_pair_sums(torch.stack([a @ a.T, b @ b.T])), len(a))[0, 1])


def _gram_jackknife(grams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Debiased CKA (M, M) of every pair of the stacked centred Gram matrices (M, n, n),
    and the delete-one jackknife's variance of it, degenerate-term corrected."""
    n = grams.shape[1]
    s = _pair_sums(grams)
    nx, ny = s["d"][:, :, None], s["d"][:, None, :]
    full, loo = _unbiased_hsic((nx, ny, s["p"], s["q"], s["q"].transpose(1, 2)), n)
    own_full, own_loo = full.diagonal(), loo.diagonal(dim1=1, dim2=2)
    cka = full / (own_full[:, None] * own_full[None, :]).sqrt()
    loo = loo / (own_loo[:, :, None] * own_loo[:, None, :]).sqrt()
    var = (n - 1) / n * ((loo - loo.mean(0)) ** 2).sum(0)
    var = (var - _degenerate_variance(s, n)).clamp(min=0).fill_diagonal_(0.0)
    return cka.fill_diagonal_(1.0), var


def _feature_jackknife(x: dict, pairs) -> dict:
    """(debiased CKA, jackknife variance) of each pair (a, b) from the features (above
    ``GRAM_LIMIT``; no degenerate-term correction, negligible at such n)."""
    n = len(next(iter(x.values())))
    own = {m: _unbiased_hsic(_terms(x[m], x[m]), n) for m in {m for p in pairs for m in p}}
    out = {}
    for a, b in pairs:
        full, loo = (1.0, torch.ones(n, dtype=torch.float64))
        if a != b:
            full, loo = _unbiased_hsic(_terms(x[a], x[b]), n)
            full = float(full / (own[a][0] * own[b][0]).sqrt())
            loo = loo / (own[a][1] * own[b][1]).sqrt()
        out[a, b] = (full, (n - 1) / n * float(((loo - loo.mean()) ** 2).sum()))
    return out


def _t_interval(centre, spread, df: int, ci: float):
    z = float(student_t.ppf((1 + ci) / 2, df))
    return centre - z * spread, centre + z * spread


def cka_intervals(
    data, rows, cols, *, ci: float, grams: torch.Tensor | None = None, centred: bool = False
) -> dict:
    """(rows, cols) arrays ``ci_low``, ``ci_high`` and ``ci_centre`` (debiased CKA) of the
    population CKA of every cell of the representations ``data`` (name -> (n, d)):
    the delete-one jackknife of debiased CKA (module doc), from float64 Gram matrices
    (``grams``: the models' centred ones stacked (M, n, n), in the order the rows and
    columns first name them, where the caller has them; else made here when n <=
    ``GRAM_LIMIT``) or, above it, from the features; every pair at once in the Gram form.
    ``centred``: ``data`` is already float64 and centred on its mean."""
    models = list(dict.fromkeys([*rows, *cols]))
    x = {m: data[m] if centred else centre_columns(data[m]) for m in models}
    n = len(x[models[0]])
    shape = (len(rows), len(cols))
    out = {k: np.full(shape, np.nan) for k in ("ci_low", "ci_high", "ci_centre")}
    if n < MIN_INTERVAL_N:  # no interval (see interval_method)
        return out
    if grams is None and n <= GRAM_LIMIT:
        grams = _stacked_grams([x[m] for m in models])
    if grams is not None:
        at = {m: i for i, m in enumerate(models)}
        full, var = _gram_jackknife(grams)
        cells = np.ix_([at[r] for r in rows], [at[c] for c in cols])
        centre, var = full.numpy()[cells], var.numpy()[cells]
    else:
        found = _feature_jackknife(x, {tuple(sorted((r, c))) for r in rows for c in cols})
        centre, var = (
            np.array([[found[tuple(sorted((r, c)))][k] for c in cols] for r in rows])
            for k in (0, 1)
        )
    out["ci_low"], out["ci_high"] = _t_interval(centre, np.sqrt(var), n - 1, ci)
    out["ci_centre"] = centre
    return out


def _gram(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x x^T, exactly symmetric, from three of its four blocks (0.75 of the product),
    into ``out`` where given."""
    n, m = len(x), len(x) // 2
    out = torch.empty(n, n, dtype=x.dtype) if out is None else out
    if n < 256:
        return torch.mm(x, x.T, out=out)
    torch.mm(x[:m], x.T, out=out[:m])  # the top rows: contiguous, the fastest to write
    torch.mm(x[m:], x[m:].T, out=out[m:, m:])
    out[m:, :m] = out[:m, m:].T
    return out


def _stacked_grams(xs: list[torch.Tensor]) -> torch.Tensor:
    """The Gram matrices of the (centred, float64) ``xs``, stacked (M, n, n)."""
    n = len(xs[0])
    out = torch.empty(len(xs), n, n, dtype=torch.float64)
    for i, x in enumerate(xs):
        _gram(x, out=out[i])
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
    ci: float,
    null: bool = True,
    scatter: dict[str, torch.Tensor] | None = None,
) -> dict[str, np.ndarray]:
    """Linear CKA's interval (:func:`cka_intervals`) and exact-moment permutation null for
    every (row, column) cell of the representations ``data`` (name -> (n, d), n <=
    ``GRAM_LIMIT``) whose linear CKA is ``values`` ((rows, cols), float64), as (rows,
    cols) arrays ``ci_low``, ``ci_high``, ``ci_centre`` and, with ``null``, ``null_mean``
    and ``p_value``; a cell equals :func:`calibrate` of its pair.

    Each model's centred Gram matrix is made once in float64 (from features centred in
    float64) and serves both. ``scatter``: each model's centred X^T X where the caller has
    it (a streamed pass does), which saves the null an n d^2 product per model."""
    models = list(dict.fromkeys([*rows, *cols]))
    x = {m: centre_columns(data[m]) for m in models}
    grams = _stacked_grams([x[m] for m in models])
    out = cka_intervals(x, rows, cols, ci=ci, grams=grams, centred=True)
    if not null:
        return out
    n = len(x[models[0]])
    values = np.asarray(values, dtype=np.float64).reshape(len(rows), len(cols))
    norm = dict(zip(models, torch.linalg.matrix_norm(grams).tolist(), strict=True))  # ||K||
    trace = dict(zip(models, grams.diagonal(dim1=1, dim2=2).sum(1).tolist(), strict=True))
    known = scatter or {}
    sums = {
        m: pattern_sums(
            gram.float(), _trace_cubed(x[m], known.get(m)), centred=True, overwrite=True
        )
        for m, gram in zip(models, grams, strict=True)
    }
    del grams
    stacks = ([np.stack([sums[m][k] for m in ms]) for k in range(3)] for ms in (rows, cols))
    _, var, skew = null_moments(*stacks, n)
    scale = np.outer([norm[r] for r in rows], [norm[c] for c in cols])
    expected = np.outer([trace[r] for r in rows], [trace[c] for c in cols]) / (n - 1)
    z = np.divide(
        values * scale - expected, np.sqrt(var), out=np.full_like(var, -np.inf), where=var > 0
    )
    out["null_mean"], out["p_value"] = expected / scale, pearson3_sf(z, skew)
    return out


def _cka_null(x: torch.Tensor, y: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """Linear CKA of x against each row-permutation of y (the denominator does not change)."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    n, d1, d2 = xc.shape[0], xc.shape[1], yc.shape[1]
    scale = (xc.T @ xc).norm() * (yc.T @ yc).norm()
    if d1 * d2 < n:  # feature space: ||X^T P Y||^2, a few permutations at a time
        return torch.cat([((xc.T @ yc[p]) ** 2).sum(dim=(1, 2)) for p in perms.split(64)]) / scale
    kc, lc = xc @ xc.T, yc @ yc.T
    return torch.stack([(kc * lc[p][:, p]).sum() for p in perms]) / scale


def permutations(n: int, n_perm: int, rng_seed: int) -> torch.Tensor:
    """(n_perm, n) permutations of the examples, deterministic for ``seed``; the same for
    :func:`calibrate` and :func:`cka_null_matrix`."""
    g = torch.Generator().manual_seed(rng_seed + 1)
    return torch.stack([torch.randperm(n, generator=g) for _ in range(n_perm)])


def cka_null_matrix(data, rows, cols, n_perm: int, rng_seed: int) -> np.ndarray:
    """Linear CKA of every (row, column) pair with the row side's examples permuted, the
    same permutations for every pair: each permutation reorders each row model's centred
    Gram matrix once, and one matrix product gives the whole row of statistics. The
    permuted statistics are computed in float32 (a null distribution needs no more)."""
    grams = {
        m: (lambda x: (x @ x.T).float())(centre_columns(data[m]))
        for m in dict.fromkeys([*rows, *cols])
    }
    norms = {m: g.norm() for m, g in grams.items()}
    flat = torch.stack([grams[c].flatten() for c in cols])  # (cols, n^2)
    scale = torch.outer(
        torch.stack([norms[r] for r in rows]), torch.stack([norms[c] for c in cols])
    )
    n = grams[rows[0]].shape[0]
    out = torch.empty(len(rows), len(cols), n_perm, dtype=torch.float64)
    flat_rows = [grams[r].flatten() for r in rows]
    for b, p in enumerate(permutations(n, n_perm, rng_seed)):
        where = (p[:, None] * n + p[None, :]).flatten()  # (P K P^T)_ij = K_{p_i p_j}
        permuted = torch.stack([f.take(where) for f in flat_rows])
        out[:, :, b] = (permuted @ flat.T).double() / scale
    return out.numpy()


def _permutation_null(spec: Measure, x, y, value: float, n_perm: int, rng_seed: int):
    perms = permutations(len(x), n_perm, rng_seed)
    if spec.exact_null:
        draws = _cka_null(x, y, perms)
    else:
        draws = torch.tensor([float(spec.fn(x, y[p])) for p in perms], dtype=torch.float64)
    extreme = (draws >= value) if spec.higher_is_similar else (draws <= value)
    return float(draws.mean()), float((1 + int(extreme.sum())) / (1 + n_perm))


def _check_settings(n_perm, ci, null) -> None:
    if not isinstance(n_perm, int) or n_perm < 0:
        raise ValueError(f"n_perm must be an integer >= 0; got {n_perm!r}.")
    if not 0 < ci < 1:
        raise ValueError(f"ci must lie in (0, 1), e.g. 0.95; got {ci!r}.")
    if null not in NULLS:
        raise ValueError(f"null must be one of {NULLS}; got {null!r}.")


def calibrate(
    X: ArrayLike,
    Y: ArrayLike,
    *,
    measure: str | Measure = "linear_cka",
    n_perm: int = 200,
    rng_seed: int = 0,
    ci: float = 0.95,
    null: str = "moments",
) -> Calibrated:
    """``measure(X, Y)`` with a ``ci`` interval for its population value and a permutation
    null (see the module doc; ``n_perm=0``: no null). Deterministic for ``seed``; any
    float dtype; bad input raises the measure's own ValueErrors."""
    _check_settings(n_perm, ci, null)
    spec = get_measure(measure)
    value = float(spec.fn(X, Y))  # the measure's own checks of X and Y
    x, y = as_matrix(X, "X", device="cpu"), as_matrix(Y, "Y", device="cpu")
    n = x.shape[0]
    method, reason = interval_method(spec, n, (x.shape[1], y.shape[1]))
    gram = spec.exact_null and n <= GRAM_LIMIT and null == "moments" and n_perm > 0
    lo = hi = centre = null_mean = p_value = None
    if gram:
        cell = cka_calibration({"X": x, "Y": y}, [[value]], ["X"], ["Y"], ci=ci)
        null_mean, p_value = float(cell["null_mean"][0, 0]), float(cell["p_value"][0, 0])
        if method is not None:
            lo, hi, centre = (float(cell[k][0, 0]) for k in ("ci_low", "ci_high", "ci_centre"))
    elif method is not None:
        cell = cka_intervals({"X": x, "Y": y}, ["X"], ["Y"], ci=ci)
        lo, hi, centre = (float(cell[k][0, 0]) for k in ("ci_low", "ci_high", "ci_centre"))
    if lo is not None and not (math.isfinite(lo) and math.isfinite(hi)):
        lo = hi = centre = None
        method, reason = None, "a delete-one self-HSIC is not positive: too few examples."
    kind = None if not n_perm else "moments" if gram else "permutation"
    if kind == "permutation":
        null_mean, p_value = _permutation_null(spec, x, y, value, n_perm, rng_seed)
    return Calibrated(
        value,
        lo,
        hi,
        null_mean,
        p_value,
        spec.name,
        n,
        n_perm,
        ci,
        kind,
        centre,
        method,
        CI_TARGET,
        reason,
    )
