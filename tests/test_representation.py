"""resolve_layer / representation / extract: right layer, early stop, hygiene."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from invsim import LinearCKA, StreamingPanel, linear_cka
from invsim.data import load_dataset
from invsim.models import load_model
from invsim.models.zoo import ARCHITECTURES
from invsim.representation import extract, extract_into, representation, resolve_layer


def _hand_penultimate(arch: str, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Each architecture's forward written out by hand up to the classifier input."""
    if arch in ("mlp", "lenet"):
        return net[:-1](x)
    if arch == "vgg":
        return net.classifier[:-1](net.pool(net.features(x)))
    if arch == "resnet":
        return net.flatten(net.pool(net.layers(net.stem(x))))
    if arch in ("densenet", "mobilenet"):
        return net.features(x)
    if arch == "vit":
        h = net.patch_embed(x).flatten(2).transpose(1, 2)
        h = torch.cat([net.cls_token.expand(len(x), -1, -1), h], 1) + net.pos_embed
        return net.norm(net.blocks(h))[:, 0]
    raise AssertionError(arch)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_builtin_penultimate_is_classifier_input(arch):
    torch.manual_seed(0)
    m = load_model(arch)
    ref = resolve_layer(m)
    assert (
        ref.capture == "input"
        and ref.module is list(m.modules())[-1]
        or isinstance(ref.module, nn.Linear)
    )
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        want = _hand_penultimate(arch, m.model, (x - m.mean) / m.std)
    assert torch.allclose(representation(m, x), want, atol=1e-6)


def _tv_hand(name: str, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if name == "resnet18":
        h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        h = net.layer4(net.layer3(net.layer2(net.layer1(h))))
        return torch.flatten(net.avgpool(h), 1)
    if name == "vgg11_bn":
        return net.classifier[:-1](torch.flatten(net.avgpool(net.features(x)), 1))
    if name == "densenet121":
        h = torch.relu(net.features(x))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1)
    if name == "mobilenet_v2":
        h = nn.functional.adaptive_avg_pool2d(net.features(x), 1)
        return net.classifier[:-1](torch.flatten(h, 1))
    if name == "vit_b_16":
        h = net._process_input(x)
        h = torch.cat([net.class_token.expand(len(x), -1, -1), h], dim=1)
        return net.encoder(h)[:, 0]
    if name == "convnext_tiny":
        return net.classifier[:-1](net.avgpool(net.features(x)))
    raise AssertionError(name)


TV = [
    ("resnet18", "fc", 32, {}),
    ("vgg11_bn", "classifier.6", 32, {}),
    ("densenet121", "classifier", 32, {}),
    ("mobilenet_v2", "classifier.1", 32, {}),
    ("vit_b_16", "heads.head", 32, {"image_size": 32}),
    ("convnext_tiny", "classifier.2", 32, {}),
]


@pytest.mark.parametrize(("name", "classifier", "size", "kwargs"), TV)
def test_torchvision_penultimate(name, classifier, size, kwargs):
    torch.manual_seed(0)
    m = load_model(f"tv:{name}", num_classes=10, **kwargs)
    x = torch.rand(2, 3, size, size)
    ref = resolve_layer(m, example_input=x)
    assert ref.name == f"model.{classifier}"
    with torch.no_grad():
        want = _tv_hand(name, m.model, (x - m.mean) / m.std)
    assert torch.allclose(representation(m, x), want, atol=1e-5)


def test_named_layer_output_and_prefix_optional():
    m = load_model("lenet")
    x = torch.rand(3, 1, 28, 28)
    a = representation(m, x, "model.4")
    b = representation(m, x, "4")
    with torch.no_grad():
        want = m.model[:5]((x - m.mean) / m.std).flatten(1)
    assert torch.equal(a, b) and torch.allclose(a, want)


def test_unknown_layer_lists_close_matches():
    m = load_model("resnet")
    with pytest.raises(ValueError, match=r"unknown layer 'layers.7.relu3'.*layers.7.relu"):
        representation(m, torch.rand(1, 1, 28, 28), "layers.7.relu3")


