"""Input checks shared by every similarity measure."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

ArrayLike = Any  # torch.Tensor | np.ndarray | nested sequences


def as_matrix(
    x: ArrayLike,
    name: str,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = torch.float64,
) -> torch.Tensor:
    """Return ``x`` as an (n, d) tensor of ``dtype`` (float64 by default; ``None`` keeps a
    float32/float64 input as it is), flattening per example.

    Raises ``ValueError`` naming ``name`` for NaN/Inf or a rank-0/1 input.
    """
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        t = torch.as_tensor(np.asarray(x))
    if t.ndim < 2:
        raise ValueError(
            f"{name} must have shape (n, d) or (n, ...), one row per example; got shape "
            f"{tuple(t.shape)}. Reshape a single feature to (n, 1)."
        )
    if device is not None:
        t = t.to(device)
    t = t.reshape(t.shape[0], -1)
    if dtype is None:
        dtype = t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32
    t = t.to(dtype)
    # one cheap reduction first: a NaN or Inf anywhere makes the sum non-finite (a finite
    # sum that overflows is then cleared by the exact check)
    if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).any(dim=1).sum())
        raise ValueError(
            f"{name} contains NaN or Inf in {bad} of {t.shape[0]} examples; CKA is undefined. "
            "Check the model's activations (e.g. an exploding layer) before comparing."
        )
    return t


def check_pair(x: torch.Tensor, y: torch.Tensor, *, debiased: bool) -> None:
    """Check that X and Y have the same number of examples, and enough of them."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"X has {x.shape[0]} examples but Y has {y.shape[0]}; CKA compares two "
            "representations of the same examples, so the row counts must match."
        )
    check_enough(x.shape[0], debiased=debiased)


def check_not_constant(x: torch.Tensor, name: str) -> None:
    """Raise if every example of ``x`` is identical (zero variance)."""
    if bool((x == x[:1]).all()):
        raise ValueError(
            f"{name} is constant across all {x.shape[0]} examples (zero variance); CKA is "
            "undefined for it. A dead layer or a constant input is the usual cause."
        )


def paired_batch(
    x_batch: ArrayLike, y_batch: ArrayLike, *, dtype: torch.dtype | None = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of X and Y as matrices on X's device, with matching row counts."""
    x = as_matrix(x_batch, "X", dtype=dtype)
    y = as_matrix(y_batch, "Y", device=x.device, dtype=dtype)
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"X batch has {x.shape[0]} examples but Y batch has {y.shape[0]}; they must match."
        )
    return x, y


def min_examples(debiased: bool) -> int:
    """Examples CKA needs: 2 for the biased estimator, 4 for the debiased (n(n-3) > 0)."""
    return 4 if debiased else 2


def check_enough(n: int, *, debiased: bool, what: str = "CKA") -> None:
    """Raise a ValueError naming ``n`` when there are too few examples for the estimator."""
    need = min_examples(debiased)
    if n < need:
        kind = f"debiased {what}" if debiased else what
        raise ValueError(
            f"{kind} needs at least {need} examples; got n={n}. Use more examples"
            + (" or debiased=False." if debiased else ".")
        )
