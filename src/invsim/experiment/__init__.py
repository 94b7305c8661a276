"""Experiments: the regimes' matrices, their summaries, and the run as stages.

- :mod:`invsim.experiment.matrices`: natural, inverted and STIR matrices between models,
  with the on-disk representation cache.
- :mod:`invsim.experiment.summary`: summaries, the robustness trend, diagnostics, CSV.
- :mod:`invsim.experiment.layers`: layer-by-layer matrices (every depth, bounded memory).
- :mod:`invsim.experiment.stages`: ``run_experiment`` as declared, resumable stages.
"""

from invsim.experiment.layers import layer_similarity
from invsim.experiment.matrices import (
    RepresentationCache,
    inverted_similarity,
    natural_similarity,
    panel,
    stir_similarity,
)
from invsim.experiment.stages import (
    STAGES,
    Run,
    Stage,
    add_stage,
    confound_config,
    load_data,
    run_experiment,
)
from invsim.experiment.summary import headline, robustness_summary, summarize
from invsim.store.diagnostics import inversion_diagnostics

__all__ = [
    "STAGES",
    "RepresentationCache",
    "Run",
    "Stage",
    "add_stage",
    "confound_config",
    "headline",
    "inversion_diagnostics",
    "inverted_similarity",
    "layer_similarity",
    "load_data",
    "natural_similarity",
    "panel",
    "robustness_summary",
    "run_experiment",
    "stir_similarity",
    "summarize",
]
