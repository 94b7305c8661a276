"""Batch-norm folding: an eval-mode copy of a model whose each ``BatchNorm`` is merged
into the convolution that feeds it, for loops that run one frozen model many times (the
inversion). In eval mode a batch-norm is a per-channel affine map, so
``bn(conv(x)) = conv'(x)`` with ``conv'`` the convolution's weights and bias rescaled;
the forward skips one pass over every feature map, which makes a ResNet's
forward+backward about 1.8-2.2x faster on CPU (benchmarks/results/folding.json).

The model itself is never touched: the copy is traced with ``torch.fx``, and only a
batch-norm whose one input is a convolution that nothing else reads is folded. Modules
named in ``keep`` (the inverted layer) stay whole, so their outputs are what they were.
A model that ``torch.fx`` cannot trace gives ``None``: the caller runs it unfolded.

Examples:
    >>> import torch
    >>> from invsim.models import load_model
    >>> from invsim.models.folding import count_batchnorms, fold_batchnorm
    >>> m = load_model("resnet", width=4).eval()
    >>> folded = fold_batchnorm(m)
    >>> x = torch.rand(2, 1, 28, 28)
    >>> bool(torch.allclose(folded(x), m(x), atol=1e-5)), count_batchnorms(folded)
    (True, 0)
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Collection

from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["count_batchnorms", "fold_batchnorm"]

_CONV_BN = ((nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d), (nn.Conv3d, nn.BatchNorm3d))


class _Tracer(fx.Tracer):
    """The default tracer, with the ``keep`` modules as leaves (called, not inlined)."""

    def __init__(self, keep: Collection[str]) -> None:
        super().__init__()
        self.keep = set(keep)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.keep or super().is_leaf_module(m, qualname)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        any(isinstance(conv, c) and isinstance(bn, b) for c, b in _CONV_BN)
        and bn.running_mean is not None
        and bn.running_var is not None
    )


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def fold_batchnorm(model: nn.Module, *, keep: Collection[str] = ()) -> nn.Module | None:
    """An eval-mode copy of ``model`` with every foldable batch-norm merged into its
    convolution, or ``None`` when ``torch.fx`` cannot trace the model.

    A pair is folded when the batch-norm's only input is a convolution module's output,
    nothing else reads that output, each of the two modules runs once per forward, and
    neither is named in ``keep`` (nor inside a module named there). The copy's modules
    keep their names; its parameters need no gradient. Outputs equal the model's up to
    float rounding (about 1e-7 relative in float32).
    """
    keep = {k for k in keep if k}
    try:
        work = copy.deepcopy(model).eval()
        graph = _Tracer(keep).trace(work)
    except Exception:  # noqa: BLE001 - control flow fx cannot follow: run unfolded
        return None
    folded = fx.GraphModule(work, graph)
    modules = dict(folded.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    for node in list(graph.nodes):
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        source = node.args[0]
        if source.op != "call_module" or len(source.users) != 1:
            continue
        conv, bn = modules.get(str(source.target)), modules.get(str(node.target))
        names = (str(source.target), str(node.target))
        if (
            conv is None
            or bn is None
            or not _foldable(conv, bn)
            or any(calls[n] != 1 for n in names)
            or any(n in keep for n in names)
        ):
            continue
        _set_module(folded, names[0], fuse_conv_bn_eval(conv, bn))
        node.replace_all_uses_with(source)
        graph.erase_node(node)
        _set_module(folded, names[1], nn.Identity())  # the folded norm: no longer called
    graph.lint()
    folded.recompile()
    folded.requires_grad_(False)
    if hasattr(model, "invsim_meta"):
        folded.invsim_meta = model.invsim_meta  # type: ignore[assignment]
    return folded.eval()


def count_batchnorms(model: nn.Module) -> int:
    """The batch-norm modules a model still calls in its forward (0 once all are folded);
    for a folded copy, those inside the modules its graph calls."""
    graph = getattr(model, "graph", None)
    if isinstance(graph, fx.Graph):
        called = [model.get_submodule(str(n.target)) for n in graph.nodes if n.op == "call_module"]
    else:
        called = [model]
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for c in called for m in c.modules())
