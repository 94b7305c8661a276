"""Populations of paired representations whose similarity is known exactly: the ground
truth for checking that an interval covers its population value, at any n and width.

Latent factors z ~ N(0, I) feed ReLU features ``F = relu(z W)`` (nonlinear, skewed, with
means many standard deviations from zero after the ReLU, as real post-activation layers
have). Two read-outs of them:

- ``kind="relu"``: X = relu(z W_x) + noise, Y = relu(z W_y) + noise, where Y's loadings
  use a fraction ``shared`` of X's latent factors and private ones for the rest.
- ``kind="readout"``: Y = relu(z W_x) R + noise, a random linear read-out of X's own
  features (population CKA near 1 as the noise vanishes).

Their second moments are exact (the arc-cosine kernel: for jointly Gaussian u, v,
E[relu(u) relu(v)] = s_u s_v (sin t + (pi - t) cos t) / (2 pi) with cos t their
correlation), so population linear CKA ``||S_xy||^2 / (||S_xx|| ||S_yy||)`` and
Procrustes ``||S_xy||_* / sqrt(tr S_xx tr S_yy)`` need no sampling.

Examples:
    >>> import torch
    >>> from invsim.similarity.populations import Population
    >>> pop = Population(widths=(84, 512), shared=0.5, noise=0.5, rng_seed=0)
    >>> x, y = pop.draw(256, torch.Generator().manual_seed(1))
    >>> x.shape, y.shape, 0 < pop.cka < 1
    (torch.Size([256, 84]), torch.Size([256, 512]), True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["Population", "relu_covariance"]


def relu_covariance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cov(relu(z a_i), relu(z b_j)) for z ~ N(0, I), over the columns of a (k, d_a) and b
    (k, d_b): the arc-cosine kernel minus the product of the means s / sqrt(2 pi)."""
    na, nb = a.norm(dim=0), b.norm(dim=0)
    scale = torch.outer(na, nb).clamp(min=1e-300)
    rho = ((a.T @ b) / scale).clamp(-1.0, 1.0)
    theta = torch.arccos(rho)
    return scale / (2 * math.pi) * (torch.sin(theta) + (math.pi - theta) * rho - 1.0)


@dataclass
class Population:
    """Paired representations with exact population CKA and Procrustes (module doc).

    ``widths``: (d_x, d_y); ``latent``: latent factors per side; ``shared``: the fraction
    of X's factors Y uses (``kind="relu"``); ``noise``: the standard deviation of the
    isotropic noise added to each side."""

    widths: tuple[int, int]
    shared: float = 1.0
    noise: float = 0.1
    kind: str = "relu"
    latent: int = 32
    rng_seed: int = 0
    cka: float = field(init=False)
    procrustes: float = field(init=False)

    def __post_init__(self) -> None:
        if self.kind not in ("relu", "readout"):
            raise ValueError(f"kind must be 'relu' or 'readout'; got {self.kind!r}.")
        g = torch.Generator().manual_seed(self.rng_seed)
        k, (dx, dy) = self.latent, self.widths
        ks = round(self.shared * k)
        wx = torch.zeros(2 * k, dx, dtype=torch.float64)
        wx[:k] = torch.randn(k, dx, generator=g, dtype=torch.float64) / math.sqrt(k)
        wy = torch.zeros(2 * k, dy, dtype=torch.float64)
        wy[:ks] = torch.randn(ks, dy, generator=g, dtype=torch.float64) / math.sqrt(k)
        wy[k : 2 * k - ks] = torch.randn(k - ks, dy, generator=g, dtype=torch.float64) / math.sqrt(
            k
        )
        self._wx, self._wy = wx, wy
        self._r = torch.randn(dx, dy, generator=g, dtype=torch.float64) / math.sqrt(dx)
        fx = relu_covariance(wx, wx)
        if self.kind == "relu":
            sxy, syy = relu_covariance(wx, wy), relu_covariance(wy, wy)
        else:
            sxy, syy = fx @ self._r, self._r.T @ fx @ self._r
        sxx = fx + self.noise**2 * torch.eye(dx, dtype=torch.float64)
        syy = syy + self.noise**2 * torch.eye(dy, dtype=torch.float64)
        self.cka = float((sxy**2).sum() / (sxx.norm() * syy.norm()))
        nuclear = torch.linalg.svdvals(sxy).sum()
        self.procrustes = float(nuclear / (torch.trace(sxx) * torch.trace(syy)).sqrt())

    def draw(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n examples of (X, Y), float64."""
        z = torch.randn(n, 2 * self.latent, generator=generator, dtype=torch.float64)
        fx = torch.relu(z @ self._wx)
        clean = torch.relu(z @ self._wy) if self.kind == "relu" else fx @ self._r
        dx, dy = self.widths
        x = fx + self.noise * torch.randn(n, dx, generator=generator, dtype=torch.float64)
        y = clean + self.noise * torch.randn(n, dy, generator=generator, dtype=torch.float64)
        return x, y
