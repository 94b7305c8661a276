"""Second-order (Gauss-Newton) and hybrid inversion steps, and the converging schedule's
stopping: exactness on a linear representation, constraints, hygiene, the stall case."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from invsim.config import ConfigError, InversionConfig
from invsim.gauss_newton import gauss_newton_step, jvp
from invsim.inversion import acting_settings, invert_images
from invsim.models import load_model


class _Linear(nn.Module):
    """A classifier whose representation (the input of ``fc``) is ``W x``, linear in x."""

    def __init__(self, d: int, k: int, gain: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rep = nn.Linear(d, k, bias=False)
        with torch.no_grad():
            self.rep.weight.mul_(gain)
        self.fc = nn.Linear(k, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rep(x.flatten(1)))


def _interior_pair(n: int, d: int, model: _Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeds at 0.5 and targets whose representation a point near 0.5 reaches."""
    g = torch.Generator().manual_seed(1)
    seeds = torch.full((n, 1, 1, d), 0.5, dtype=torch.float64)
    targets = (0.45 + 0.1 * torch.rand(n, 1, 1, d, generator=g, dtype=torch.float64)).clamp(0, 1)
    return seeds, targets


def test_one_gauss_newton_step_solves_a_linear_representation():
    # k = 4 <= cg_iterations: CG is exact, and the minimum-norm step from an interior seed
    # stays inside the box, so one undamped step reaches zero residual
    model = _Linear(d=30, k=4).double().eval()
    seeds, targets = _interior_pair(5, 30, model)
    rep = lambda x: model.rep(x.flatten(1))  # noqa: E731
    step = gauss_newton_step(rep, seeds, rep(targets).detach(), torch.zeros(5, dtype=torch.float64))
    residual = (rep(seeds + step.dx) - rep(targets)).norm(dim=1) / rep(targets).norm(dim=1)
    assert float(residual.detach().max()) < 1e-10
    # the minimum-norm step: no shorter step reaches the target (the pseudo-inverse's)
    W = model.rep.weight.detach()
    want = torch.linalg.pinv(W) @ (rep(targets) - rep(seeds)).T
    assert torch.allclose(step.dx.flatten(1), want.T, atol=1e-10)
    # through the loop: one Gauss-Newton step (cg_iterations + 1 passes) gets there
    r = invert_images(model, seeds, targets, schedule="converge", method="gauss-newton",
                      iterations=11, damping=1e-12, progress=False)  # fmt: skip
    assert float(r.loss.max()) < 1e-9 and r.iterations.tolist() == [11] * 5
    assert r.switched.tolist() == [-1] * 5 and r.passes == 5 * 11 + 5


def test_jvp_is_the_jacobian_times_a_vector():
    model = load_model("lenet").double().eval()
    x, w = torch.rand(3, 1, 28, 28, dtype=torch.float64), torch.randn(3, 1, 28, 28).double()
    got = jvp(lambda v: model(v), x, w)
    h = 1e-6
    numeric = (model(x + h * w) - model(x - h * w)) / (2 * h)
    assert torch.allclose(got, numeric, atol=1e-6)


def test_pixels_at_the_box_that_the_gradient_pushes_out_are_held():
    model = _Linear(d=20, k=3).double().eval()
    rep = lambda x: model.rep(x.flatten(1))  # noqa: E731
    x = torch.rand(4, 20, dtype=torch.float64)
    x[:, :5], x[:, 5:10] = 0.0, 1.0
    target = rep(torch.rand(4, 20, dtype=torch.float64)).detach()
    step = gauss_newton_step(rep, x, target, torch.full((4,), 0.1, dtype=torch.float64))
    g = step.gradient
    held = ((x <= 0) & (g > 0)) | ((x >= 1) & (g < 0))
    assert bool(held.any()) and bool((step.dx[held] == 0).all())
    assert bool((step.dx[~held] != 0).any())


@pytest.mark.parametrize("method", ["gauss-newton", "hybrid", "lbfgs"])
def test_constraints_hold_and_the_model_stays_in_eval_mode(method):
    torch.manual_seed(0)
    model = load_model("lenet").double().train()
    g = torch.Generator().manual_seed(2)
    seeds = torch.rand(6, 1, 28, 28, generator=g, dtype=torch.float64)
    targets = torch.rand(6, 1, 28, 28, generator=g, dtype=torch.float64)
    modes = []

    def spy(_t, _x):
        modes.append(model.training)

    with pytest.warns(UserWarning, match="train mode"):
        r = invert_images(model, seeds, targets, schedule="converge", method=method, eps=0.5,
                          iterations=60, horizon=8, cg_iterations=3, progress=False,
                          callback=spy)  # fmt: skip
    assert modes and not any(modes) and model.training  # eval inside, restored after
    assert float(r.images.min()) >= 0 and float(r.images.max()) <= 1
    dist = (r.images.double() - seeds).flatten(1).norm(dim=1)
    assert float(dist.max()) <= 0.5 + 1e-9
    assert bool((r.loss < r.initial_loss).all())
    assert bool((r.switched >= 0).any()) == (method == "hybrid")


