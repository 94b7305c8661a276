"""Batch-norm folding (invsim.models.folding) and the inversion's ``fold_bn``: the same
function as the model, faster, and the model itself untouched."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from invsim.data.pairs import sample_pairs
from invsim.inversion import invert_images
from invsim.models import load_model
from invsim.models.folding import count_batchnorms, fold_batchnorm
from invsim.representation import representation


def _with_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Batch-norms with running statistics and affine parameters far from the identity
    (an untrained model's mean 0 / var 1 would make folding trivially exact)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g))
            m.running_var.copy_(torch.rand(c, generator=g) * 3 + 0.2)
            m.weight.data.copy_(torch.randn(c, generator=g))
            m.bias.data.copy_(torch.randn(c, generator=g))
    return model


@pytest.fixture(scope="module")
def mnist_pairs(mnist_test):
    s, t = sample_pairs(mnist_test.labels, 6, rng_seed=1)
    return mnist_test.images[s], mnist_test.images[t], mnist_test.labels[t]


@pytest.fixture
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return _with_statistics(load_model("resnet", width=4)).double()


@pytest.mark.parametrize("arch", ["resnet", "vgg"])
def test_folded_copy_is_the_same_function_and_the_model_is_untouched(arch):
    torch.manual_seed(0)
    model = _with_statistics(load_model(arch, width=4)).double().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(5, 1, 28, 28, dtype=torch.float64)
    folded = fold_batchnorm(model)
    assert folded is not None and count_batchnorms(folded) == 0 < count_batchnorms(model)
    assert model.training  # the model keeps its mode; the copy is in eval mode
    model.eval()
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-10, rtol=0)
        rep_f, rep_m = representation(folded, x), representation(model, x)
    assert torch.allclose(rep_f, rep_m, atol=1e-10, rtol=0)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not any(p.requires_grad for p in folded.parameters())


def test_kept_layers_stay_whole(resnet):
    # a batch-norm that is the inverted layer keeps its own output, negatives included
    keep = "model.layers.0.bn1"
    folded = fold_batchnorm(resnet, keep=[keep])
    assert folded is not None and count_batchnorms(folded) == 1
    assert isinstance(folded.get_submodule(keep), nn.BatchNorm2d)
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        a = representation(resnet.eval(), x, layer=keep)
        b = representation(folded, x, layer=keep)
    assert torch.allclose(a, b, atol=1e-12, rtol=0) and bool((a < 0).any())
    # a whole block named in keep is called as one module, not folded inside
    block = fold_batchnorm(resnet, keep=["model.layers.0"])
    assert block is not None and count_batchnorms(block) == 2  # that block's two norms


class _Shared(nn.Module):
    """One convolution feeding two batch-norms, and one convolution run twice: neither
    may be folded (the folded weights would change the other use)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn_a, self.bn_b = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.twice, self.bn_c = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        h = self.bn_a(h) + self.bn_b(h)
        h = self.bn_c(self.twice(self.twice(h)))
        return self.fc(h.mean((2, 3)))


class _Branching(nn.Module):
    """Control flow on a value: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.conv(x))
        if h.mean() > 0:
            h = h * 2
        return self.fc(h.mean((2, 3)))


def test_shared_modules_are_not_folded_and_untraceable_models_give_none():
    torch.manual_seed(0)
    shared = _with_statistics(_Shared()).double().eval()
    folded = fold_batchnorm(shared)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    assert folded is not None and count_batchnorms(folded) == 3  # nothing was foldable
    with torch.no_grad():
        assert torch.allclose(folded(x), shared(x), atol=1e-12, rtol=0)
    assert fold_batchnorm(_Branching().eval()) is None


def test_inversion_with_fold_bn_equals_the_plain_one(resnet, mnist_pairs):
    seeds, targets, _ = (t[:6].double() for t in mnist_pairs)
    common = {"iterations": 12, "progress": False}
    plain = invert_images(resnet, seeds, targets, **common)
    fast = invert_images(resnet, seeds, targets, fold_bn=True, channels_last=True, **common)
    assert torch.allclose(plain.images, fast.images, atol=1e-8)
    assert torch.allclose(plain.loss, fast.loss, atol=1e-10)
    assert "fold_bn" not in plain.config and fast.config["fold_bn"] is True
    assert count_batchnorms(resnet) > 0 and all(
        p.requires_grad and p.is_contiguous() for p in resnet.parameters()
    )
    # at a batch-norm layer the inversion matches that norm's output, folded or not
    at_bn = {"layer": "model.layers.1.bn2", **common}
    a = invert_images(resnet, seeds, targets, **at_bn)
    b = invert_images(resnet, seeds, targets, fold_bn=True, **at_bn)
    assert torch.allclose(a.loss, b.loss, atol=1e-10) and torch.allclose(a.images, b.images)


def test_fold_bn_on_an_untraceable_model_warns_and_loses_nothing(mnist_pairs):
    torch.manual_seed(0)
    model = _with_statistics(_Branching()).double().eval()
    seeds, targets, _ = (t[:4].double() for t in mnist_pairs)
    plain = invert_images(model, seeds, targets, iterations=5, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = invert_images(model, seeds, targets, iterations=5, fold_bn=True, progress=False)
    assert any("not folded" in str(w.message) and "torch.fx" in str(w.message) for w in caught)
    assert torch.equal(plain.images, fast.images) and torch.equal(plain.loss, fast.loss)


def test_robust_accuracy_attacks_a_folded_copy_with_the_same_result(mnist_test):
    from invsim.attacks import pgd
    from invsim.representation import logits
    from invsim.train import accuracy

    torch.manual_seed(0)
    model = _with_statistics(load_model("vgg", width=4)).train()
    attack = {"norm": "l2", "eps": 1.0, "steps": 3}
    got = accuracy(model, mnist_test, adversarial=attack, n=64, rng_seed=0)
    assert model.training  # restored
    g, x, y = torch.Generator().manual_seed(0), mnist_test.images[:64], mnist_test.labels[:64]
    model.eval()
    adv = pgd(model, x, y, generator=g, **attack)  # the unfolded model, the same draws
    with torch.no_grad():
        want = float((logits(model(adv)).argmax(1) == y).double().mean())
    assert got == want


def test_a_torchvision_resnet_folds_every_norm_with_its_in_place_relus():
    # torchvision's blocks end in ReLU(inplace=True) right after bn2 + shortcut
    torch.manual_seed(0)
    model = _with_statistics(load_model("tv:resnet18", num_classes=10)).double().eval()
    folded = fold_batchnorm(model, keep=["model.layer2.0.bn1"])
    assert folded is not None and count_batchnorms(folded) == 1 < count_batchnorms(model)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-9, rtol=1e-9)
        kept = representation(folded, x, layer="model.layer2.0.bn1")
        plain = representation(model, x, layer="model.layer2.0.bn1")
        assert torch.allclose(kept, plain, atol=1e-10, rtol=0)
    assert bool((kept < 0).any())  # the copy of bn1's output, before its in-place ReLU
