"""Coreset subsampling of memories: greedy k-center, the random baseline, coverage radius."""

from vspa.coreset.kcenter import (
    coverage_radius,
    kcenter_greedy,
    num_to_keep,
    random_subsample,
    subsample_indices,
    subsample_memory,
    subsample_per_class,
)

__all__ = [
    "coverage_radius",
    "kcenter_greedy",
    "num_to_keep",
    "random_subsample",
    "subsample_indices",
    "subsample_memory",
    "subsample_per_class",
]