def test_no_graph_outlives_a_gauss_newton_step():
    model = load_model("lenet").eval()
    seeds, targets = torch.rand(4, 1, 28, 28), torch.rand(4, 1, 28, 28)
    seen = []

    def spy(_t, x):
        seen.append((x.requires_grad, x.grad_fn))

    invert_images(model, seeds, targets, schedule="converge", method="gauss-newton",
                  iterations=40, cg_iterations=3, progress=False, callback=spy)  # fmt: skip
    assert len(seen) >= 5 and all(not rg and fn is None for rg, fn in seen)


@pytest.mark.parametrize(
    "steps",
    [{"method": "gauss-newton", "iterations": 24, "cg_iterations": 3},
     {"method": "lbfgs", "iterations": 12}],
    ids=["gauss-newton", "lbfgs"],
)  # fmt: skip
def test_in_place_relu_fold_bn_and_channels_last_keep_second_order_steps(steps):
    from torchvision.models import resnet18

    torch.manual_seed(0)
    net = resnet18(num_classes=4).double().eval()  # in-place ReLUs, batch-norms
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, so folding matters
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    model = load_model(net, mean=[0.5] * 3, std=[0.5] * 3)
    g = torch.Generator().manual_seed(3)
    seeds = torch.rand(3, 3, 32, 32, generator=g, dtype=torch.float64)
    targets = torch.rand(3, 3, 32, 32, generator=g, dtype=torch.float64)
    kw = {"schedule": "converge", "progress": False, **steps}
    plain = invert_images(model, seeds, targets, **kw)
    fast = invert_images(model, seeds, targets, fold_bn=True, channels_last=True, **kw)
    assert bool((plain.loss < plain.initial_loss).all())
    assert torch.allclose(plain.images, fast.images, atol=1e-6)
    assert torch.allclose(plain.loss, fast.loss, atol=1e-8)


class _GroupSums(nn.Module):
    """Representation: the sums of 5 groups of pixels. Reaching a target that differs in
    every pixel takes a long straight path, so the loss falls slowly and steadily."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1).view(len(x), 5, -1).sum(-1))


def test_a_slowly_falling_loss_is_not_stopped():
    # the path is sqrt(d) ~ 316 long: about 2,500 paper steps, so the relative gain per
    # 10 steps is under 0.5% (the old step-halving threshold) all along
    model = _GroupSums().eval()
    d = 100_000
    seeds, targets = torch.zeros(2, 1, 1, d), torch.ones(2, 1, 1, d)
    targets[1] = 0.95
    cap = 400
    paper = invert_images(model, seeds, targets, iterations=cap, progress=False)
    conv = invert_images(model, seeds, targets, schedule="converge", method="momentum",
                         iterations=cap, progress=False)  # fmt: skip
    assert float(paper.loss.min()) > 0.8  # the paper's fixed step still falls at the cap
    # no example stops above the criterion while its loss falls at the paper's rate
    assert conv.iterations.tolist() == [cap, cap]
    assert bool((conv.loss <= paper.loss * 1.01).all())
    # L-BFGS steps (the default) set their own length: the long straight path is one
    # quasi-Newton stretch, and an example stops only at loss_tol or at the cap
    quasi = invert_images(model, seeds, targets, schedule="converge", iterations=cap,
                          progress=False)  # fmt: skip
    assert bool((quasi.loss <= 5e-4).all()) and int(quasi.iterations.max()) < cap


def test_momentum_warm_up_makes_the_first_step_full_length():
    model = _Linear(d=40, k=4).eval()
    seeds, targets = torch.full((2, 1, 1, 40), 0.5), torch.rand(2, 1, 1, 40)
    xs = []

    def spy(_t, x):
        xs.append(x.clone())

    r = invert_images(model, seeds, targets, schedule="converge", method="momentum",
                      iterations=2, progress=False, callback=spy)  # fmt: skip
    first = (xs[-1] - seeds).flatten(1).norm(dim=1)  # the iterate after one step
    assert torch.allclose(first, torch.full((2,), 1 / 8), atol=1e-6)  # not 0.03 x 1/8
    assert r.iterations.tolist() == [2, 2]


def test_the_method_is_part_of_the_record_and_checked():
    fast = InversionConfig(schedule="converge", method="hybrid")
    rec = acting_settings(fast)
    assert rec["method"] == "hybrid" and rec["cg_iterations"] == 10 and "switch_tol" in rec
    assert "memory" not in rec and "loss_tol" not in rec
    mom = acting_settings(fast.replace(method="momentum"))
    assert mom["method"] == "momentum" and "cg_iterations" not in mom
    assert "method" not in acting_settings(InversionConfig())  # the paper's record unchanged
    with pytest.raises(ConfigError, match="needs schedule='converge'"):
        InversionConfig.checked({"method": "gauss-newton"})
    with pytest.raises(ConfigError, match="nosuch"):
        invert_images(load_model("mlp"), "noise", torch.rand(1, 1, 28, 28), nosuch=1)
