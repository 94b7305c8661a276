"""Streaming CKA accumulators, each following :mod:`invsim.similarity.accumulator`'s
contract (``update`` / ``merge`` / ``compute`` / ``reset``, summed ``state_tensors``).

``LinearCKA`` and ``StreamingPanel`` give *exact* full-data linear CKA (biased or
debiased) from batches, in memory O((sum of d)^2) independent of n. Their state is a
flat list of float64 tensors, summable across processes once every process uses the same
shift (``align`` re-shifts to the global mean).

``MinibatchCKA`` is Nguyen et al. (2021)'s minibatch estimator: a *different*
quantity, the ratio of HSIC averaged over batches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from invsim.results import SimilarityMatrix
from invsim.similarity._inputs import ArrayLike, as_matrix, check_enough, paired_batch
from invsim.similarity.accumulator import Accumulator
from invsim.similarity.core import cka_ratio, cka_ratio_matrix, hsic_from_moments
from invsim.similarity.layerwise import minibatch_hsic
from invsim.similarity.matrix import each_cell
from invsim.similarity.moments import CentredMoments

__all__ = ["CrossMoments", "LinearCKA", "MinibatchCKA", "StreamingPanel"]


class CrossMoments(Accumulator):
    """Raw moments of k views of the same examples, about a per-view shift.

    For views ``a, b`` (coordinates ``x - shift``) it keeps ``n``, ``S_a = sum x_a``,
    ``G_ab = sum x_a x_b^T`` (a <= b), and for the debiased estimator ``R1_a = sum r_a``,
    ``R2_ab = sum r_a r_b`` and ``RX_ab = sum r_a x_b`` with ``r_a = ||x_a||^2``.
    The shift is the first batch's mean, which removes the catastrophic cancellation that
    raw sums suffer when activations have large means.
    """

    FLUSH_ROWS = 16384  # low-precision products are summed over at most this many rows

    def __init__(self, k: int, *, product_dtype: torch.dtype = torch.float64) -> None:
        self.k = k
        self.product_dtype = product_dtype
        self.reset()

    def reset(self) -> None:
        k = self.k
        self.n = torch.zeros((), dtype=torch.float64)
        self.shift: list[torch.Tensor] | None = None
        self.S: list[torch.Tensor] = []
        self.G: dict[tuple[int, int], torch.Tensor] = {}
        self.R1 = torch.zeros(k, dtype=torch.float64)
        self.R2 = torch.zeros(k, k, dtype=torch.float64)
        self.RX: dict[tuple[int, int], torch.Tensor] = {}
        self._pending: dict[tuple[int, int], torch.Tensor] = {}  # G's low-precision part
        self._pending_rows = 0

    @property
    def dims(self) -> list[int] | None:
        return None if self.shift is None else [int(s.numel()) for s in self.shift]

    def _init(self, shift: list[torch.Tensor]) -> None:
        dev = shift[0].device
        self.shift = [s.double() for s in shift]
        self.n = self.n.to(dev)
        self.S = [torch.zeros_like(s) for s in self.shift]
        self.G = {
            (a, b): torch.zeros(shift[a].numel(), shift[b].numel(), dtype=torch.float64, device=dev)
            for a in range(self.k)
            for b in range(a, self.k)
        }
        self.R1 = self.R1.to(dev)
        self.R2 = self.R2.to(dev)
        self.RX = {
            (a, b): torch.zeros_like(self.shift[b]) for a in range(self.k) for b in range(self.k)
        }

    def update(self, views: Sequence[torch.Tensor]) -> None:
        """Add a batch: ``views[a]`` is an (m, d_a) float tensor (float64, or any float
        dtype with a lower ``product_dtype``, which the batch is then computed in)."""
        if self.shift is None:
            self._init([v.double().mean(dim=0) for v in views])
        assert self.shift is not None
        low = self.product_dtype != torch.float64
        dtype = self.product_dtype if low else torch.float64
        xs = [(v - s.to(v.dtype)).to(dtype) for v, s in zip(views, self.shift, strict=True)]
        r = torch.stack([torch.linalg.vector_norm(x, dim=1) for x in xs]).square()  # (k, m)
        self.n += xs[0].shape[0]
        for a in range(self.k):
            for b in range(a, self.k):
                if low:  # shifted data are well conditioned; products in a faster dtype,
                    # summed in place over a few batches, then added to the float64 sums
                    if (a, b) not in self._pending:
                        self._pending[a, b] = torch.zeros_like(self.G[a, b], dtype=dtype)
                    self._pending[a, b].addmm_(xs[a].T, xs[b])
                else:
                    self.G[a, b].addmm_(xs[a].T, xs[b])
        weights = torch.cat([torch.ones_like(r[:1]), r])  # (1 + k, m)
        for b in range(self.k):
            sums = weights @ xs[b]  # one pass: sum_i x_b[i], and sum_i r_a[i] x_b[i] per a
            self.S[b] += sums[0]
            for a in range(self.k):
                self.RX[a, b] += sums[1 + a]
        self.R1 += r.sum(dim=1)
        self.R2 += (r @ r.T).double()
        self._pending_rows += xs[0].shape[0]
        if self._pending_rows >= self.FLUSH_ROWS:
            self._flush()

    def _flush(self) -> None:
        """Add the low-precision partial products into the float64 sums."""
        for key, part in self._pending.items():
            self.G[key] += part
            part.zero_()
        self._pending_rows = 0

    def _g(self, a: int, b: int) -> torch.Tensor:
        return self.G[a, b] if a <= b else self.G[b, a].T

    def reshift(self, new_shift: Sequence[torch.Tensor]) -> None:
        """Re-express all moments about ``new_shift`` (exact algebra, no data needed)."""
        self._flush()
        assert self.shift is not None
        n = self.n
        d = [old - new for old, new in zip(self.shift, new_shift, strict=True)]
        c = torch.stack([dd @ dd for dd in d])
        t = torch.stack([dd @ s for dd, s in zip(d, self.S, strict=True)])
        k = self.k
        R2 = self.R2.clone()
        for a in range(k):
            for b in range(k):
                R2[a, b] = (
                    self.R2[a, b]
                    + 2 * d[b] @ self.RX[a, b]
                    + 2 * d[a] @ self.RX[b, a]
                    + 4 * d[a] @ self._g(a, b) @ d[b]
                    + c[b] * (self.R1[a] + 2 * t[a])
                    + c[a] * (self.R1[b] + 2 * t[b])
                    + n * c[a] * c[b]
                )
        RX = {}
        for a in range(k):
            for b in range(k):
                RX[a, b] = (
                    self.RX[a, b]
                    + d[b] * (self.R1[a] + 2 * t[a] + n * c[a])
                    + 2 * self._g(b, a) @ d[a]
                    + c[a] * self.S[b]
                )
        G = {}  # g + S_a d_b^T + d_a S_b^T + n d_a d_b^T, as two rank-one updates
        for (a, b), g in self.G.items():
            G[a, b] = torch.addr(g, self.S[a] + n * d[a], d[b]).addr_(d[a], self.S[b])
        self.R1 = self.R1 + 2 * t + n * c
        self.S = [s + n * dd for s, dd in zip(self.S, d, strict=True)]
        self.R2, self.RX, self.G = R2, RX, G
        self.shift = [s.clone() for s in new_shift]

    def copy(self) -> CrossMoments:
        self._flush()
        out = CrossMoments(self.k, product_dtype=self.product_dtype)
        out.n = self.n.clone()
        out.shift = None if self.shift is None else [s.clone() for s in self.shift]
        out.S = [s.clone() for s in self.S]
        out.G = {key: v.clone() for key, v in self.G.items()}
        out.R1, out.R2 = self.R1.clone(), self.R2.clone()
        out.RX = {key: v.clone() for key, v in self.RX.items()}
        return out

    def merge(self, other: Accumulator) -> CrossMoments:
        """Add ``other``'s moments (re-shifted to ours when shifts differ). Returns self."""
        self._check_mergeable(other)
        assert isinstance(other, CrossMoments)
        if other.shift is None:
            return self
        if self.shift is None:
            src = other.copy()
            self.__dict__.update(src.__dict__)
            return self
        if self.dims != other.dims:
            raise ValueError(f"cannot merge accumulators of dims {self.dims} and {other.dims}.")
        o = other.copy()
        o.reshift(self.shift)
        self.n += o.n
        self.S = [a + b for a, b in zip(self.S, o.S, strict=True)]
        for key in self.G:
            self.G[key] += o.G[key]
        for key in self.RX:
            self.RX[key] += o.RX[key]
        self.R1 += o.R1
        self.R2 += o.R2
        return self

    def align(self, all_reduce: Any) -> None:
        """Re-shift to the mean over all processes (an all-reduce of n and the raw sums),
        after which the moments of all processes sum exactly."""
        if self.shift is None:
            raise ValueError("this process saw no data; give every process at least one batch.")
        n = self.n.clone()
        raw = [sh * self.n + s for sh, s in zip(self.shift, self.S, strict=True)]
        all_reduce(n)
        for t in raw:
            all_reduce(t)
        self.reshift([t / n for t in raw])

    def state_tensors(self) -> list[torch.Tensor]:
        """All state tensors in a fixed order (for all-reduce after a common ``reshift``)."""
        self._flush()
        out = [self.n, *self.S, self.R1, self.R2]
        out += [self.G[key] for key in sorted(self.G)]
        out += [self.RX[key] for key in sorted(self.RX)]
        return out

    def compute(self) -> CentredMoments:
        """The moments about the data's own mean, for every measure of
        :mod:`invsim.similarity.moments`. Raises for too few examples or a constant view."""
        if self.shift is None:
            raise ValueError("no data: call update() before compute().")
        n = int(self.n)
        check_enough(n, debiased=False)
        self._flush()
        c = CrossMoments(self.k, product_dtype=self.product_dtype)
        c.__dict__.update(self.__dict__)  # shared tensors: reshift rebinds, never writes them
        c._pending = {}
        mean = [sh + s / n for sh, s in zip(self.shift, self.S, strict=True)]
        c.reshift(mean)
        for a in range(self.k):
            spread = float(c.R1[a])
            scale = spread + n * float(mean[a] @ mean[a])
            if spread <= 1e-13 * scale:
                raise ValueError(
                    f"view {a} is constant across all {n} examples (zero variance); CKA is "
                    "undefined for it. A dead layer or a constant input is the usual cause."
                )
        G = {key: g.cpu() for key, g in c.G.items()}
        return CentredMoments(n, G, c.R1.cpu(), c.R2.cpu())

    def hsic_matrix(self, *, debiased: bool) -> torch.Tensor:
        """(k, k) matrix of linear HSIC between views, on mean-centred data."""
        if self.shift is not None:
            check_enough(int(self.n), debiased=debiased)
        c = self.compute()
        cross = torch.empty(self.k, self.k, dtype=torch.float64)
        for a, b in c.G:
            cross[a, b] = cross[b, a] = torch.linalg.matrix_norm(c.G[a, b]) ** 2
        r1 = c.R1
        return hsic_from_moments(cross, c.R2, r1[:, None], r1[None, :], c.n, debiased=debiased)


