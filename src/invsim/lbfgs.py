"""Per-example limited-memory BFGS (L-BFGS) directions in input space.

The inversion's ``method="lbfgs"`` minimises, per example, ``phi(x) = loss(x)^2 / 2``
(``loss`` the relative representation loss) with quasi-Newton steps: each example keeps
its last ``memory`` curvature pairs ``s = x_new - x_old``, ``y = g_new - g_old`` (``g``
the gradient of ``phi``), and its direction is ``-H g`` with ``H`` the L-BFGS
inverse-Hessian estimate, scaled by ``gamma = s.y / y.y`` of the newest pair. ``H g`` is
computed in the compact form of Byrd, Nocedal & Schnabel (1994, eq. 3.5): a few batched
matrix products and an m x m triangular solve per example, instead of the two-loop
recursion's 4m small vector operations (the tests check the two agree). A representation that is
piecewise linear in the input (ReLU, max-pool, convolutions) makes ``phi`` piecewise
quadratic, and there L-BFGS learns the curvature that fixed-length first-order steps
zig-zag across. One step costs one forward and backward, like a momentum step.

Every quantity is per example: the batch holds one history per row, so a row's
direction does not depend on the other rows. A pair enters a row's history only where
the caller says (an accepted step with positive curvature ``s.y``).

Examples:
    >>> import torch
    >>> from invsim.lbfgs import History, direction
    >>> A = torch.diag(torch.tensor([1.0, 10.0], dtype=torch.float64))
    >>> h = History.empty(1, memory=3, width=2, dtype=torch.float64)
    >>> s = torch.tensor([[-0.5, -0.8]], dtype=torch.float64)
    >>> h.push(s, s @ A, torch.tensor([True]))             # a quadratic's curvature pair
    >>> d = direction(s @ A, h)                             # H y = s: the secant equation
    >>> bool(torch.allclose(-d, s))
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["History", "curvature_ok", "direction"]

_TINY = 1e-30


@dataclass
class History:
    """Each row's last ``memory`` curvature pairs, in a ring: ``s`` and ``y`` (N, m, D),
    the pair number ``count`` (N,) written to slot ``count % m``. Slots never written
    are zero; :meth:`clear` empties rows."""

    s: torch.Tensor
    y: torch.Tensor
    count: torch.Tensor

    @classmethod
    def empty(cls, n: int, *, memory: int, width: int, **tensor: Any) -> History:
        s = torch.zeros(n, memory, width, **tensor)
        count = torch.zeros(n, dtype=torch.int64, device=s.device)
        return cls(s, s.clone(), count)

    def push(self, s: torch.Tensor, y: torch.Tensor, rows: torch.Tensor) -> None:
        """Append the pair (s, y) (N, ...) on ``rows`` (N,), dropping the row's oldest."""
        m = self.s.shape[1]
        if m == 0 or not bool(rows.any()):
            return
        i = rows.nonzero().squeeze(1)
        slot = self.count[i] % m
        self.s[i, slot] = s.flatten(1)[i].to(self.s.dtype)
        self.y[i, slot] = y.flatten(1)[i].to(self.y.dtype)
        self.count[i] += 1

    def clear(self, rows: torch.Tensor) -> None:
        """Forget every pair of ``rows`` (N,)."""
        if bool(rows.any()):
            self.s[rows] = 0.0
            self.y[rows] = 0.0
            self.count[rows] = 0

    def __getitem__(self, keep: torch.Tensor) -> History:
        """The rows ``keep`` (a copy)."""
        return History(self.s[keep], self.y[keep], self.count[keep])

    def cat(self, other: History) -> History:
        """These rows, then ``other``'s."""
        return History(
            torch.cat([self.s, other.s]),
            torch.cat([self.y, other.y]),
            torch.cat([self.count, other.count]),
        )


def curvature_ok(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per row, whether the pair (s, y) has the positive curvature a BFGS update needs
    (``s.y > 1e-10 ||s|| ||y||``: the update then keeps ``H`` positive definite)."""
    s, y = s.flatten(1), y.flatten(1)
    return (s * y).sum(1) > 1e-10 * s.norm(dim=1) * y.norm(dim=1)


def direction(grad: torch.Tensor, history: History) -> torch.Tensor:
    """``-H g`` per row (``grad`` (N, ...); the direction has its shape). A row with no
    pair gets ``-g``.

    Compact form: ``H g = gamma g + S a + gamma Y b`` with, in the pairs' order (oldest
    first), ``b = -R^{-1} S^T g`` and ``a = R^{-T} ((D + gamma Y^T Y)(-b) - gamma Y^T g)``,
    where ``R`` is the upper triangle of ``S^T Y`` and ``D`` its diagonal. The small
    matrices are formed in float64. An empty slot has zero ``s`` and ``y`` and a unit
    diagonal in ``R``, so it adds nothing.
    """
    S, Y, m = history.s, history.y, history.s.shape[1]
    g = grad.flatten(1).to(S.dtype)
    if m == 0:
        return -grad
    # the small matrices in the pairs' order (oldest or empty first, newest last); the
    # big ones stay in ring order, and the coefficients go back to it at the end
    order = (history.count[:, None] + torch.arange(m, device=S.device)) % m
    rows, cols = order[:, :, None].expand(-1, m, m), order[:, None, :].expand(-1, m, m)
    sg = torch.bmm(S, g[:, :, None]).squeeze(2).double().gather(1, order)
    yg = torch.bmm(Y, g[:, :, None]).squeeze(2).double().gather(1, order)
    sy = torch.bmm(S, Y.transpose(1, 2)).double().gather(1, rows).gather(2, cols)  # s_i . y_j
    yy = torch.bmm(Y, Y.transpose(1, 2)).double().gather(1, rows).gather(2, cols)
    d = torch.diagonal(sy, dim1=1, dim2=2)
    filled = d > 0
    newest = d[:, -1] / yy[:, -1, -1].clamp_min(_TINY)
    gamma = torch.where(filled[:, -1], newest, torch.ones_like(newest))[:, None, None]
    R = torch.triu(sy) + torch.diag_embed((~filled).double())
    u = torch.linalg.solve_triangular(R, sg[:, :, None], upper=True)  # R^{-1} S^T g
    rhs = (torch.diag_embed(d) + gamma * yy) @ u - gamma * yg[:, :, None]
    a = torch.linalg.solve_triangular(R.transpose(1, 2), rhs, upper=False)
    coef_s = torch.zeros_like(sg).scatter(1, order, a.squeeze(2)).to(S.dtype)
    coef_y = torch.zeros_like(sg).scatter(1, order, (-gamma * u).squeeze(2)).to(S.dtype)
    hg = gamma[:, 0].to(S.dtype) * g
    hg = hg + torch.bmm(coef_s[:, None], S).squeeze(1) + torch.bmm(coef_y[:, None], Y).squeeze(1)
    return (-hg).view(grad.shape).to(grad.dtype)
