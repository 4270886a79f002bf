"""Choosing the compressed-sensing weight λ on a held-in tuning set by reconstruction PSNR."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medidiff.baselines.recon import DEFAULT_CS_ITERS, compressed_sensing, zero_filled
from medidiff.metrics import psnr

__all__ = ["DEFAULT_LAMBDAS", "CSTuning", "tune_cs_lambda"]

DEFAULT_LAMBDAS: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


@dataclass(frozen=True)
class CSTuning:
    """Result of the λ search: the chosen weight and mean PSNR (dB) per candidate."""

    lamda: float
    psnr_by_lambda: dict[float, float]
    zero_filled_psnr: float


def tune_cs_lambda(
    tuning_set: Sequence[tuple[object, np.ndarray]],
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    max_iter: int = DEFAULT_CS_ITERS,
) -> CSTuning:
    """Pick λ maximising mean PSNR over a held-in tuning set of ``(KSpaceData, reference (H,W,S))`` pairs.

    The tuning set must not contain the scans being evaluated.
    """
    if not tuning_set:
        raise ValueError("tune_cs_lambda needs at least one (KSpaceData, reference) pair")
    scores: dict[float, list[float]] = {float(lam): [] for lam in lambdas}
    zf_scores = []
    for data, ref in tuning_set:
        zf_scores.append(psnr(ref, zero_filled(data).array))
        for lam, values in scores.items():
            values.append(psnr(ref, compressed_sensing(data, lam, max_iter).array))
    means = {lam: float(np.mean(v)) for lam, v in scores.items()}
    best = max(means, key=means.__getitem__)
    return CSTuning(lamda=best, psnr_by_lambda=means, zero_filled_psnr=float(np.mean(zf_scores)))