class _Tail(nn.Module):
    calls = 0

    def forward(self, x):
        _Tail.calls += 1
        return x


def test_forward_stops_at_the_layer():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2), _Tail())
    m = load_model(net, mean=[0.0], std=[1.0])
    x = torch.rand(2, 1, 2, 2)
    for layer in ("penultimate", "model.2"):
        resolve_layer(m, layer, example_input=x)  # the one probe forward (cached)
        before = _Tail.calls
        rep = representation(m, x, layer)
        assert rep.shape == (2, 3)
        assert _Tail.calls == before  # the classifier and the tail never ran


def test_representation_is_differentiable():
    m = load_model("vgg")
    x = torch.rand(2, 1, 28, 28, requires_grad=True)
    representation(m, x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def _no_hooks(model: nn.Module) -> bool:
    return all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in model.modules())


class _Boom(nn.Module):
    def forward(self, x):
        raise ValueError("boom")


def test_hooks_removed_and_mode_restored_after_exception():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU())
    net.append(nn.Linear(3, 2))
    m = load_model(net, mean=[0.0], std=[1.0])
    x = torch.rand(2, 1, 2, 2)
    resolve_layer(m, example_input=x)
    m.train()
    m.model[2].eval()  # a mixed state must come back exactly
    m.model.insert(1, _Boom())
    with pytest.raises(ValueError, match="boom"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        representation(m, x, "model.3")
    assert _no_hooks(m)
    assert m.training and m.model[0].training and not m.model[3].training


def test_train_mode_warns_and_is_restored():
    m = load_model("vgg").train()
    x = torch.rand(4, 1, 28, 28)
    with pytest.warns(UserWarning, match="train mode"):
        a = representation(m, x)
    assert m.training
    assert torch.allclose(a, representation(m.eval(), x))


class _Reuse(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = x.flatten(1)
        return self.fc(self.act(self.lin(self.act(x))))


def test_reused_module_is_reported():
    m = load_model(_Reuse(), mean=[0.0], std=[1.0])
    with pytest.raises(ValueError, match="'model.act' runs 2 times"):
        representation(m, torch.rand(2, 1, 2, 2), "act")
    assert representation(m, torch.rand(2, 1, 2, 2)).shape == (2, 4)


class _TupleOut(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.ReLU())
        self.fc = nn.Linear(5, 3)
        self.kind = kind

    def forward(self, x):
        h = self.body(x)
        out = self.fc(h)
        if self.kind == "tuple":
            return out, h
        if self.kind == "dict":
            return {"logits": out, "features": h}
        return type("Output", (), {"logits": out})()


@pytest.mark.parametrize("kind", ["tuple", "dict", "hf"])
def test_models_with_structured_outputs(kind):
    m = load_model(_TupleOut(kind), mean=[0.0], std=[1.0])
    x = torch.rand(3, 1, 2, 2)
    with torch.no_grad():
        want = m.model.body(x)
    assert torch.allclose(representation(m, x), want)
    assert torch.allclose(extract(m, x), want)


def test_fake_relu_passes_gradient_through_last_relu():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(inplace=True), nn.Linear(3, 2))
    m = load_model(net, mean=[0.0], std=[1.0])
    with torch.no_grad():
        net[1].bias.fill_(-10.0)  # every unit dead: a real ReLU gives zero gradient
    x = torch.rand(2, 1, 2, 2, requires_grad=True)
    rep = representation(m, x)
    assert torch.all(rep == 0)
    rep.sum().backward()
    assert x.grad.abs().sum() == 0
    x.grad = None
    fake = representation(m, x, fake_relu=True)
    assert torch.equal(fake, rep)
    fake.sum().backward()
    assert x.grad.abs().sum() > 0
    assert _no_hooks(m)


@pytest.fixture(scope="module")
def mnist_1000():
    return load_dataset("mnist5k", split="test")


def test_extract_in_batches_equals_single_forward(mnist_1000):
    torch.manual_seed(0)
    m = load_model("resnet", width=8)
    images = mnist_1000.images
    assert len(images) == 1000
    batched = extract(m, mnist_1000, batch_size=96)
    with torch.no_grad():
        single = representation(m, images)
    assert batched.dtype == torch.float32 and batched.shape == single.shape
    assert torch.allclose(batched, single, atol=1e-5)
    assert torch.allclose(extract(m, images, batch_size=333), single, atol=1e-5)


def test_extract_into_streams_exact_cka(mnist_1000):
    torch.manual_seed(0)
    a, b = load_model("mlp"), load_model("lenet")
    images = mnist_1000.images[:300]
    acc = extract_into({"a": a, "b": b}, images, LinearCKA(), batch_size=64)
    want = linear_cka(extract(a, images), extract(b, images))
    assert acc.compute() == pytest.approx(want, abs=1e-6)
    mat = extract_into({"a": a, "b": b}, images, StreamingPanel(["a", "b"]), batch_size=50)
    assert mat.compute()["linear_cka"]["a", "b"] == pytest.approx(want, abs=1e-6)


def test_nan_activations_are_named(mnist_1000):
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 4), nn.Linear(4, 2))
    with torch.no_grad():
        net[1].weight.fill_(float("nan"))
    m = load_model(net, mean=[0.0], std=[1.0])
    with pytest.raises(ValueError, match="^bad contains NaN or Inf"):
        extract_into(
            {"good": load_model("mlp"), "bad": m},
            mnist_1000.images[:8],
            StreamingPanel(["good", "bad"]),
        )


