"""invert_images: parity with a straightforward implementation, it works, hygiene."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from invsim.data.pairs import sample_pairs
from invsim.inversion import invert_images
from invsim.models import load_model


def _small_cnn(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return load_model("lenet").to(dtype)


def _reference_inversion(model, seeds, targets, iterations, step=1 / 8, beta=0.9, eps=1000.0):
    """The paper's algorithm written out plainly, one example at a time."""
    feats = nn.Sequential(*list(model.model.children())[:-1])

    def rep(x):
        return feats((x - model.mean) / model.std)

    iterates, best, best_loss = [], [], []
    for seed, target in zip(seeds, targets, strict=True):
        seed, target = seed[None], target[None]
        with torch.no_grad():
            t = rep(target)
        x, m = seed.clone(), torch.zeros_like(seed)
        its = []
        b_x, b_loss = None, float("inf")
        for it in range(iterations + 1):
            x = x.detach().requires_grad_(True)
            loss = (rep(x) - t).norm() / t.norm()
            if loss.item() < b_loss:
                b_x, b_loss = x.detach().clone(), loss.item()
            if it == iterations:
                break
            its.append(x.detach().clone())
            (g,) = torch.autograd.grad(loss, x)
            g = g / (g.norm() + 1e-12)
            m = beta * m + (1 - beta) * g
            x = x.detach() - step * m
            delta = x - seed
            if delta.norm() > eps:
                delta = delta * eps / delta.norm()
            x = (seed + delta).clamp(0, 1)
        iterates.append(torch.cat(its))
        best.append(b_x)
        best_loss.append(b_loss)
    return torch.stack(iterates, 1), torch.cat(best), torch.tensor(best_loss, dtype=torch.float64)


@pytest.fixture(scope="module")
def mnist_pairs(mnist_test):
    s, t = sample_pairs(mnist_test.labels, 6, rng_seed=1)
    return mnist_test.images[s], mnist_test.images[t], mnist_test.labels[t]


def test_parity_with_straightforward_implementation(mnist_pairs):
    # float64 so that rounding noise cannot be amplified across a ReLU or clamp boundary
    model = _small_cnn(torch.float64)
    seeds, targets, _ = (t.double() for t in mnist_pairs)
    seen = []
    result = invert_images(
        model,
        seeds,
        targets,
        iterations=50,
        batch_size=4,
        progress=False,
        callback=lambda it, x: seen.append((it, x.clone())),
    )
    ref_iterates, ref_best, ref_loss = _reference_inversion(model, seeds, targets, 50)
    # callback sees batches of 4 then 2; reassemble iterate 49 (the 50th) per example
    ours = {}
    for it, x in seen:
        ours.setdefault(it, []).append(x)
    last = torch.cat(ours[49])
    assert torch.allclose(last, ref_iterates[49], atol=1e-5)
    assert torch.allclose(result.images.double(), ref_best, atol=1e-5)
    assert torch.allclose(result.loss.double(), ref_loss, atol=1e-5)
    # the same best-iterate choice: the returned image is the reference's best exactly
    assert torch.equal(result.images, ref_best.float())


def test_small_eps_projection_matches_reference(mnist_pairs):
    model = _small_cnn(torch.float64)
    seeds, targets, _ = (t.double() for t in mnist_pairs)
    result = invert_images(model, seeds, targets, iterations=20, eps=0.5, progress=False)
    _, ref_best, _ = _reference_inversion(model, seeds, targets, 20, eps=0.5)
    assert torch.allclose(result.images.double(), ref_best, atol=1e-5)
    assert ((result.images - seeds).flatten(1).norm(dim=1) <= 0.5 + 1e-4).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_results_do_not_depend_on_batch_size(mnist_pairs, dtype):
    model = _small_cnn(dtype)
    seeds, targets, _ = (t.to(dtype) for t in mnist_pairs)
    runs = [
        invert_images(model, seeds, targets, iterations=30, batch_size=b, progress=False)
        for b in (6, 4, 1)
    ]
    for r in runs[1:]:
        assert torch.allclose(runs[0].images, r.images, atol=1e-5)
        assert torch.allclose(runs[0].loss, r.loss, atol=1e-6)