class _OnMoments(Accumulator):
    """An accumulator whose state is one :class:`CrossMoments`."""

    moments: CrossMoments

    @property
    def n(self) -> int:
        return int(self.moments.n)

    def state_tensors(self) -> list[torch.Tensor]:
        return self.moments.state_tensors()

    def align(self, all_reduce: Any) -> None:
        self.moments.align(all_reduce)

    def reset(self) -> None:
        self.moments.reset()

    def merge(self, other: Accumulator) -> _OnMoments:
        """Add another accumulator's data (e.g. from another process). Returns self."""
        self._check_mergeable(other)
        assert isinstance(other, _OnMoments)
        self.moments.merge(other.moments)
        return self


class LinearCKA(_OnMoments):
    """Exact linear CKA accumulated over batches.

    Equal to :func:`invsim.linear_cka` on the concatenated batches (to ~1e-10 in
    float64) for any split. ``compute(debiased=...)`` can give both forms from one pass.
    ``product_dtype=torch.float32`` keeps float32 input as it is and runs the d x d
    products of each (shifted) batch in float32, summed in place over up to
    ``CrossMoments.FLUSH_ROWS`` rows and then into float64 sums: faster, and accurate to
    ~1e-6 (speed and error: benchmarks/bench_cka.py, results in benchmarks/results/).

    Examples:
        >>> import torch
        >>> from invsim import LinearCKA, linear_cka
        >>> g = torch.Generator().manual_seed(0)
        >>> X, Y = torch.randn(300, 8, generator=g), torch.randn(300, 5, generator=g)
        >>> acc = LinearCKA()
        >>> for xb, yb in zip(X.split(64), Y.split(64)):
        ...     acc.update(xb, yb)
        >>> abs(acc.compute() - linear_cka(X, Y)) < 1e-10
        True
    """

    def __init__(
        self, *, debiased: bool = False, product_dtype: torch.dtype = torch.float64
    ) -> None:
        self.debiased = debiased
        self.moments = CrossMoments(2, product_dtype=product_dtype)

    def update(self, x_batch: ArrayLike, y_batch: ArrayLike) -> None:
        low = self.moments.product_dtype != torch.float64  # keep float32 input as it is
        x, y = paired_batch(x_batch, y_batch, dtype=None if low else torch.float64)
        dims = self.moments.dims
        if dims is not None and dims != [x.shape[1], y.shape[1]]:
            raise ValueError(
                f"batch feature sizes {[x.shape[1], y.shape[1]]} differ from earlier ones {dims}."
            )
        self.moments.update([x, y])

    def compute(self, *, debiased: bool | None = None) -> float:
        h = self.moments.hsic_matrix(debiased=self.debiased if debiased is None else debiased)
        return float(cka_ratio_matrix(h, ["X", "Y"])[0, 1])


