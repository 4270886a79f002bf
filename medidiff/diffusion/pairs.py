"""Training pairs (kept importable here; they live in :mod:`medidiff.data.pairs`, the operator and the
intensity normalisation in :mod:`medidiff.tasks`)."""

from medidiff.data.pairs import (
    PatchSampler,
    SlicePair,
    crop_multiple,
    fingerprint,
    folder_volumes,
    make_pairs,
    neighbour_index,
    training_pairs,
    validation_pairs,
)
from medidiff.tasks import intensity_scale as robust_scale
from medidiff.tasks import task_operator

__all__ = [
    "PatchSampler",
    "SlicePair",
    "crop_multiple",
    "fingerprint",
    "folder_volumes",
    "make_pairs",
    "neighbour_index",
    "robust_scale",
    "task_operator",
    "training_pairs",
    "validation_pairs",
]