def test_inversion_works_on_a_trained_model(trained_lenet, mnist_test):
    s, t = sample_pairs(mnist_test.labels, 32, rng_seed=0)
    res = invert_images(
        trained_lenet,
        mnist_test.images[s],
        mnist_test.images[t],
        iterations=500,
        batch_size=32,
        progress=False,
    )
    assert res.images.dtype == torch.float32
    assert res.images.min() >= 0 and res.images.max() <= 1
    assert float(res.loss.median()) < 0.1
    assert float(res.loss.median()) < 0.25 * float(res.initial_loss.median())
    with torch.no_grad():
        pred = trained_lenet(res.images).argmax(1)
    assert (pred == mnist_test.labels[t]).float().mean() > 0.8


def test_best_iterate_is_never_worse_than_seed_or_last(mnist_pairs):
    model = _small_cnn()
    seeds, targets, _ = mnist_pairs
    best = invert_images(model, seeds, targets, iterations=15, progress=False)
    last = invert_images(model, seeds, targets, iterations=15, use_best=False, progress=False)
    assert (best.loss <= last.loss + 1e-7).all()
    assert (best.loss <= best.initial_loss).all()


def test_inputs_unchanged_and_train_mode_restored(mnist_pairs):
    model = _small_cnn().train()
    seeds, targets, _ = mnist_pairs
    s0, t0 = seeds.clone(), targets.clone()
    with pytest.warns(UserWarning, match="train mode"):
        invert_images(model, seeds, targets, iterations=3, progress=False)
    assert torch.equal(seeds, s0) and torch.equal(targets, t0)
    assert model.training


def test_validation_errors(mnist_pairs):
    model = _small_cnn()
    seeds, targets, _ = mnist_pairs
    with pytest.raises(ValueError, match="same shape"):
        invert_images(model, seeds[:3], targets, iterations=1)
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        invert_images(model, seeds * 255, targets, iterations=1)
    bad = targets.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="target_images contains NaN"):
        invert_images(model, seeds, bad, iterations=1)
    with pytest.raises(ValueError, match="'noise'"):
        invert_images(model, "zeros", targets, iterations=1)


def test_noise_seeds_are_deterministic(mnist_pairs):
    model = _small_cnn()
    _, targets, _ = mnist_pairs
    a = invert_images(model, "noise", targets, iterations=5, noise_seed=3, progress=False)
    b = invert_images(model, "noise", targets, iterations=5, noise_seed=3, progress=False)
    c = invert_images(model, "noise", targets, iterations=5, noise_seed=4, progress=False)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)


def test_tol_stops_early_and_freezes(trained_lenet, mnist_test):
    s, t = sample_pairs(mnist_test.labels, 8, rng_seed=2)
    seeds, targets = mnist_test.images[s], mnist_test.images[t]
    full = invert_images(trained_lenet, seeds, targets, iterations=600, progress=False)
    early = invert_images(
        trained_lenet, seeds, targets, iterations=600, tol=1e-3, patience=50, progress=False
    )
    assert (full.iterations == 600).all()
    assert int((early.iterations < 600).sum()) >= 4  # most examples froze early
    assert int(early.iterations.sum()) < 0.8 * int(full.iterations.sum())
    assert float(early.loss.median()) < float(full.loss.median()) + 0.02


def test_fake_relu_changes_the_path_not_the_forward(trained_lenet, mnist_pairs):
    seeds, targets, _ = mnist_pairs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = invert_images(trained_lenet, seeds, targets, iterations=10, progress=False)
        fake = invert_images(
            trained_lenet, seeds, targets, iterations=10, fake_relu=True, progress=False
        )
    assert torch.equal(plain.initial_loss, fake.initial_loss)
    assert not torch.equal(plain.images, fake.images)


