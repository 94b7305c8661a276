"""Faster layouts of the same inversion: channels-last weights, batch-norms folded into
their convolutions. Both give the same steps, equal up to float rounding."""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from invsim.models.folding import fold_batchnorm
from invsim.representation import PENULTIMATE, LayerRef, reader, resolve_layer

__all__ = ["folded", "memory_format"]


def folded(
    model: nn.Module, ref: LayerRef, probe: torch.Tensor, channels_last: bool
) -> tuple[nn.Module, LayerRef]:
    """``fold_bn``: a copy of the model with its batch-norms folded (the layer ``ref`` kept
    whole), checked on ``probe`` to read the same representation; else the model itself,
    with a warning."""
    folded, why = fold_batchnorm(model, keep=[ref.name]), "torch.fx cannot trace it"
    if folded is not None:
        if channels_last:
            folded.to(memory_format=torch.channels_last)
        layer = ref.name if ref.capture == "output" else PENULTIMATE
        fref = resolve_layer(folded, layer, example_input=probe)
        with torch.no_grad(), reader(model, ref) as a, reader(folded, fref) as b:
            want, got = a(probe), b(probe)
        tol = 1e-4 * float(want.abs().max().clamp_min(1e-12))
        if fref.name == ref.name and float((got - want).abs().max()) <= tol:
            return folded, fref
        why = "the folded copy reads a different representation"
    warnings.warn(
        f"fold_bn: the batch-norms of this model were not folded ({why}); the inversion "
        "runs on the model as it is (the same results, without the speed-up).",
        stacklevel=4,
    )
    return model, ref


@contextlib.contextmanager
def memory_format(model: nn.Module, channels_last: bool):
    """With ``channels_last``, the model's 4-d weights in channels-last layout for the
    block (faster convolutions on CPU; benchmarks/results/passes.json), restored afterwards."""
    if not channels_last:
        yield
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)
