"""Per-example limited-memory BFGS (L-BFGS) steps: the ``lbfgs`` rule, the ``converge`` schedule.

The rule minimises, per example, ``phi(x) = loss(x)^2 / 2`` (``loss`` the relative
representation loss) with quasi-Newton steps: each example keeps its last ``memory``
curvature pairs ``s = x_new - x_old``, ``y = g_new - g_old`` (``g`` the gradient of
``phi``), and its direction is ``-H g`` with ``H`` the L-BFGS inverse-Hessian estimate,
scaled by ``gamma = s.y / y.y`` of the newest pair. ``H g`` is computed in the compact
form of Byrd, Nocedal & Schnabel (1994, eq. 3.5): a few batched matrix products and an
m x m triangular solve per example, instead of the two-loop recursion's 4m small vector
operations (the tests check the two agree). A representation that is piecewise linear in
the input (ReLU, max-pool, convolutions) makes ``phi`` piecewise quadratic, and there
L-BFGS learns the curvature that fixed-length first-order steps zig-zag across. One step
costs one forward and backward, like a momentum step.

The rule, per example:

- **Step.** From the best iterate, ``x = best + lr d`` with ``d`` the direction on the
  free pixels (a pixel at the [0, 1] box that a descent step would push outward is
  held); with no curvature pair yet, ``step_size`` along the normalised gradient.
- **Acceptance.** A point with a lower loss than the best is accepted: its step and
  gradient change become a curvature pair (where ``s.y > 0``) and the next step is a
  full one (``lr = 1``). A refused point cuts ``lr`` to a quarter; after 7 refusals in a
  row the history is cleared.
- **Stall.** An example whose best loss gained less than ``stop_tol`` (relative) over
  ``horizon`` passes while above ``loss_tol`` is handed over (``stall="paper-steps"``,
  the default) to the paper's normalised momentum steps from its best iterate: on a
  landscape of max-pool and ReLU kinks the quasi-Newton model stops predicting, while
  fixed normalised steps keep creeping down. It stops at its next stalled horizon.
  ``stall="stop"`` stops it at once.
- **Stop.** Once its best loss is at most ``loss_tol``, or as above.

Every quantity is per example: the batch holds one history per row, so a row's
direction does not depend on the other rows. Memory: ``2 memory + 2`` images per example
in the batch (12 MB at 224 x 224 with ``memory=10``); no graph is kept across steps.

Examples:
    >>> import torch
    >>> from invsim.inversion.lbfgs import History, direction
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

from invsim.inversion.momentum import momentum_update
from invsim.inversion.rules import (
    Rows,
    RowState,
    StepRule,
    horizon_stalled,
    register,
    rows_like,
)
from invsim.inversion.settings import LbfgsSettings, MomentumSettings
from invsim.steps import l2_norm

__all__ = [
    "History",
    "Lbfgs",
    "LbfgsSettings",
    "curvature_ok",
    "direction",
    "free_pixels",
]

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


def free_pixels(x: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """1 where a pixel may move, 0 where it sits at the [0, 1] box and a descent step
    (along ``-gradient``) would push it outward."""
    held = ((x <= 0) & (gradient > 0)) | ((x >= 1) & (gradient < 0))
    return (~held).to(x.dtype)


@dataclass
class LbfgsState(RowState):
    best_grad: torch.Tensor  # the gradient of loss^2 / 2 at the best iterate, flat
    history: History
    lr: torch.Tensor  # the step's scale (1: a full step)
    window: torch.Tensor  # the best loss at the start of this horizon
    handed: torch.Tensor  # takes the paper's steps now (bool)
    restart: torch.Tensor  # handed over at the last stop test: the next step is its first
    m: torch.Tensor  # the paper's steps' momentum


@register
class Lbfgs(StepRule):
    """The L-BFGS rule (see the module's description)."""

    Settings = LbfgsSettings

    def start(self, seed: torch.Tensor) -> LbfgsState:
        k, width, dev, dtype = len(seed), seed[0].numel(), seed.device, seed.dtype
        memory = self.settings.memory
        return LbfgsState(
            best_grad=torch.zeros(k, width, device=dev, dtype=dtype),
            history=History.empty(k, memory=memory, width=width, device=dev, dtype=dtype),
            lr=torch.ones(k, device=dev, dtype=dtype),
            window=torch.full((k,), float("inf"), device=dev, dtype=dtype),
            handed=torch.zeros(k, dtype=torch.bool, device=dev),
            restart=torch.zeros(k, dtype=torch.bool, device=dev),
            m=torch.zeros_like(seed),
        )

    def observe(self, rows: Rows, state: LbfgsState) -> None:
        """The acceptance test (a point with a lower loss than the best), the curvature
        pair it makes, and the step's scale; rows on the paper's steps only observe."""
        state.window = torch.where(rows.it == 0, rows.loss, state.window)
        if rows.grad is None:
            return
        grad = (rows.grad * rows_like(rows.loss, rows.grad)).flatten(1)  # of loss^2 / 2
        accept = rows.loss < rows.best_loss
        pair = accept & torch.isfinite(rows.best_loss) & ~state.handed
        step, change = (rows.x - rows.best_x).flatten(1), grad - state.best_grad
        state.history.push(step, change, pair & curvature_ok(step, change))
        state.best_grad = torch.where(accept[:, None], grad, state.best_grad)
        state.lr = torch.where(accept, 1.0, state.lr * 0.25)
        reset = state.lr < 0.25**7
        state.history.clear(reset)
        state.lr = torch.where(reset, 1.0, state.lr)

    def step(self, rows: Rows, state: LbfgsState) -> torch.Tensor:
        """An L-BFGS step from the best iterate, or the paper's step from the iterate."""
        x = self._quasi_newton(rows, state)
        if not bool(state.handed.any()):
            return x
        assert rows.grad is not None
        # a row handed over at the last stop test starts from its best iterate
        first = rows_like(state.restart, x)
        grad = torch.where(first, state.best_grad.view_as(x), rows.grad)
        start = torch.where(first, rows.best_x, rows.x)
        state.m = torch.where(first, 0.0, state.m)
        momentum_update(state.m, grad, MomentumSettings().momentum)
        paper = rows.constrain(torch.add(start, state.m, alpha=-self.settings.step_size))
        state.restart = torch.zeros_like(state.restart)
        return torch.where(rows_like(state.handed, x), paper, x)

    def _quasi_newton(self, rows: Rows, state: LbfgsState) -> torch.Tensor:
        grad = state.best_grad.view_as(rows.x)
        free = free_pixels(rows.best_x, grad)
        d = direction(grad * free, state.history) * free
        first = self.settings.step_size / (l2_norm(d) + 1e-12)
        d = torch.where(rows_like(state.history.count == 0, d), d * first, d)
        return rows.constrain(rows.best_x + rows_like(state.lr, d) * d)

    def stop(self, rows: Rows, state: LbfgsState) -> torch.Tensor:
        cfg = self.settings
        reached = rows.best_loss <= cfg.loss_tol
        stalled = horizon_stalled(rows.it, rows.best_loss, state.window, cfg, reached)
        if cfg.stall == "stop":
            return reached | stalled
        hand = stalled & ~state.handed  # from its best iterate, from zero momentum
        state.handed, state.restart = state.handed | hand, hand
        return reached | (stalled & ~hand)