@pytest.mark.parametrize(
    "rule",
    [
        {"tol": 0.03, "patience": 10},
        # quick: examples stop at different steps
        {
            "rule": "converging-momentum",
            "momentum": 0.9,
            "decay_patience": 3,
            "decay_tol": 0.1,
            "horizon": 10,
            "stop_tol": 0.2,
        },
        # L-BFGS steps: examples reach loss_tol or stall at different steps
        {"schedule": "converge", "loss_tol": 0.25, "horizon": 10, "stop_tol": 0.2, "stall": "stop"},
        # ... and a stalled example goes on with the paper's steps, at different steps
        {"schedule": "converge", "loss_tol": 0.05, "horizon": 10, "stop_tol": 0.2},
    ],
    ids=["tol", "converging-momentum", "lbfgs", "lbfgs-then-paper-steps"],
)
def test_continuous_batching_refills_slots_and_equals_one_at_a_time(mnist_test, rule):
    # float64, so that per-example results can be compared exactly across batch shapes
    model = _small_cnn(torch.float64)
    s, t = sample_pairs(mnist_test.labels, 10, rng_seed=3)
    seeds, targets = mnist_test.images[s].double(), mnist_test.images[t].double()
    kw = {"iterations": 60, "progress": False, **rule}
    batched = invert_images(model, seeds, targets, batch_size=4, **kw)
    alone = [
        invert_images(model, seeds[i : i + 1], targets[i : i + 1], batch_size=1, **kw)
        for i in range(10)
    ]
    stops = batched.iterations.tolist()
    assert len(set(stops)) > 1 and min(stops) < 60  # examples leave at different iterations
    assert stops == [int(r.iterations) for r in alone]  # every pair once, in input order
    assert torch.allclose(batched.images.double(), torch.cat([r.images for r in alone]).double())
    assert torch.allclose(batched.loss, torch.cat([r.loss for r in alone]))
    # the cost is the work actually done: one evaluation per step plus the last iterate
    assert batched.passes == sum(stops) + 10 == sum(r.passes for r in alone)


def test_channels_last_is_a_layout_not_a_result(mnist_pairs):
    model = _small_cnn(torch.float64)
    seeds, targets, _ = (t.double() for t in mnist_pairs)
    plain = invert_images(model, seeds, targets, iterations=15, progress=False)
    fast = invert_images(model, seeds, targets, iterations=15, channels_last=True, progress=False)
    assert torch.allclose(plain.images, fast.images, atol=1e-6)
    assert torch.allclose(plain.loss, fast.loss, atol=1e-8)
    assert all(p.is_contiguous() for p in model.parameters())  # the layout is restored
    assert "channels_last" not in plain.config and fast.config["channels_last"] is True


def test_the_horizon_rule_stops_only_a_stalled_example_or_one_at_rest_at_the_criterion():
    """The default converging rule: the step no longer falls below min_step_size, and an
    example above the criterion stops only once its best loss gained less than stop_tol
    over a horizon; one at the criterion stops once its step is down to the floor."""
    from invsim.inversion import CONVERGED_LOSS

    torch.manual_seed(0)
    m = load_model("mlp", num_classes=10, in_channels=1)
    s, t = torch.rand(6, 1, 28, 28), torch.rand(6, 1, 28, 28)
    kw = {
        "iterations": 100,
        "rule": "converging-momentum",
        "decay_tol": 1.0,
        "decay_patience": 3,
        "min_step_size": 1 / 16,
        "progress": False,
    }
    far = invert_images(m, s, t, horizon=20, stop_tol=1e9, **kw)  # every horizon "stalls"
    assert far.iterations.tolist() == [20] * 6 and bool((far.loss > CONVERGED_LOSS).all())
    # a gain of at least 0 always counts (stop_tol=0 stops only a best loss that did not
    # move): a falling loss above the criterion is not stopped when its step halves
    going = invert_images(m, s, t, horizon=20, stop_tol=0.0, **kw)
    assert int(going.iterations.min()) > 6
    # at the criterion (the seed is its own target: loss 0) and at the floor: at rest
    rest = invert_images(m, t, t, horizon=50, **kw)
    assert bool((rest.loss <= CONVERGED_LOSS).all()) and int(rest.iterations.max()) < 50


def test_the_tol_patience_rule_as_documented():
    # every `patience` steps, an example whose best loss gained less than tol since the
    # last check (the seed's loss, at the first check) stops
    torch.manual_seed(0)
    m = load_model("mlp", num_classes=10, in_channels=1)
    s, t = torch.rand(6, 1, 28, 28), torch.rand(6, 1, 28, 28)
    kw = {"iterations": 40, "patience": 5, "progress": False}
    assert invert_images(m, s, t, tol=1e9, **kw).iterations.tolist() == [5] * 6
    assert invert_images(m, s, t, tol=None, **kw).iterations.tolist() == [40] * 6
    some = invert_images(m, s, t, tol=1e-3, **kw)
    assert set(some.iterations.tolist()) <= {5, 10, 15, 20, 25, 30, 35, 40}


def test_a_same_label_pair_is_named():
    from invsim.data.pairs import check_pairs

    with pytest.raises(
        ValueError, match=r"1 seed/target pairs share a label, at positions 2 \(label 7\)"
    ):
        check_pairs([1, 2, 7, 0], [3, 4, 7, 5])
    check_pairs([1, 2, 3], [0, 0, 0])  # different labels: no error
