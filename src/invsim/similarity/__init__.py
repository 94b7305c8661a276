"""The CKA family: functions, streaming accumulators and many-model matrices."""

from invsim.similarity.functional import (
    center_gram,
    gram_linear,
    gram_rbf,
    hsic,
    kernel_cka,
    linear_cka,
)
from invsim.similarity.matrix import SimilarityMatrix, cka_matrix
from invsim.similarity.streaming import CrossMoments, LinearCKA, LinearCKAMatrix, MinibatchCKA

__all__ = [
    "CrossMoments",
    "LinearCKA",
    "LinearCKAMatrix",
    "MinibatchCKA",
    "SimilarityMatrix",
    "center_gram",
    "cka_matrix",
    "gram_linear",
    "gram_rbf",
    "hsic",
    "kernel_cka",
    "linear_cka",
]
