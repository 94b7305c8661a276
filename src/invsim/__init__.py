"""invsim: how similar neural networks really are, with representation inversion.

See ``DESIGN`` in the repository for the pipeline: data -> pairs -> inversion -> store
-> representation -> similarity -> experiment -> report.
"""

from invsim.similarity import (
    LinearCKA,
    LinearCKAMatrix,
    MinibatchCKA,
    SimilarityMatrix,
    cka_matrix,
    kernel_cka,
    linear_cka,
)

__version__ = "0.1.0"

__all__ = [
    "LinearCKA",
    "LinearCKAMatrix",
    "MinibatchCKA",
    "SimilarityMatrix",
    "__version__",
    "cka_matrix",
    "kernel_cka",
    "linear_cka",
]