class StreamingPanel(_OnMoments):
    """Every streaming measure (linear CKA, debiased CKA, Procrustes, the CCA family, R²)
    between k named representations, from one streamed pass of cross-moments; exact.

    ``update({"resnet": rep_a, "vgg": rep_b, ...})`` with batches of the same examples;
    ``compute(measures)`` returns measure name -> :class:`SimilarityMatrix` (default:
    linear CKA), like the regimes' functions.

    Examples:
        >>> import torch
        >>> from invsim import StreamingPanel
        >>> g = torch.Generator().manual_seed(0)
        >>> X = torch.randn(100, 6, generator=g)
        >>> acc = StreamingPanel(["a", "b"])
        >>> acc.update({"a": X, "b": 2 * X + 1})
        >>> round(acc.compute()["linear_cka"]["a", "b"], 8)
        1.0
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"names must be unique; got {self.names}.")
        self.moments = CrossMoments(len(self.names))

    def update(self, batches: Mapping[str, ArrayLike]) -> None:
        missing = [k for k in self.names if k not in batches]
        if missing:
            raise ValueError(f"batch lacks representations for {missing}.")
        views = [as_matrix(batches[k], k) for k in self.names]
        sizes = {k: v.shape[0] for k, v in zip(self.names, views, strict=True)}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"batch sizes differ between representations: {sizes}.")
        self.moments.update(views)

    def _check_mergeable(self, other: Accumulator) -> None:
        super()._check_mergeable(other)
        assert isinstance(other, StreamingPanel)
        if other.names != self.names:
            raise ValueError(f"cannot merge matrices over {other.names} into {self.names}.")

    def compute(
        self,
        measures: Sequence[Any] = ("linear_cka",),
        *,
        rows: Sequence[str] | None = None,
        centred: CentredMoments | None = None,
    ) -> dict[str, SimilarityMatrix]:
        """Every streaming measure asked for (``Measure.streams``) from this one pass, for
        the ``rows`` asked (default all) against every column: entry (r, c) is
        ``measure(Rep_r, Rep_c)`` (an asymmetric measure is computed both ways).
        ``centred``: this pass's ``moments.compute()``, when the caller already has it."""
        from invsim.similarity.registry import get_measure

        centred = self.moments.compute() if centred is None else centred
        rows = list(rows or self.names)
        at = {v: i for i, v in enumerate(self.names)}
        out = {}
        for spec in measures:
            m = get_measure(spec)
            name = m.name
            if m.from_moments is None:
                raise ValueError(f"measure {name!r} does not stream from moments.")
            values = each_cell(
                rows,
                self.names,
                lambda r, c, f=m.from_moments: f(centred, at[r], at[c]),
                symmetric=m.symmetric,
            )
            out[name] = SimilarityMatrix(rows, self.names, np.array(values, dtype=float))
        return out


