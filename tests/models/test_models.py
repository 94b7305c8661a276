"""load_model: built-ins, torchvision, checkpoints of every layout, invsim's own format."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from invsim.models import CheckpointError, InvsimModel, list_models, load_model, save_model
from invsim.models.zoo import ARCHITECTURES

BUILTINS = sorted(ARCHITECTURES)


@pytest.mark.parametrize("arch", BUILTINS)
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32)])
def test_builtin_shapes_and_eval_mode(arch, channels, size):
    m = load_model(arch, num_classes=7, in_channels=channels)
    assert isinstance(m, InvsimModel) and not m.training
    assert not any(mod.training for mod in m.modules())
    out = m(torch.rand(2, channels, size, size))
    assert out.shape == (2, 7)
    assert m.invsim_meta["arch"] == arch and m.invsim_meta["image_size"] == size


def test_normalize_wrapper_applies_mean_std():
    net = nn.Flatten()
    m = load_model(net, mean=[0.5], std=[0.25])
    x = torch.rand(2, 1, 2, 2)
    assert torch.allclose(m(x), ((x - 0.5) / 0.25).flatten(1))


def test_list_models_and_unknown_spec():
    models = list_models()
    assert set(BUILTINS) <= set(models["builtin"])
    assert "tv:resnet18" in models["torchvision"]
    with pytest.raises(ValueError, match="unknown model spec 'resnt'"):
        load_model("resnt")


def test_timm_missing_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake(name, *a, **k):
        if name == "timm":
            raise ImportError("no timm")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match=r"invsim\[timm\]"):
        load_model("timm:resnet18")


def test_timm_spec_with_a_stand_in_module(monkeypatch):
    import sys
    import types

    calls = {}

    def create_model(name, pretrained, num_classes, in_chans, **kw):
        calls.update(name=name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans)
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(num_classes))
        net.pretrained_cfg = {"mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6)}
        return net

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    m = load_model("timm:convnext_atto", num_classes=7)
    assert calls == {"name": "convnext_atto", "pretrained": False, "num_classes": 7,
                     "in_chans": 3}  # fmt: skip
    assert m.invsim_meta["mean"] == pytest.approx([0.1, 0.2, 0.3])
    assert m(torch.rand(2, 3, 8, 8)).shape == (2, 7)


def test_torchvision_spec():
    m = load_model("tv:resnet18", num_classes=5)
    assert m(torch.rand(1, 3, 64, 64)).shape == (1, 5)
    assert m.invsim_meta["mean"] == pytest.approx([0.485, 0.456, 0.406])


# ---- checkpoints -----------------------------------------------------------------------


@pytest.fixture
def lenet_sd():
    torch.manual_seed(0)
    net = load_model("lenet").model
    return {k: v.clone() for k, v in net.state_dict().items()}


def _same_weights(model: InvsimModel, sd: dict) -> bool:
    return all(torch.equal(model.model.state_dict()[k], v) for k, v in sd.items())


def test_plain_pt_and_safetensors_round_trip(tmp_path, lenet_sd):
    torch.save(lenet_sd, tmp_path / "w.pt")
    save_file(lenet_sd, str(tmp_path / "w.safetensors"))
    for name in ("w.pt", "w.safetensors"):
        m = load_model("lenet", checkpoint=tmp_path / name)
        assert _same_weights(m, lenet_sd)
        assert len(m.invsim_meta["sha256"]) == 64


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_common_prefixes_are_stripped(tmp_path, lenet_sd, prefix):
    torch.save({prefix + k: v for k, v in lenet_sd.items()}, tmp_path / "w.pth")
    assert _same_weights(load_model("lenet", checkpoint=tmp_path / "w.pth"), lenet_sd)


def test_robustness_library_layout(tmp_path):
    torch.manual_seed(1)
    net = load_model("resnet", in_channels=3).model
    sd = net.state_dict()
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2023, 0.1994, 0.2010]).view(3, 1, 1)
    model_sd = {"module.normalizer.new_mean": mean, "module.normalizer.new_std": std}
    model_sd |= {f"module.model.{k}": v for k, v in sd.items()}
    model_sd |= {
        "module.attacker.normalize.new_mean": mean,
        "module.attacker.normalize.new_std": std,
    }
    model_sd |= {f"module.attacker.model.{k}": v for k, v in sd.items()}
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    ckpt = {"model": model_sd, "optimizer": opt.state_dict(), "schedule": None, "epoch": 150}
    torch.save(ckpt, tmp_path / "checkpoint.pt.best")
    (tmp_path / "ckpt.pt").write_bytes((tmp_path / "checkpoint.pt.best").read_bytes())
    m = load_model("resnet", in_channels=3, checkpoint=tmp_path / "ckpt.pt")
    assert m.invsim_meta["layout"] == "robustness"
    assert m.invsim_meta["mean"] == pytest.approx(mean.flatten().tolist())
    assert m.invsim_meta["std"] == pytest.approx(std.flatten().tolist())
    assert all(torch.equal(m.model.state_dict()[k], v) for k, v in sd.items())


def test_robustbench_layout(tmp_path, lenet_sd):
    sd = {"normalize.mean": torch.tensor([0.1]), "normalize.std": torch.tensor([0.3])}
    sd |= {f"model.{k}": v for k, v in lenet_sd.items()}
    torch.save(sd, tmp_path / "rb.pt")
    m = load_model("lenet", checkpoint=tmp_path / "rb.pt")
    assert m.invsim_meta["layout"] == "robustbench"
    assert m.invsim_meta["mean"] == pytest.approx([0.1])
    assert _same_weights(m, lenet_sd)


def test_foreign_state_dict_lists_missing_and_unexpected(tmp_path):
    torch.save(load_model("mlp").model.state_dict(), tmp_path / "mlp.pt")
    with pytest.raises(CheckpointError, match=r"missing keys: .*unexpected keys: ") as e:
        load_model("lenet", checkpoint=tmp_path / "mlp.pt")
    assert "0.weight" in str(e.value) and "mlp.pt" in str(e.value)


def test_wrong_num_classes_reports_shapes(tmp_path, lenet_sd):
    torch.save(lenet_sd, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_model("lenet", num_classes=3, checkpoint=tmp_path / "w.pt")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file_is_a_clear_error(tmp_path, lenet_sd, suffix):
    path = tmp_path / f"w{suffix}"
    if suffix == ".pt":
        torch.save(lenet_sd, path)
    else:
        save_file(lenet_sd, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model("lenet", checkpoint=path)


def test_pickled_objects_refused_unless_trusted(tmp_path, lenet_sd):
    torch.save({"model": lenet_sd, "args": argparse.Namespace(lr=0.1)}, tmp_path / "p.pt")
    with pytest.raises(CheckpointError, match="trust_checkpoint=True"):
        load_model("lenet", checkpoint=tmp_path / "p.pt")
    m = load_model("lenet", checkpoint=tmp_path / "p.pt", trust_checkpoint=True)
    assert _same_weights(m, lenet_sd)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model("lenet", checkpoint=tmp_path / "nope.pt")


def test_invsim_format_loads_by_path_alone(tmp_path):
    torch.manual_seed(2)
    m = load_model("vgg", num_classes=4, in_channels=3, mean=[0.1, 0.2, 0.3], std=[1, 2, 3])
    digest = save_model(m, tmp_path / "vgg.safetensors", dataset="mnist5k", eps=0.5, clean_acc=0.9)
    back = load_model(str(tmp_path / "vgg.safetensors"))
    assert back.invsim_meta["sha256"] == digest
    assert back.invsim_meta["eps"] == 0.5 and back.invsim_meta["dataset"] == "mnist5k"
    assert back.invsim_meta["num_classes"] == 4 and back.invsim_meta["in_channels"] == 3
    assert back.mean.flatten().tolist() == pytest.approx([0.1, 0.2, 0.3])
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(back(x), m(x))
    header = json.loads(
        __import__("safetensors")
        .safe_open(str(tmp_path / "vgg.safetensors"), "pt")
        .metadata()["invsim"]
    )
    assert header["arch"] == "vgg"


def test_foreign_safetensors_by_path_alone_is_refused(tmp_path, lenet_sd):
    save_file(lenet_sd, str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointError, match="not a model saved by invsim"):
        load_model(str(tmp_path / "x.safetensors"))


def test_mean_std_precedence_arguments_then_checkpoint_then_spec(tmp_path):
    from invsim.catalog import source_of

    spec_default = source_of("lenet").normalisation(None, 1)  # the source's defaults
    m = load_model("lenet", mean=[0.5], std=[0.25])
    assert m.invsim_meta["mean"] == [0.5] and m.invsim_meta["std"] == [0.25]
    save_model(m, tmp_path / "m.safetensors")
    saved = load_model(tmp_path / "m.safetensors")  # the checkpoint's
    assert saved.invsim_meta["mean"] == [0.5] and saved.invsim_meta["std"] == [0.25]
    x = torch.rand(3, 1, 28, 28)
    assert torch.allclose(saved(x), m(x), atol=1e-6)
    given = load_model(tmp_path / "m.safetensors", mean=[0.1], std=[0.3])  # the arguments'
    assert given.invsim_meta["mean"] == [0.1] and given.invsim_meta["std"] == [0.3]
    assert not torch.allclose(given(x), m(x), atol=1e-4)
    plain = load_model("lenet")  # neither: the spec's defaults
    assert plain.invsim_meta["mean"] == [float(v) for v in spec_default[0]]
    assert plain.invsim_meta["std"] == [float(v) for v in spec_default[1]]
