"""Similarity measures: the CKA family, a registry of measures (linear, CCA family,
neighbours, RSA, functional), streaming accumulators and many-model matrices.

``MEASURES`` maps each name to a :class:`Measure` with its metadata; ``measure(name, X,
Y)`` is the functional form. Importing this package registers every built-in measure.
"""

from invsim.results import SimilarityMatrix
from invsim.similarity import (  # noqa: F401  (registers)
    alignment,
    deconfounded,
    neighbors,
    outputs,
    rsa,
)
from invsim.similarity.calibration import Calibrated, calibrate
from invsim.similarity.core import centre_gram, gram_linear, gram_rbf, hsic
from invsim.similarity.functional import kernel_cka, linear_cka
from invsim.similarity.matrix import cka_matrix
from invsim.similarity.registry import (
    INVARIANCES,
    MEASURES,
    Measure,
    get_measure,
    measure,
    register,
)
from invsim.similarity.streaming import (
    CrossMoments,
    LinearCKA,
    MinibatchCKA,
    StreamingPanel,
)

__all__ = [
    "Calibrated",
    "INVARIANCES",
    "MEASURES",
    "CrossMoments",
    "LinearCKA",
    "StreamingPanel",
    "Measure",
    "MinibatchCKA",
    "SimilarityMatrix",
    "calibrate",
    "centre_gram",
    "cka_matrix",
    "get_measure",
    "gram_linear",
    "gram_rbf",
    "hsic",
    "kernel_cka",
    "linear_cka",
    "measure",
    "register",
]
