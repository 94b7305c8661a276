"""invsim: how similar neural networks really are, with representation inversion.

The pipeline (see DESIGN.md): data -> pairs -> inversion -> store -> representation ->
similarity -> experiment -> report. The names below are the public API; they are
imported on first use (PEP 562), so ``import invsim`` and ``invsim --help`` stay cheap
and do not import torch.

Examples:
    >>> import invsim
    >>> from invsim import linear_cka, InversionConfig
    >>> InversionConfig().iterations, "linear_cka" in invsim.__all__
    (2000, True)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first access). A name here must
# not also be a submodule's name (importing the submodule would shadow it).
_LAZY: dict[str, str] = {
    # data, models, inversion, store
    "load_dataset": "invsim.data",
    "sample_pairs": "invsim.data.pairs",
    "load_model": "invsim.models",
    "save_model": "invsim.models",
    "extract": "invsim.representation",
    "InversionConfig": "invsim.config",
    "invert_images": "invsim.inversion",
    "InversionResult": "invsim.inversion",
    "invert_dataset": "invsim.store",
    "InvertedDataset": "invsim.store",
    # similarity
    "LinearCKA": "invsim.similarity",
    "StreamingPanel": "invsim.similarity",
    "MinibatchCKA": "invsim.similarity",
    "SimilarityMatrix": "invsim.results",
    "cka_matrix": "invsim.similarity",
    "kernel_cka": "invsim.similarity",
    "linear_cka": "invsim.similarity",
    # experiments
    "natural_similarity": "invsim.experiment",
    "layer_similarity": "invsim.experiment",
    "LayerSimilarity": "invsim.results",
    "inverted_similarity": "invsim.experiment",
    "stir_similarity": "invsim.experiment",
    "run_experiment": "invsim.experiment",
    "Results": "invsim.results",
    "write_outputs": "invsim.report",
    "train_model": "invsim.train",
}

__all__ = sorted([*_LAZY, "__version__"])


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'invsim' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