def test_extract_on_a_dataloader_equals_the_tensor(mnist_1000):
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    m = load_model("lenet")
    loader = DataLoader(mnist_1000, batch_size=70, shuffle=False)
    got = extract(m, loader)
    assert got.shape == (1000, 84)
    assert torch.allclose(got, extract(m, mnist_1000.images), atol=1e-6)


def test_select_layers_by_name_pattern_and_stage():
    """Naming many layers (the layer-by-layer issue's first step): patterns stay within
    one dotted part, ``blocks`` is the backbone's stages (timm's feature_info where it
    has one), unknown names and patterns are errors with close matches."""
    from invsim.representation import select_layers

    r18 = load_model("tv:resnet18")
    assert select_layers(r18, "layer*") == [f"model.layer{i}" for i in range(1, 5)]
    assert select_layers(r18, ["bn1", "layer1.*", "penultimate", "logits", "bn1"]) == [
        "model.bn1", "model.layer1.0", "model.layer1.1", "penultimate", "logits",
    ]  # fmt: skip
    blocks = select_layers(r18, "blocks")
    assert blocks[0] == "model.conv1" and "model.layer4" in blocks and blocks[-1] == "model.fc"
    with pytest.raises(ValueError, match="Close matches"):
        select_layers(r18, "layr1")
    with pytest.raises(ValueError, match="pattern 'layr\\*' matches no module.*Close names"):
        select_layers(r18, "layr*")
    timm = pytest.importorskip("timm")
    assert timm is not None
    t = load_model("timm:resnet18", num_classes=10)
    assert select_layers(t, "blocks") == ["model.act1"] + [f"model.layer{i}" for i in range(1, 5)]


def test_invsim_layers_lists_a_selection_without_running_the_model():
    from click.testing import CliRunner

    from invsim.cli import main

    out = CliRunner().invoke(main, ["layers", "tv:resnet18", "--select", "layer*"])
    assert out.exit_code == 0, out.output
    assert out.output.splitlines() == [f"model.layer{i}\tSequential" for i in range(1, 5)]
    bad = CliRunner().invoke(main, ["layers", "lenet", "--select", "nosuch*"])
    assert bad.exit_code == 2 and "matches no module" in bad.output
