"""timm models for real (no pretrained weights): load, penultimate, one inversion step."""

from __future__ import annotations

import pytest
import torch

from invsim.inversion import invert_images
from invsim.models import load_model
from invsim.representation import representation, resolve_layer

timm = pytest.importorskip("timm")  # a dev dependency: present under `make test`


@pytest.mark.parametrize(
    ("spec", "size", "head", "width"),
    [("timm:resnet18", 64, "model.fc", 512), ("timm:vit_tiny_patch16_224", 32, "model.head", 192)],
)
def test_timm_model_through_the_pipeline(spec, size, head, width):
    torch.manual_seed(0)
    model = load_model(spec, num_classes=10, image_size=size)
    assert model.invsim_meta["spec"] == spec and not model.training
    cfg = model.model.pretrained_cfg
    assert model.invsim_meta["mean"] == pytest.approx(list(cfg["mean"]))
    x = torch.rand(2, 3, size, size)
    ref = resolve_layer(model, example_input=x)
    assert (ref.name, ref.capture) == (head, "input")
    rep = representation(model, x)
    assert rep.shape == (2, width)
    # the representation is what the classifier reads: head(rep) == the logits
    with torch.no_grad():
        assert torch.allclose(model.model.get_submodule(head[6:])(rep), model(x), atol=1e-4)
    result = invert_images(model, x, torch.rand(2, 3, size, size), iterations=1, progress=False)
    assert result.images.shape == x.shape and (result.iterations == 1).all()
    assert bool((result.loss <= result.initial_loss).all())
    assert result.passes == 4  # two examples, evaluated at the seed and after the step