class MinibatchCKA(Accumulator):
    """Minibatch CKA of Nguyen et al. (2021): a different estimator from full-data CKA.

    Each batch contributes the *unbiased* HSIC (Song et al. 2012) of its linear Gram
    matrices; the sums over batches are never overwritten, and

        CKA_mb = sum_b w_b HSIC_1(X_b, Y_b) / sqrt(sum_b w_b HSIC_1(X_b, X_b) * sum_b w_b ...)

    With ``weighting="batch"`` (the default, as in Nguyen et al.) every batch has w_b = 1
    whatever its size; ``weighting="size"`` uses w_b = n_b. The value depends on the
    batch size and converges to population CKA as batches grow; it does not equal
    :func:`linear_cka` on the concatenated data. Batches of n <= 3 are rejected.
    ``product_dtype=torch.float32`` computes each batch's Gram matrices in float32 (on
    column-centred data; the sums stay float64): faster, accurate to ~1e-6. ``views``
    (default 2: X and Y) sums the (views, views) matrix of HSIC between many views of the
    same examples at once (:meth:`update_views`, :meth:`hsic_matrix`); layer-by-layer
    similarity uses it for every layer of every model.

    Examples:
        >>> import torch
        >>> from invsim import MinibatchCKA
        >>> X = torch.randn(256, 10, generator=torch.Generator().manual_seed(0))
        >>> acc = MinibatchCKA()
        >>> for xb in X.split(64):
        ...     acc.update(xb, xb)
        >>> round(acc.compute(), 8)
        1.0
    """

    def __init__(
        self,
        *,
        weighting: str = "batch",
        product_dtype: torch.dtype = torch.float64,
        views: int = 2,
    ) -> None:
        if weighting not in ("batch", "size"):
            raise ValueError(f"weighting must be 'batch' or 'size'; got {weighting!r}.")
        self.weighting = weighting
        self.product_dtype = product_dtype
        self.views = views
        self.reset()

    def reset(self) -> None:
        self.hsic = torch.zeros(self.views, self.views, dtype=torch.float64)
        self.batches = torch.zeros((), dtype=torch.float64)

    def update(self, x_batch: ArrayLike, y_batch: ArrayLike) -> None:
        """Add one batch of X and Y (views=2)."""
        if self.views != 2:
            raise ValueError(f"update(x, y) is for 2 views; this one has {self.views}.")
        low = self.product_dtype != torch.float64  # a float32 batch stays float32
        self.update_views(paired_batch(x_batch, y_batch, dtype=None if low else torch.float64))

    def update_views(self, views: Sequence[torch.Tensor]) -> None:
        """Add one batch of every view, each (m, d_v) for the same m examples."""
        w = 1.0 if self.weighting == "batch" else float(views[0].shape[0])
        self.hsic += w * minibatch_hsic(views, product_dtype=self.product_dtype)
        self.batches += 1

    def _check_mergeable(self, other: Accumulator) -> None:
        super()._check_mergeable(other)
        assert isinstance(other, MinibatchCKA)
        if (other.weighting, other.views) != (self.weighting, self.views):
            raise ValueError(
                f"cannot merge MinibatchCKA with weighting={other.weighting!r}, "
                f"views={other.views} into weighting={self.weighting!r}, views={self.views}."
            )

    def state_tensors(self) -> list[torch.Tensor]:
        return [self.hsic, self.batches]

    def hsic_matrix(self) -> torch.Tensor:
        """(views, views): the weighted sum over batches of each batch's unbiased HSIC."""
        if int(self.batches) == 0:
            raise ValueError("no data: call update() before compute().")
        return self.hsic.clone()

    def compute(self) -> float:
        """Minibatch CKA between X and Y (views 0 and 1)."""
        h = self.hsic_matrix()
        return cka_ratio(float(h[0, 1]), float(h[0, 0]), float(h[1, 1]))
