"""Matrix-free, per-example Gauss-Newton (Levenberg-Marquardt) steps in input space.

For an image x with representation residual ``r = Rep(x) - Rep(t)`` (k values) and the
Jacobian ``J = dRep/dx`` (k x d), the damped minimum-norm Gauss-Newton step is

    dx = -J_F^T (J_F J_F^T + lambda I)^{-1} r,

where ``J_F`` keeps only the *free* pixels: a pixel at the [0, 1] box that the gradient
``J^T r`` pushes outward is held fixed. The k x k system is solved by a few conjugate-
gradient iterations, each one vector-Jacobian product (a backward pass through the graph
of one forward) and one Jacobian-vector product (a forward pass in forward-mode AD): no
Jacobian is formed and no graph outlives the step. ``lambda`` is ``damping`` times the
Rayleigh quotient ``||J_F^T r||^2 / ||r||^2`` of the current point, so that the damping is
relative to the scale of ``J J^T`` and means the same for every model and example.

Everything is per example: each row of the batch has its own residual, damping and CG
scalars, so a row's step does not depend on the other rows.

Examples:
    >>> import torch
    >>> from invsim.gauss_newton import gauss_newton_step
    >>> W = torch.randn(3, 8, dtype=torch.float64)
    >>> rep = lambda x: x.flatten(1) @ W.T      # a linear representation
    >>> x, t = torch.full((2, 8), 0.5, dtype=torch.float64), torch.rand(2, 8, dtype=torch.float64)
    >>> target = rep(0.45 + 0.1 * t)
    >>> step = gauss_newton_step(rep, x, target, torch.zeros(2, dtype=torch.float64))
    >>> bool(((rep(x + step.dx) - target).norm(dim=1) < 1e-9).all())
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD

__all__ = ["GaussNewtonStep", "free_pixels", "gauss_newton_step", "jvp"]

_TINY = 1e-30


@dataclass
class GaussNewtonStep:
    """``dx``: the step (the input's shape; zero on held pixels). ``rep``: Rep(x) at the
    point the step was computed at. ``scale``: the Rayleigh quotient that ``damping``
    multiplies. ``gradient``: ``J^T r`` (the gradient of ``||r||^2 / 2``)."""

    dx: torch.Tensor
    rep: torch.Tensor
    scale: torch.Tensor
    gradient: torch.Tensor


def jvp(rep: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, w: torch.Tensor):
    """``J w`` at ``x`` (forward-mode AD; one forward pass, no graph kept)."""
    with fwAD.dual_level():
        out = rep(fwAD.make_dual(x, w.to(x.dtype)))
        tangent = fwAD.unpack_dual(out).tangent
    if tangent is None:  # the representation does not depend on the input
        return torch.zeros(out.shape, dtype=out.dtype, device=out.device)
    return tangent


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.flatten(1) * b.flatten(1)).sum(dim=1)


def free_pixels(x: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """1 where a pixel may move, 0 where it sits at the [0, 1] box and a descent step
    (along ``-gradient``) would push it outward."""
    held = ((x <= 0) & (gradient > 0)) | ((x >= 1) & (gradient < 0))
    return (~held).to(x.dtype)


def gauss_newton_step(
    rep: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    target_rep: torch.Tensor,
    damping: torch.Tensor,
    *,
    cg_iterations: int = 10,
) -> GaussNewtonStep:
    """The damped Gauss-Newton step of every row of ``x`` towards ``target_rep``.

    ``rep`` maps images (N, ...) to representations (N, k); ``damping`` (N,) is each
    row's relative damping (0: the undamped minimum-norm step). The cost is one forward
    with a graph plus ``cg_iterations`` JVP + VJP pairs; the graph is released on return.
    """
    x = x.detach().requires_grad_(True)
    z = rep(x)
    r = (z - target_rep).detach()
    view = (-1,) + (1,) * (x.ndim - 1)

    def vjp(v: torch.Tensor) -> torch.Tensor:
        (g,) = torch.autograd.grad(z, x, v, retain_graph=True)
        return g

    gradient = vjp(r)
    free = free_pixels(x.detach(), gradient)
    xd = x.detach()
    jt_p = gradient * free  # J_F^T p for p = r, the first search direction
    scale = _dot(jt_p, jt_p) / _dot(r, r).clamp_min(_TINY)
    lam = damping * scale
    u_dx = torch.zeros_like(xd)  # J_F^T u, accumulated with u
    res, p = r.clone(), r.clone()
    rs = _dot(res, res)
    for k in range(cg_iterations):
        if k:
            jt_p = vjp(p) * free
        ap = jvp(rep, xd, jt_p).detach() + lam[:, None] * p
        p_ap = _dot(p, ap)
        alpha = torch.where(p_ap > _TINY, rs / p_ap.clamp_min(_TINY), torch.zeros_like(rs))
        u_dx = u_dx + alpha.view(view) * jt_p
        res = res - alpha[:, None] * ap
        rs_new = _dot(res, res)
        beta = torch.where(rs > _TINY, rs_new / rs.clamp_min(_TINY), torch.zeros_like(rs))
        p = res + beta[:, None] * p
        rs = rs_new
    return GaussNewtonStep(dx=-u_dx, rep=z.detach(), scale=scale, gradient=gradient)
