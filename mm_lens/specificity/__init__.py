"""Which neurons are specific to a domain or a modality: selection from counts and scores."""

from mm_lens.specificity.lape import activation_probability, lape_entropy, lape_select
from mm_lens.specificity.miner import (
    DEFAULT_METRIC_WEIGHTS,
    MINER_METRICS,
    MINER_STRATEGIES,
    ScoreAccumulator,
    aggregate_scores,
    combine_datasets,
    importance_scores,
    miner_select,
    weighted_score,
)

__all__ = [
    "DEFAULT_METRIC_WEIGHTS",
    "MINER_METRICS",
    "MINER_STRATEGIES",
    "ScoreAccumulator",
    "activation_probability",
    "aggregate_scores",
    "combine_datasets",
    "importance_scores",
    "lape_entropy",
    "lape_select",
    "miner_select",
    "weighted_score",
]
