"""L-BFGS inversion steps: the compact form against the two-loop recursion, the secant
equation, convergence on a quadratic loss, stopping at loss_tol, the record."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from invsim.config import InversionConfig
from invsim.inversion import inversion_record, invert_images
from invsim.inversion.lbfgs import History, curvature_ok, direction


def _two_loop(g: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The textbook two-loop recursion (Nocedal & Wright, Algorithm 7.4) for one row,
    pairs oldest first: the independent reference for the compact form."""
    q, alphas = g.clone(), []
    for s, y in reversed(pairs):
        a = (s @ q) / (s @ y)
        alphas.append(a)
        q = q - a * y
    s, y = pairs[-1]
    r = (s @ y) / (y @ y) * q
    for (s, y), a in zip(pairs, reversed(alphas), strict=True):
        b = (y @ r) / (s @ y)
        r = r + s * (a - b)
    return -r


def _pairs(n: int, d: int, gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Curvature pairs of a random positive-definite quadratic (so s.y > 0)."""
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    hess = a @ a.T + 0.1 * torch.eye(d, dtype=torch.float64)
    out = []
    for _ in range(n):
        s = torch.randn(d, generator=gen, dtype=torch.float64)
        out.append((s, hess @ s))
    return out


@pytest.mark.parametrize("n_pairs", [1, 3, 5, 12])  # empty slots, full, and a wrapped ring
def test_the_compact_form_equals_the_two_loop_recursion(n_pairs):
    gen = torch.Generator().manual_seed(n_pairs)
    d, memory = 7, 5
    hist = History.empty(2, memory=memory, width=d, dtype=torch.float64)
    rows = [_pairs(n_pairs, d, gen), _pairs(n_pairs + 1, d, gen)]
    for i in range(n_pairs + 1):  # row 1 gets one more pair than row 0
        s = torch.stack([r[min(i, len(r) - 1)][0] for r in rows])
        y = torch.stack([r[min(i, len(r) - 1)][1] for r in rows])
        hist.push(s, y, torch.tensor([i < n_pairs, True]))
    g = torch.randn(2, d, generator=gen, dtype=torch.float64)
    got = direction(g, hist)
    for row, pairs in enumerate(rows):
        want = _two_loop(g[row], pairs[-memory:])
        assert torch.allclose(got[row], want, rtol=1e-9, atol=1e-12)
    # the newest pair satisfies the secant equation: H y = s
    s_new, y_new = rows[1][-1]
    assert torch.allclose(-direction(y_new[None].repeat(2, 1), hist)[1], s_new, rtol=1e-9)


def test_no_pair_gives_the_negative_gradient_and_clear_empties_a_row():
    hist = History.empty(2, memory=3, width=4, dtype=torch.float64)
    g = torch.randn(2, 4, dtype=torch.float64)
    assert torch.equal(direction(g, hist), -g)
    s = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]], dtype=torch.float64)
    hist.push(s, 2 * s, torch.tensor([True, True]))
    assert torch.allclose(direction(g, hist), -g / 2)  # gamma = s.y / y.y = 1/2
    hist.clear(torch.tensor([True, False]))
    assert torch.equal(direction(g, hist)[0], -g[0]) and hist.count.tolist() == [0, 1]
    assert curvature_ok(s, 2 * s).all() and not curvature_ok(s, -s).any()


class _Linear(nn.Module):
    """A classifier whose representation (the input of ``fc``) is ``W x``."""

    def __init__(self, d: int, k: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rep = nn.Linear(d, k, bias=False)
        self.fc = nn.Linear(k, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rep(x.flatten(1)))


def test_lbfgs_solves_a_quadratic_loss_where_momentum_crawls():
    # a linear representation makes loss^2 a quadratic; an ill-conditioned W makes
    # fixed-length momentum steps zig-zag, while L-BFGS learns the curvature
    d, k = 16, 4
    model = _Linear(d, k).double().eval()
    with torch.no_grad():
        model.rep.weight.mul_(torch.tensor([1.0, 3.0, 10.0, 30.0], dtype=torch.float64)[:, None])
    gen = torch.Generator().manual_seed(1)
    seeds = torch.full((3, 1, 1, d), 0.5, dtype=torch.float64)
    targets = 0.45 + 0.1 * torch.rand(3, 1, 1, d, generator=gen, dtype=torch.float64)
    kw = {"schedule": "converge", "iterations": 60, "horizon": 1000, "progress": False}
    quasi = invert_images(model, seeds, targets, loss_tol=1e-9, **kw)
    kw.pop("schedule")
    first = invert_images(model, seeds, targets, rule="converging-momentum", **kw)
    assert bool((quasi.loss <= 1e-9).all()) and int(quasi.iterations.max()) < 60
    assert float(first.loss.min()) > 1e3 * float(quasi.loss.max())
    inside = (quasi.images.double() > 0) & (quasi.images.double() < 1)
    assert bool(inside.all())  # an interior solution: the box never acted


def test_an_example_stops_once_its_loss_is_at_most_loss_tol():
    torch.manual_seed(0)
    model = _Linear(16, 4).double().eval()
    gen = torch.Generator().manual_seed(2)
    seeds = torch.rand(5, 1, 1, 16, generator=gen, dtype=torch.float64)
    targets = torch.rand(5, 1, 1, 16, generator=gen, dtype=torch.float64)
    kw = {"schedule": "converge", "iterations": 200, "progress": False}
    # every seed is within a loss of 100: the first evaluation reaches it, one pass each
    assert invert_images(model, seeds, targets, loss_tol=100.0, **kw).iterations.tolist() == [1] * 5
    r = invert_images(model, seeds, targets, loss_tol=0.05, **kw)
    stopped = r.iterations < 200
    assert bool(stopped.any()) and bool((r.loss[stopped] <= 0.05).all())


def test_the_lbfgs_record_holds_its_settings_only():
    fast = InversionConfig(schedule="converge")
    assert fast.steps.rule == "lbfgs"  # the converging schedule's rule
    rec = inversion_record(fast)
    assert rec["rule"] == "lbfgs" and rec["memory"] == 10 and rec["loss_tol"] == 5e-4
    for unused in ("momentum", "decay_tol", "decay_patience", "min_step_size"):
        assert unused not in rec
    assert "memory" not in inversion_record(InversionConfig())  # the paper's record unchanged
    assert inversion_record(fast.replace(memory=5)) != rec  # so the store's hash changes
